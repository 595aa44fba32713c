"""Grouping archive BCD sets: names in any case, product types from headers, no silent
replacement of one product by another, fbcd carried, and the AOR's channels for band-merging."""

from __future__ import annotations

from pathlib import Path

import pytest
from astropy.io import fits

from services.ingest.mips import product_type_from_name, recognise_spitzer_fits
from services.ingest.recognise import group_spitzer_files
from tests.ingest import archive


@pytest.mark.parametrize(
    ("name", "ptype"),
    [
        ("SPITZER_M1_17543424_0000_0001_2_bunc.FITS", "bunc"),
        ("SPITZER_M1_17543424_0000_0001_2_BCD.fits", "bcd"),
        ("spitzer_m1_17543424_0000_0001_2_bbmsk.Fits.GZ", "bbmsk"),
    ],
)
def test_spitzer_names_in_any_case(name: str, ptype: str) -> None:
    info = recognise_spitzer_fits(name, archive.header(1, dcenum=1))
    assert info is not None and info.from_name
    assert (info.instrument, info.product_type, info.dcenum) == ("MIPS", ptype, 1)


def test_product_type_from_free_names() -> None:
    assert product_type_from_name("mybunc_003.fits") == "bunc"
    assert product_type_from_name("MYBBMSK_003.FITS") == "bbmsk"
    assert product_type_from_name("field7_fbcd.fits") == "fbcd"  # not "bcd"
    assert product_type_from_name("run2/frame-bcd-17.fits.gz") == "bcd"
    assert product_type_from_name("frame_017.fits") is None
    assert product_type_from_name("bcd_and_bunc.fits") is None  # two types: undecided


def _custom_set(ch: int, n: int, *, filename_keyword: bool) -> dict[str, bytes]:
    """Files named my<type>_<nnn>.fits (not Spitzer names); FILENAME in the header or not."""
    files = {}
    for k in range(n):
        for kind in ("bcd", "bunc", archive.BANDS[ch][2]):
            name = f"my{kind}_{k:03d}.fits"
            files[name] = archive.product(
                ch, dcenum=k, kind=kind, filename=name if filename_keyword else None
            )
    return files


@pytest.mark.parametrize("filename_keyword", [True, False])
def test_header_only_triplets_are_typed(tmp_path: Path, filename_keyword: bool) -> None:
    for name, data in _custom_set(1, 3, filename_keyword=filename_keyword).items():
        (tmp_path / name).write_bytes(data)
    files = [(p.name, fits.getheader(p)) for p in sorted(tmp_path.iterdir())]
    sets = group_spitzer_files(files)
    assert not sets.problems, [p.reason for p in sets.problems]
    (members,) = sets.groups.values()
    assert [(m.primary, m.companions) for m in members] == [
        (f"mybcd_{k:03d}.fits", {"bunc": f"mybunc_{k:03d}.fits", "mask": f"mybbmsk_{k:03d}.fits"})
        for k in range(3)
    ]


def test_header_only_typing_order() -> None:
    h = archive.header(1, dcenum=4)
    h["FILENAME"] = "SPITZER_M1_17543424_0000_0004_2_bunc.fits"
    # the FILENAME keyword wins over a submitted name
    info = recognise_spitzer_fits("upload_bcd.fits", h)
    assert info is not None and not info.from_name and info.product_type == "bunc"
    del h["FILENAME"]
    info = recognise_spitzer_fits("upload_bcd.fits", h)
    assert info is not None and info.product_type == "bcd"
    h["BITPIX"] = 16  # an integer image is a status mask whatever the name says
    info = recognise_spitzer_fits("upload_bcd.fits", h)
    assert info is not None and info.product_type == "bbmsk"


def test_two_files_claiming_one_bcd_are_reported_not_overwritten() -> None:
    # float images with no type in name or header: both are taken for the BCD of DCE 1
    files = {archive.spitzer_name(1, 0, "bcd"): archive.product(1, dcenum=0)}
    files["frame_a.fits"] = archive.product(1, dcenum=1)
    files["frame_b.fits"] = archive.product(1, dcenum=1, kind="bunc")
    files[archive.spitzer_name(1, 1, "bbmsk")] = archive.product(1, dcenum=1, kind="bbmsk")
    sets = group_spitzer_files(archive.headers_of(files))
    (members,) = sets.groups.values()
    assert [m.primary for m in members] == [archive.spitzer_name(1, 0, "bcd")]
    reasons = {p.name: p.reason for p in sets.problems}
    assert set(reasons) == {"frame_a.fits", "frame_b.fits", archive.spitzer_name(1, 1, "bbmsk")}
    assert reasons["frame_a.fits"].startswith(
        "frame_a.fits: frame_b.fits also claim(s) to be the BCD of MIPS ch1 AOR 17543424 "
        "EXPID 0 DCENUM 1; none of them is used"
    )
    assert "frame_a.fits also claim(s)" in reasons["frame_b.fits"]
    # two uncertainty files for one BCD: both reported, the BCD goes on without one
    files = archive.triplet(1, 2)
    files["extra_bunc.fits"] = archive.product(1, dcenum=2, kind="bunc")
    sets = group_spitzer_files(archive.headers_of(files))
    (members,) = sets.groups.values()
    assert members[0].companions == {"mask": archive.spitzer_name(1, 2, "bbmsk")}
    both = {"extra_bunc.fits", archive.spitzer_name(1, 2, "bunc")}
    assert {p.name for p in sets.problems} == both


