"""FITS products (fitsverify), quick-look PNG, grid/WCS genericity and input errors."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.utils.data import get_pkg_data_filename
from astropy.wcs import WCS, FITSFixedWarning

from services.mosaic import (
    InconsistentFramesError,
    NoUsableFramesError,
    build_mosaic,
    mosaic_hdus,
    quicklook_png,
)
from services.mosaic.grid import (
    OutputGrid,
    TanSip,
    _unit_vector,
    pixel_to_vectors,
    stray_frames,
)
from shared.bcd import BCDFrame
from shared.instruments import mips


@pytest.mark.skipif(shutil.which("fitsverify") is None, reason="fitsverify not installed")
def test_products_pass_fitsverify(field, mosaic, tmp_path: Path) -> None:
    frames, _truth = field
    products = mosaic_hdus(mosaic, template_header=frames[0].header, creator="skybus 0.1.0")
    assert set(products) == {"maic", "munc", "mcov"}
    for kind, hdul in products.items():
        path = tmp_path / mips.pbcd_name(1, 12345678, 0, 1, 1, kind)
        hdul.writeto(path)
        run = subprocess.run(["fitsverify", str(path)], capture_output=True, text=True)
        assert "0 warning(s) and 0 error(s)" in run.stdout, run.stdout + run.stderr
        with fits.open(path) as back:
            h = back[0].header
            assert h["NFRAMES"] == mosaic.n_frames_used
            assert h["INSTRUME"] == "MIPS" and h["CHNLNUM"] == 1 and h["AORKEY"] == 12345678
            assert h["CTYPE1"] == "RA---TAN"
            assert ("BUNIT" in h) == (kind != "mcov")
            assert any(frames[3].key in str(c) for c in h["HISTORY"])
            assert back[0].data.shape == mosaic.image.shape
            if kind == "maic":
                prov = back["PROVENANCE"].data
                assert len(prov) == len(frames)
                np.testing.assert_allclose(prov["OFFSET"], mosaic.offsets_mjysr)
                assert int(prov["NOUTLIER"].sum()) == h["NOUTLIER"] == mosaic.n_outliers


def test_quicklook_png(mosaic) -> None:
    from PIL import Image

    png = quicklook_png(mosaic.image, title="SPITZER_M1 test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(png))
    assert 500 <= im.size[0] <= 700 and 500 <= im.size[1] <= 700
    assert np.asarray(im.convert("L")).std() > 5  # not blank
    with pytest.raises(ValueError):
        quicklook_png(np.zeros(5))


def _irac_header() -> fits.Header:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_pkg_data_filename("data/irac_sip.hdr", package="astropy.wcs.tests")
        return fits.Header.fromstring(Path(path).read_text())


def _cdelt_header(pa_deg: float, *, with_pc: bool) -> fits.Header:
    """A MIPS-like SIP header whose linear part is CDELTi + CROTA2 (or + PCi_j), not CD."""
    h = fits.Header()
    h.update(mips.wcs_keywords(1, ra_deg=359.99, dec_deg=-60.0, pa_deg=pa_deg))
    cd = np.array([[h["CD1_1"], h["CD1_2"]], [h["CD2_1"], h["CD2_2"]]])
    for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        del h[k]
    scale = 2.55 / 3600.0
    h["CDELT1"], h["CDELT2"] = -scale, scale
    if with_pc:
        pc = cd / np.array([-scale, scale])[:, None]
        h["PC1_1"], h["PC1_2"], h["PC2_1"], h["PC2_2"] = pc.ravel()
    else:
        h["CROTA2"] = pa_deg
    return h


@pytest.mark.parametrize("kind", ["mips", "irac", "cdelt_crota2", "cdelt_pc"])
def test_fast_tan_sip_matches_astropy(kind: str) -> None:
    """The fast TAN-SIP path agrees with astropy for the CD, CDELT + PC and CDELT + CROTA2
    forms of the linear WCS (archive files use all three)."""
    if kind == "mips":
        h = fits.Header()
        h.update(mips.wcs_keywords(1, ra_deg=359.99, dec_deg=-60.0, pa_deg=123.0))
    elif kind == "irac":
        h = _irac_header()
    else:
        h = _cdelt_header(123.0, with_pc=kind == "cdelt_pc")
    assert TanSip.from_header(h) is not None
    yy, xx = np.mgrid[-0.5:256:7.3, -0.5:256:5.1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        ra, dec = WCS(h).all_pix2world(xx, yy, 0)
    fast = pixel_to_vectors(h, xx, yy)
    sep_arcsec = np.degrees(np.linalg.norm(fast - _unit_vector(ra, dec), axis=-1)) * 3600
    assert sep_arcsec.max() < 1e-6
    # and the SIP matters: without it the corners move by more than 0.1 px
    plain = h.copy()
    plain["CTYPE1"], plain["CTYPE2"] = "RA---TAN", "DEC--TAN"
    moved = np.degrees(np.linalg.norm(pixel_to_vectors(plain, xx, yy) - fast, axis=-1)) * 3600
    assert moved.max() > 0.1 * 1.2


def test_output_grid_roundtrip() -> None:
    h = fits.Header()
    h.update(mips.wcs_keywords(1, ra_deg=10.0, dec_deg=20.0, pa_deg=0.0))
    g = OutputGrid(
        shape=(50, 60),
        crpix=(30.0, 25.0),
        crval_deg=(10.0, 20.0),
        cd_deg=np.array([[-2.45 / 3600, 0.0], [0.0, 2.45 / 3600]]),
    )
    g2 = OutputGrid.from_header(g.header())
    assert g2.shape == (50, 60) and g2.crpix == g.crpix
    vec = _unit_vector(np.array([10.01, 9.99]), np.array([20.005, 19.99]))
    x, y = g.vectors_to_pixel(vec)
    ra, dec = WCS(g.header()).wcs_pix2world(x, y, 0)
    np.testing.assert_allclose(ra, [10.01, 9.99], atol=1e-10)
    np.testing.assert_allclose(dec, [20.005, 19.99], atol=1e-10)


def test_irac_like_frames_use_native_scale(field) -> None:
    """Frames written with astropy's IRAC header model: the generic path, native pixels."""
    frames, _truth = field
    base = _irac_header()
    irac = []
    rng = np.random.default_rng(5)
    for i in range(4):
        h = base.copy()
        h["NAXIS1"], h["NAXIS2"] = 128, 128
        h["CRPIX1"], h["CRPIX2"] = 64.5, 64.5
        h["CRVAL1"] = 6.155 + rng.uniform(-0.002, 0.002)
        h["CRVAL2"] = -2.072 + rng.uniform(-0.002, 0.002)
        h["BUNIT"] = "MJy/sr"
        h["DCENUM"] = i + 1
        data = (1.0 + rng.normal(0, 0.01, (128, 128))).astype(np.float32)
        irac.append(
            BCDFrame(
                data=data,
                unc=np.full_like(data, 0.01),
                mask=np.zeros((128, 128), dtype=np.int32),
                header=h,
            )
        )
    m = build_mosaic(irac)
    native = np.sqrt(abs(base["CD1_1"] * base["CD2_2"] - base["CD1_2"] * base["CD2_1"])) * 3600
    assert m.pixel_arcsec == pytest.approx(native, rel=1e-9)
    assert np.nanmedian(m.image) == pytest.approx(1.0, abs=0.005)
    with pytest.raises(InconsistentFramesError):
        build_mosaic([*irac, frames[0]])


