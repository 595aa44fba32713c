"""Post-BCD mosaics from the archive (maic + munc + mcov, Spitzer names) submitted without their
BCDs: `skybus run` enters them at the mosaic level and yields per-band source lists and the
AOR's band-merged list, with upper limits measured on the mosaic where a band has no
detection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from tests.extract.synth import make_mosaic

AORKEY = 31415
RA0, DEC0 = 210.0, -12.0


def _sky(rng: np.random.Generator) -> Table:
    """Point sources over the field: 24 um fluxes 0.3-10 mJy, 70 um = 24 um x a colour
    between 0.05 and 8 (many 70 um counterparts too faint to detect)."""
    n = 60
    f24 = 10 ** rng.uniform(2.5, 4.0, n)
    return Table({
        "ra": RA0 + rng.uniform(-180, 180, n) / 3600 / np.cos(np.radians(DEC0)),
        "dec": DEC0 + rng.uniform(-180, 180, n) / 3600,
        "flux_24": f24,
        "flux_70": f24 * 10 ** rng.uniform(-1.3, 0.9, n),
    })  # fmt: skip


def _write_pbcd(folder: Path, channel: int, sky: Table, *, seed: int) -> Table:
    """maic, munc, mcov of one band, as the archive names them; returns the truth with S/N."""
    pix, fwhm, sigma1 = {1: (2.45, 5.9, 0.03), 2: (4.0, 18.0, 0.4)}[channel]
    flux = sky["flux_24"] if channel == 1 else sky["flux_70"]
    m = make_mosaic(shape=(180, 180) if channel == 1 else (110, 110), pixel_arcsec=pix,
                    fwhm_arcsec=fwhm, sigma1_mjysr=sigma1, seed=seed, channel=channel,
                    ra0=RA0, dec0=DEC0,
                    truth_radec=(np.asarray(sky["ra"]), np.asarray(sky["dec"]),
                                 np.asarray(flux)))  # fmt: skip
    header = m.header.copy()
    header["AORKEY"] = AORKEY
    header["EXPID"] = 0
    header["ORIGIN"] = "a MOPEX-like test writer"
    for kind, data in (("maic", m.image), ("munc", m.unc), ("mcov", m.coverage)):
        name = f"SPITZER_M{channel}_{AORKEY}_0000_3_E1234{channel}_{kind}.fits"
        fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header=header).writeto(folder / name)
    return m.truth


def test_archive_mosaics_give_source_lists_and_a_band_merged_list(tmp_path: Path) -> None:
    inputs = tmp_path / "pbcd"
    inputs.mkdir()
    sky = _sky(np.random.default_rng(8))
    truth24 = _write_pbcd(inputs, 1, sky, seed=1)
    truth70 = _write_pbcd(inputs, 2, sky, seed=2)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "run", str(inputs), "--out", str(out),
         "--data", str(tmp_path / "data"), "--timeout", "300"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lists = sorted(out.glob("*_sources.tbl"))
    assert [p.name[:10] for p in lists] == ["SPITZER_M1", "SPITZER_M2"], proc.stdout
    assert len(list(out.glob("SPITZER_M*_maic.png"))) == 2  # a quick look of each mosaic
    merged_files = list(out.glob("*bandmerged.tbl"))
    assert len(merged_files) == 1, proc.stdout
    merged = Table.read(merged_files[0], format="ascii.ipac")

    # 24 um: every source the mosaic shows at S/N > 20 is in the list, at its position
    src24 = Table.read(lists[0], format="ascii.ipac")
    bright = np.asarray(truth24["snr_true"]) > 20
    cosd = np.cos(np.radians(DEC0))
    sep = np.hypot((np.asarray(src24["RA"])[None, :] - np.asarray(sky["ra"])[:, None]) * cosd,
                   np.asarray(src24["Dec"])[None, :] - np.asarray(sky["dec"])[:, None]) * 3600
    assert np.all(sep[bright].min(axis=1) < 1.0)

    # the band-merged list: a row per 24 um source; where 70 um has no detection, a limit
    # measured on the 70 um mosaic (flag U), above the true 70 um flux
    sep_m = np.hypot((np.asarray(merged["RA"])[:, None] - np.asarray(sky["ra"])[None, :]) * cosd,
                     np.asarray(merged["Dec"])[:, None] - np.asarray(sky["dec"])[None, :]) * 3600
    nearest = np.argmin(sep_m, axis=1)
    real = sep_m[np.arange(len(merged)), nearest] < 2.0
    upper = (np.asarray(merged["flag_70um"]) == "U") & real
    assert upper.sum() >= 5, merged["flag_70um"]
    assert np.all(np.asarray(merged["flag_70um"])[real] != "N")
    true70 = np.asarray(sky["flux_70"])[nearest[upper]]
    ulim = np.asarray(merged["ulim_70um"])[upper]
    assert np.mean(true70 < ulim) >= 0.9, (true70, ulim)
    # ... and a limit of the mosaic's depth: 3 sigma of a point source there, within 2x
    sigma_ps = (np.asarray(truth70["flux_ujy"]) / np.asarray(truth70["snr_true"]))[nearest[upper]]
    assert 0.5 < float(np.median(ulim / (3 * sigma_ps))) < 2.0