def test_fbcd_is_carried_with_its_bcd_and_unused_products_are_not_dead_letters() -> None:
    files = {}
    for dce in range(2):
        files.update(archive.triplet(2, dce))
        fbcd = archive.spitzer_name(2, dce, "fbcd")
        files[fbcd] = archive.product(2, dcenum=dce, kind="fbcd", filename=fbcd)
    ebcd = archive.spitzer_name(2, 0, "ebcd")
    files[ebcd] = archive.product(2, kind="ebcd", filename=ebcd)
    sets = group_spitzer_files(archive.headers_of(files))
    assert not sets.problems, [p.reason for p in sets.problems]
    (members,) = sets.groups.values()
    assert [m.companions["fbcd"] for m in members] == [
        archive.spitzer_name(2, d, "fbcd") for d in range(2)
    ]
    assert [p.name for p in sets.ignored] == [ebcd]
    # an unknown product type is still bad input
    odd = archive.spitzer_name(2, 0, "zzz")
    sets = group_spitzer_files(archive.headers_of({odd: archive.product(2)}))
    assert [p.name for p in sets.problems] == [odd]


def test_aor_channels_of_a_24_and_70_um_archive_set() -> None:
    files = {**archive.triplet(1, 0), **archive.triplet(1, 1), **archive.triplet(2, 0)}
    sets = group_spitzer_files(archive.headers_of(files))
    assert sorted(sets.groups) == [
        ("MIPS", 1, archive.AORKEY, "bcd"),
        ("MIPS", 2, archive.AORKEY, "bcd"),
    ]
    assert sets.aor_channels() == {("MIPS", archive.AORKEY): (1, 2)}
    one_band = group_spitzer_files(archive.headers_of(archive.triplet(1, 0)))
    assert one_band.aor_channels() == {("MIPS", archive.AORKEY): (1,)}


def _pbcd(ch: int, kind: str, *, ens: str = "E777", drop_wcs: bool = False,
          bunit: str = "MJy/sr") -> tuple[str, bytes]:
    h = archive.header(ch)
    del h["DCENUM"]
    h["BUNIT"] = bunit
    if drop_wcs:
        del h["CTYPE1"], h["CTYPE2"]
    return f"SPITZER_M{ch}_{archive.AORKEY}_0000_3_{ens}_{kind}.fits", archive.product(ch, hdr=h)


def test_post_bcd_mosaics_are_grouped_for_extraction() -> None:
    """maic + munc + mcov per band enter as mosaics; mstd is not used (logged); a band whose
    BCDs come too is mosaicked from them; duplicates, companions without their maic and a maic
    without a celestial WCS are reported."""
    files = dict(_pbcd(2, k) for k in ("maic", "munc", "mcov", "mstd"))
    sets = group_spitzer_files(archive.headers_of(files))
    assert not sets.problems and not sets.groups
    assert set(sets.mosaics) == {("MIPS", 2, archive.AORKEY)}
    assert set(sets.mosaics[("MIPS", 2, archive.AORKEY)]) == {"maic", "munc", "mcov"}
    assert [p.name for p in sets.ignored] == [_pbcd(2, "mstd")[0]]
    assert sets.aor_channels() == {("MIPS", archive.AORKEY): (2,)}

    # with the 24 um BCDs and the 24 um mosaic too: the BCDs make that band's mosaic
    both = {**files, **archive.triplet(1, 0), **dict([_pbcd(1, "maic")])}
    sets = group_spitzer_files(archive.headers_of(both))
    assert set(sets.mosaics) == {("MIPS", 2, archive.AORKEY)}
    assert _pbcd(1, "maic")[0] in [p.name for p in sets.ignored]
    assert sets.aor_channels() == {("MIPS", archive.AORKEY): (1, 2)}

    # two mosaics of one band (two ensembles), a munc alone, a maic without WCS
    bad = dict([_pbcd(2, "maic"), _pbcd(2, "maic", ens="E778"), _pbcd(1, "munc")])
    sets = group_spitzer_files(archive.headers_of(bad))
    assert not sets.mosaics
    reasons = {p.name: p.reason for p in sets.problems}
    assert "also claim" in reasons[_pbcd(2, "maic")[0]]
    assert "also claim" in reasons[_pbcd(2, "maic", ens="E778")[0]]
    assert "without its maic" in reasons[_pbcd(1, "munc")[0]]
    sets = group_spitzer_files(archive.headers_of(dict([_pbcd(1, "maic", drop_wcs=True)])))
    assert "no usable celestial WCS" in sets.problems[0].reason
    sets = group_spitzer_files(archive.headers_of(dict([_pbcd(1, "maic", bunit="DN/s")])))
    assert "must be in MJy/sr" in sets.problems[0].reason and not sets.mosaics


