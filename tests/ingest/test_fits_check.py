"""Archive FITS are checked whole before grouping: truncated data, corrupt header cards and a
BCD without a usable celestial WCS are stopped at ingest, naming the file and the reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from services.ingest.recognise import InputKind, classify, group_spitzer_files
from shared.fitscheck import CorruptFitsError, check_fits
from shared.fitsio import celestial_wcs_problem
from tests.ingest import archive


def _write(tmp_path: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Write the files and read them back: the tests work on real files."""
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir())}


def test_whole_file_passes_and_layout_is_reported(tmp_path: Path) -> None:
    name = archive.spitzer_name(1, 0, "bcd")
    data = _write(tmp_path, {name: archive.product(1)})[name]
    (hdu,) = check_fits(data)
    assert (hdu.data_start, hdu.data_bytes) == (2880, 16 * 16 * 4)
    # the last block's padding missing: the data is whole, so the file is accepted
    assert len(check_fits(data[: 2880 + 16 * 16 * 4])) == 1
    assert classify(name, data)[0] is InputKind.SPITZER_FITS


def test_truncated_data_is_named_with_sizes(tmp_path: Path) -> None:
    name = archive.spitzer_name(1, 3, "bcd")
    whole = archive.product(1, dcenum=3)
    cut = _write(tmp_path, {name: whole[: 2880 + 500]})[name]
    with pytest.raises(CorruptFitsError) as err:
        check_fits(cut)
    assert str(err.value) == (
        "truncated: header promises 1024 bytes of data, file has 500; re-download it"
    )
    with pytest.raises(ValueError, match="truncated: header promises 1024 bytes"):
        classify(name, cut)
    with pytest.raises(ValueError, match="no END card"):
        classify(name, whole[:2000])  # cut inside the header


def test_truncated_extension_is_found() -> None:
    hdul = fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(np.zeros((40, 40), np.float64), name="SCI")]
    )
    buf = io.BytesIO()
    hdul.writeto(buf)
    data = buf.getvalue()
    assert [h.data_bytes for h in check_fits(data)] == [0, 40 * 40 * 8]
    with pytest.raises(CorruptFitsError, match=r"header of HDU 1 promises 12800 bytes"):
        check_fits(data[:-8000])


def _damaged(keyword: bytes, garbage: bytes) -> bytes:
    raw = bytearray(archive.product(1, dcenum=9))
    at = raw.find(keyword)
    raw[at : at + len(garbage)] = garbage
    return bytes(raw)


@pytest.mark.parametrize(
    ("keyword", "garbage", "reason"),
    [
        # binary garbage over non-WCS cards (astropy only warns and reads on)
        (b"DCENUM  =", bytes((j * 37 + 1) % 256 for j in range(300)), "non-ASCII bytes"),
        (b"EXPTIME =", b"ex#ptime= 3", "invalid keyword 'ex#ptime'"),
        (b"CRVAL1  =", b"CRVAL1  =  1.2.3.4abc", "(CRVAL1) has an unparsable value"),
    ],
)
def test_corrupt_header_cards_are_bad_input(keyword: bytes, garbage: bytes, reason: str) -> None:
    data = _damaged(keyword, garbage)
    with pytest.raises(CorruptFitsError, match="corrupt header") as err:
        check_fits(data)
    assert reason in str(err.value) and "re-download it" in str(err.value)
    with pytest.raises(ValueError, match="corrupt header"):
        classify(archive.spitzer_name(1, 9, "bcd"), data)


def test_lower_case_keywords_are_tolerated() -> None:
    """Lower-case keywords break the FITS standard but some writers produce them and astropy
    reads them: such a file is not damaged."""
    data = _damaged(b"EXPTIME =", b"exptime =")
    assert len(check_fits(data)) == 1


def test_celestial_wcs_rules() -> None:
    good = archive.header(1)
    assert celestial_wcs_problem(good) is None
    cdelt = good.copy()
    for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        del cdelt[key]
    assert celestial_wcs_problem(cdelt) == (
        "no pixel scale: neither a CD matrix nor non-zero CDELT1/CDELT2"
    )
    cdelt["CDELT1"], cdelt["CDELT2"], cdelt["CROTA2"] = -7e-4, 7e-4, 30.0
    assert celestial_wcs_problem(cdelt) is None
    cases: list[tuple[str, object, str]] = [
        ("CRVAL1", None, "no numeric CRVAL1"),
        ("CRPIX2", "middle", "no numeric CRPIX2"),
        ("CTYPE2", None, "no CTYPE2"),
        ("CTYPE1", "LINEAR", "not a celestial longitude/latitude pair"),
        ("CRVAL2", 95.0, "is not a latitude"),
        ("CD1_2", "x", "CD1_2 is not a finite number"),
    ]
    for key, value, reason in cases:
        h = good.copy()
        if value is None:
            del h[key]
        else:
            h[key] = value
        problem = celestial_wcs_problem(h)
        assert problem is not None and reason in problem, (key, problem)
    singular = good.copy()
    singular["CD1_1"], singular["CD1_2"] = singular["CD2_1"], singular["CD2_2"]
    assert "singular" in str(celestial_wcs_problem(singular))


def test_bcd_without_wcs_is_reported_and_the_rest_grouped() -> None:
    files = {}
    for dce in range(3):
        files.update(archive.triplet(1, dce))
    no_wcs = archive.header(1, dcenum=1)
    del no_wcs["CRVAL1"]
    bad_name = archive.spitzer_name(1, 1, "bcd")
    files[bad_name] = archive.product(1, dcenum=1, hdr=no_wcs)
    sets = group_spitzer_files(archive.headers_of(files))
    (members,) = sets.groups.values()
    assert [m.dcenum for m in members] == [0, 2]
    assert all(set(m.companions) == {"bunc", "mask"} for m in members)
    reasons = {p.name: p.reason for p in sets.problems}
    assert set(reasons) == {
        bad_name,
        archive.spitzer_name(1, 1, "bunc"),
        archive.spitzer_name(1, 1, "bbmsk"),
    }
    assert reasons[bad_name].startswith(f"{bad_name}: the BCD has no usable celestial WCS")
    assert "no numeric CRVAL1" in reasons[bad_name]
    assert "of a BCD that is not used" in reasons[archive.spitzer_name(1, 1, "bunc")]
