"""Spitzer-format BCDs that the simulator did not make (an IRAC header from astropy's test data
as the keyword model) go through `skybus run` to a mosaic and a source list."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.utils.data import get_pkg_data_filename
from astropy.wcs import WCS

from tests.extract.synth import render_sources

FWHM_ARCSEC = 1.9


def _write_bcds(folder: Path, rng: np.random.Generator, *, compressed: bool = False) -> Table:
    """BCDs on an IRAC SIP header, with injected sources; `compressed`: as other tools write
    them tile-compressed (`.fits.fz`: an empty primary HDU holding the observation keywords,
    the image with its WCS and BUNIT in a RICE-compressed extension)."""
    path = get_pkg_data_filename("data/irac_sip.hdr", package="astropy.wcs.tests")
    template = fits.Header.fromfile(path, sep="", endcard=True, padding=False)
    ra0, dec0 = float(template["CRVAL1"]), float(template["CRVAL2"])
    n_src = 25
    truth = Table(
        {
            "ra": ra0 + rng.uniform(-60, 60, n_src) / 3600 / np.cos(np.radians(dec0)),
            "dec": dec0 + rng.uniform(-60, 60, n_src) / 3600,
            "flux_ujy": 10 ** rng.uniform(2.5, 4.0, n_src),
        }
    )
    ny, nx = int(template["NAXIS2"]), int(template["NAXIS1"])
    for k, (dx, dy) in enumerate([(0, 0), (8, 3), (-6, 9), (4, -7), (-9, -4), (10, 10)]):
        h = template.copy()
        h["CRVAL1"] = ra0 + dx / 3600 / np.cos(np.radians(dec0))
        h["CRVAL2"] = dec0 + dy / 3600
        h["AORKEY"] = 4242
        h["EXPID"] = k
        h["DCENUM"] = 0
        h["BUNIT"] = "MJy/sr"
        wcs = WCS(h, relax=True)
        pix_arcsec = abs(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600
        ujy_per_mjysr = 1e12 / 4.254517e10 * pix_arcsec**2
        sigma_px = FWHM_ARCSEC / 2.3548 / pix_arcsec
        x, y = wcs.all_world2pix(truth["ra"], truth["dec"], 0)
        # pixel-integrated, as a detector records it (1.9" on 1.22" pixels is undersampled)
        image = 0.2 + render_sources((ny, nx), np.asarray(x), np.asarray(y),
                                     np.asarray(truth["flux_ujy"]) / ujy_per_mjysr,
                                     sigma_px=sigma_px, half_size=8)
        image += rng.normal(0, 0.02, image.shape)
        name = f"SPITZER_I1_4242_{k:04d}_0000_1_bcd.fits"
        if not compressed:
            fits.PrimaryHDU(image.astype(np.float32), header=h).writeto(folder / name)
            continue
        with_image = [c for c in h.cards
                      if c.keyword.startswith(("CTYPE", "CRPIX", "CRVAL", "CD", "A_", "B_", "AP_",
                                               "BP_", "NAXIS")) or c.keyword == "BUNIT"]
        names_with_image = {c.keyword for c in with_image}
        primary = fits.PrimaryHDU(header=fits.Header(
            [c for c in h.cards if c.keyword not in names_with_image]))
        ext = fits.CompImageHDU(image.astype(np.float32), fits.Header(with_image),
                                compression_type="RICE_1")
        fits.HDUList([primary, ext]).writeto(folder / f"{name}.fz")
    return truth


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "fits.fz"])
def test_foreign_spitzer_bcds_make_a_mosaic_and_a_source_list(tmp_path: Path,
                                                              compressed: bool) -> None:
    inputs = tmp_path / "bcds"
    inputs.mkdir()
    truth = _write_bcds(inputs, np.random.default_rng(3), compressed=compressed)
    assert len(list(inputs.glob("*.fits.fz" if compressed else "*.fits"))) == 6
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "run",
            str(inputs),
            "--out",
            str(out),
            "--data",
            str(tmp_path / "data"),
            "--timeout",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    maic = list(out.glob("*_maic.fits"))
    tbl = list(out.glob("*_sources.tbl"))
    assert len(maic) == 1 and len(tbl) == 1, proc.stdout
    assert maic[0].name.startswith("SPITZER_I1_4242_")
    sources = Table.read(tbl[0], format="ascii.ipac")
    # separations (arcsec) of every detection from every injected source
    cosd = np.cos(np.radians(np.asarray(truth["dec"])))
    sep = np.hypot((np.asarray(sources["RA"])[:, None] - np.asarray(truth["ra"])[None]) * cosd,
                   np.asarray(sources["Dec"])[:, None] - np.asarray(truth["dec"])[None]) * 3600
    # the bright injected sources are found where they were put, with their flux (3%)
    bright = np.asarray(truth["flux_ujy"]) > 1000
    found = sep.min(axis=0) < 1.0
    assert found[bright].mean() >= 0.9, (found[bright].sum(), bright.sum())
    nearest = sep.argmin(axis=0)
    ratio = np.asarray(sources["flux"])[nearest[bright & found]] / np.asarray(
        truth["flux_ujy"])[bright & found]
    assert abs(float(np.median(ratio)) - 1.0) <= 0.03, np.median(ratio)
    # the undersampled PSF is no Gaussian on the mosaic: the PRF fit measures its mismatch
    # and the fluxes and positions are fitted again on the BCDs, where the model is exact
    meta = Table.read(next(out.glob("*_sources.fits"))).meta
    assert meta["PRFMISM"] > 0.01 and meta["PRFMODE"] == "MULTIFRAME", meta
    # and the bright ones' PRF residuals are not taken for sources: no detection far from an
    # injected source (the PSF, undersampled, is no pixel-integrated Gaussian on the mosaic)
    spurious = sep.min(axis=1) > 1.5
    assert spurious.sum() <= 0.02 * len(sources), np.asarray(sources["SNR"])[spurious]


def _skybus_run(inputs: Path, out: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "run", str(inputs), "--out", str(out),
         "--data", str(data), "--timeout", "120"],
        capture_output=True, text=True, timeout=200,
    )  # fmt: skip


def test_bands_submitted_at_different_versions_are_band_merged(tmp_path: Path) -> None:
    """24 um archive BCDs submitted alone, then 24 + 70 um of the same AOR submitted together
    (so the 24 um products are at version 2, the 70 um ones at version 1): the second
    submission still yields the AOR's band-merged list."""
    from tests.ingest import archive

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for ch in (1, 2):
        for dcenum in range(1, 7):
            for name, data in archive.triplet(ch, dcenum).items():
                (second / name).write_bytes(data)
                if ch == 1:
                    (first / name).write_bytes(data)
    store = tmp_path / "data"
    one = _skybus_run(first, tmp_path / "out1", store)
    assert one.returncode == 0, one.stdout + one.stderr
    assert not list((tmp_path / "out1").glob("*bandmerged*"))  # one band: nothing to merge
    two = _skybus_run(second, tmp_path / "out2", store)
    assert two.returncode == 0, two.stdout + two.stderr
    m1 = next((tmp_path / "out2").glob("SPITZER_M1_*_maic.fits"))
    assert m1.name.split("_")[4] == "2"  # the 24 um mosaic's second version
    assert len(list((tmp_path / "out2").glob("*bandmerged.tbl"))) == 1, two.stdout


def test_a_bad_file_among_good_ones_gives_products_and_exit_status_3(tmp_path: Path) -> None:
    """Six good BCDs and a truncated seventh of the same AOR: the mosaic and the source list
    are made from the good ones, the bad file is listed with its reason, and the exit status
    is 3 (products made, some input not processed), so a script can tell it from a clean
    run."""
    from shared.cli import EXIT_PARTIAL

    inputs = tmp_path / "bcds"
    inputs.mkdir()
    _write_bcds(inputs, np.random.default_rng(3))
    good = sorted(inputs.glob("*_bcd.fits"))[0].read_bytes()
    bad = inputs / "SPITZER_I1_4242_0099_0000_1_bcd.fits"
    bad.write_bytes(good[: len(good) // 2])
    proc = _skybus_run(inputs, tmp_path / "out", tmp_path / "data")
    assert proc.returncode == EXIT_PARTIAL, proc.stdout + proc.stderr
    assert len(list((tmp_path / "out").glob("*_maic.fits"))) == 1, proc.stdout
    assert len(list((tmp_path / "out").glob("*_sources.tbl"))) == 1, proc.stdout
    assert bad.name in proc.stdout and "truncated" in proc.stdout, proc.stdout