def test_newer_archive_version_supersedes_the_older() -> None:
    """A DCE's products at versions 2 and 3 (an archive reprocessing): version 3 is used, with
    its own companions; version 2 is logged as superseded, not dead-lettered."""
    files = dict(archive.triplet(1, 4))
    newer = {}
    for name in files:
        v3 = name.replace("_2_", "_3_")
        kind = name.rsplit("_", 1)[1].split(".")[0]
        newer[v3] = archive.product(1, dcenum=4, kind=kind, filename=v3)
    sets = group_spitzer_files(archive.headers_of({**files, **newer}))
    assert not sets.problems
    (member,) = sets.groups[("MIPS", 1, archive.AORKEY, "bcd")]
    assert "_3_bcd" in member.primary
    assert all("_3_" in n for n in member.companions.values()) and len(member.companions) == 2
    assert sorted(p.name for p in sets.ignored) == sorted(files)
    assert all("superseded" in p.reason for p in sets.ignored)


def test_corrected_bcd_supersedes_the_plain_one_of_the_same_frame() -> None:
    """A frame delivered both as bcd and as the artifact-corrected cbcd (with bunc and cbunc),
    as an IRAC download holds it: the cbcd is the frame with the cbunc as its uncertainty, the
    plain bcd and bunc are logged, nothing is dead-lettered (the rule does not depend on the
    instrument; MIPS-named files keep the fixture small)."""
    files = {}
    for kind in ("bcd", "cbcd", "bunc", "cbunc", "bbmsk"):
        name = archive.spitzer_name(1, 3, kind)
        files[name] = archive.product(1, dcenum=3, kind=kind, filename=name)
    sets = group_spitzer_files(archive.headers_of(files))
    assert not sets.problems, [p.reason for p in sets.problems]
    (member,) = sets.groups[("MIPS", 1, archive.AORKEY, "bcd")]
    assert member.primary.endswith("_cbcd.fits")
    assert member.companions["bunc"].endswith("_cbunc.fits")
    assert member.companions["mask"].endswith("_bbmsk.fits")
    assert sorted(p.name.rsplit("_", 1)[1] for p in sets.ignored) == ["bcd.fits", "bunc.fits"]
    assert all("artifact-corrected" in p.reason for p in sets.ignored)
    # without the corrected unc, the plain bunc goes with the cbcd
    del files[archive.spitzer_name(1, 3, "cbunc")]
    sets = group_spitzer_files(archive.headers_of(files))
    (member,) = sets.groups[("MIPS", 1, archive.AORKEY, "bcd")]
    assert member.companions["bunc"].endswith("_bunc.fits") and not sets.problems


def test_a_frame_given_only_as_its_filtered_bcd_is_that_fbcd() -> None:
    """70 um frames downloaded as fbcd (the median-filtered BCD the handbook recommends for
    point sources) with their bunc and bbmsk but no bcd: each fbcd is its frame, with its
    companions, and nothing is dead-lettered; where a bcd is there too, the fbcd stays its
    companion."""
    files = {}
    for dce in (0, 1):
        for kind in ("fbcd", "bunc", "bbmsk"):
            name = archive.spitzer_name(2, dce, kind)
            files[name] = archive.product(2, dcenum=dce, kind=kind, filename=name)
    sets = group_spitzer_files(archive.headers_of(files))
    assert not sets.problems, [p.reason for p in sets.problems]
    members = sets.groups[("MIPS", 2, archive.AORKEY, "bcd")]
    assert [m.primary.rsplit("_", 1)[1] for m in members] == ["fbcd.fits", "fbcd.fits"]
    assert all(set(m.companions) == {"bunc", "mask"} for m in members)
    bcd = archive.spitzer_name(2, 0, "bcd")
    files[bcd] = archive.product(2, dcenum=0, kind="bcd", filename=bcd)
    sets = group_spitzer_files(archive.headers_of(files))
    first = sets.groups[("MIPS", 2, archive.AORKEY, "bcd")][0]
    assert first.primary == bcd and first.companions["fbcd"].endswith("_fbcd.fits")