def test_first_dce_dropped_and_errors(field) -> None:
    frames, _truth = field
    first = [dataclasses.replace(f, header=f.header.copy()) for f in frames[:6]]
    for f in first[:2]:
        f.header["DCENUM"] = 0
    m = build_mosaic(first)
    assert list(m.used) == [False, False, True, True, True, True]
    assert np.isnan(m.offsets_mjysr[:2]).all()
    m_all = build_mosaic(first, drop_first_dce=False)
    assert m_all.used.all()
    with pytest.raises(NoUsableFramesError, match=r"among 2: 2 x DCENUM 0 \(first-frame"):
        build_mosaic(first[:2])
    with pytest.raises(NoUsableFramesError):
        build_mosaic([])
    masked = [
        dataclasses.replace(f, mask=np.full(f.mask.shape, int(mips.MaskBit.PMASK)))
        for f in first[2:]
    ]
    with pytest.raises(ValueError, match="fatal_bits"):
        build_mosaic(masked)


def test_stray_frames_are_found_by_their_distance_from_the_others(field) -> None:
    """A frame whose WCS puts it far from the rest of the group (a wrong CRVAL) is named, the
    others are not; fewer than 3 frames have no majority to compare against."""
    frames, _truth = field
    group = [dataclasses.replace(f, header=f.header.copy()) for f in frames[:8]]
    assert stray_frames(group) == []
    group[5].header["CRVAL1"] = 0.0
    group[5].header["CRVAL2"] = 0.0
    strays = stray_frames(group)
    assert [i for i, _ in strays] == [5]
    assert strays[0][1] > 100.0
    assert stray_frames(group[4:6]) == []
