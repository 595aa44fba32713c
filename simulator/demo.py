"""The demo data set: a MIPS 24+70 um photometry AOR, a TAUVEX drift scan and an ISOCAM
revolution (two LW raster observations), with truth.

Inputs (what a telescope team would submit) go to `<dir>/inputs`, truth tables to
`<dir>/truth`, so `skybus run <dir>/inputs` never sees the answers.
"""

from __future__ import annotations

from pathlib import Path

from astropy.table import Table


def write_demo_inputs(folder: Path) -> list[Path]:
    """Simulate the demo observations; returns the input files written."""
    from simulator import mips

    inputs, truth = folder / "inputs", folder / "truth"
    inputs.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    written = mips.write_aor(mips.MipsAORConfig(), inputs, truth_dir=truth / "mips")
    paths = [p for p in written if p.parent == inputs]
    paths += _tauvex_inputs(inputs, truth)
    paths += _isocam_inputs(inputs, truth)
    return paths


def _tauvex_inputs(inputs: Path, truth: Path) -> list[Path]:
    try:
        from simulator import tauvex
    except ImportError:  # TAUVEX simulator not available
        return []
    sim = tauvex.simulate_scan(tauvex.ScanConfig())
    level0 = inputs / "tauvex_scan_level0.bin"
    attitude = inputs / "tauvex_scan_attitude.fits"
    level0.write_bytes(sim.level0)
    attitude.write_bytes(sim.attitude)
    refcat = inputs / "tauvex_refcat.fits"
    tauvex.reference_catalogue(sim).writeto(refcat, overwrite=True)
    sim.sources.write(truth / "tauvex_truth_sources.fits", overwrite=True)
    return [level0, attitude, refcat]


def _isocam_inputs(inputs: Path, truth: Path) -> list[Path]:
    """A simulated revolution's TDF + EOH table; the sources of each observation as truth."""
    from shared.instruments import isocam as ic
    from simulator import isocam

    sim = isocam.simulate_revolution(isocam.RevolutionConfig())
    rev = sim.config.revolution
    tdf = inputs / f"isocam_rev{rev:03d}.tdf"
    eoh = inputs / f"{ic.product_name('EOHC', f'{rev:03d}')}.fits"
    tdf.write_bytes(sim.tdf)
    eoh.write_bytes(sim.eoh)
    for obsnum, sources in sim.sources.items():
        sources.write(truth / f"isocam_truth_sources_{obsnum}.fits", overwrite=True)
    return [tdf, eoh]


def print_demo_summary(out_dir: Path) -> None:
    """Print the head of the band-merged tables and ISOCAM point-source lists the demo made."""
    for path in sorted(out_dir.glob("*_sources.tbl")):
        meta = Table.read(path, format="ascii.ipac").meta.get("keywords", {})
        model = meta.get("PRFMODEL", {}).get("value")
        if model:
            tested = meta.get("PRFTEST", {}).get("value")
            how = ("" if tested is None else " (too few bright sources to test it)"
                   if tested == 0 else f" (chosen on {tested} bright sources)")
            print(f"{path.name}: PSF model {model}{how}")
    for path in sorted(out_dir.glob("*bandmerged*.tbl")) + sorted(out_dir.glob("CPSL*.tbl")):
        table = Table.read(path, format="ascii.ipac")
        print(f"\n{path.name}: {len(table)} sources; first rows:")
        cols = [c for c in table.colnames if not c.startswith("delta")][:9]
        if path.name.startswith("CPSL"):
            cpsl_cols = ("SOURCE", "RA", "DEC", "FLUX", "FLUX_ERR", "SNR")
            cols = [c for c in cpsl_cols if c in table.colnames]
        table[cols][:8].pprint(max_width=140)
    pngs = sorted(out_dir.glob("*.png"))
    if pngs:
        print("\nquick-look images:")
        for p in pngs:
            print(f"  {p}")
