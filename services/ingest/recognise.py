"""What a submitted file is: MIPS telemetry, Spitzer archive FITS, calibration FITS, TAUVEX,
ISOCAM TDF + EOH.

Recognition goes by content first (FITS header keywords, telemetry sync patterns), then by
the mission's file-naming rules; names alone are never trusted for FITS. Gzip files are
decompressed first and recognised by what they hold; every FITS file is checked whole
(`fitscheck`) before it is trusted.
"""

from __future__ import annotations

import enum
import io
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

from astropy.io import fits

from services.ingest import mips
from shared import bcd, ccsds, fitscheck, fitsio
from shared.instruments import isocam as ic
from shared.instruments import tauvex as tv

FITS_MAGIC = b"SIMPLE  ="
GZIP_MAGIC = b"\x1f\x8b"
#: Default cap on the size of a decompressed gzip input (IngestConfig.max_gunzip_mb).
DEFAULT_MAX_GUNZIP_BYTES = 1024 << 20
#: CCSDS primary headers that must chain from the file's start (fewer if the file ends).
CCSDS_PROBE_PACKETS = 3

#: BCD-level primaries: each is one frame of its AOR + channel group.
PRIMARY_BCD_TYPES = {"bcd", "cbcd"}
#: Per-DCE products carried beside their BCD, by companion role.
UNC_TYPES = {"bunc", "cbunc"}
#: (used, logged) when one frame comes both ways: IRAC's corrected BCD and its unc.
CORRECTED_OVER_PLAIN = (("cbcd", "bcd"), ("cbunc", "bunc"))
MASK_TYPES = {"bbmsk", "bmask", "bimsk"}
FILTERED_TYPES = {"fbcd"}  #: Ge median-filtered BCD (a companion; the frame when no bcd came)
#: Known Spitzer per-DCE products the pipeline does not use: logged, not dead-lettered.
UNUSED_TYPES = {"ebcd", "brmsk", "rmask"}
BCD_TYPES = PRIMARY_BCD_TYPES | FILTERED_TYPES | {"ebcd"}
RAW_TYPES = {"raw", "dce"}
#: Post-BCD products entered at the mosaic level (image, uncertainty, coverage); the type is
#: the file's role in the mosaic product.
PBCD_TYPES = {"maic", "munc", "mcov"}


class InputKind(enum.StrEnum):
    CALIBRATION = "calibration"
    SPITZER_FITS = "spitzer_fits"
    MIPS_TELEMETRY = "mips_telemetry"
    TAUVEX_LEVEL0 = "tauvex_level0"
    TAUVEX_ATTITUDE = "tauvex_attitude"
    ISOCAM_TDF = "isocam_tdf"
    ISOCAM_EOH = "isocam_eoh"


#: ISOCAM buffers looked at for the sync word + ident: a TDF whose first buffer is damaged is
#: still recognised (split_tdf counts the bad buffers).
ISOCAM_PROBE_BUFFERS = 4
#: Root of the EOH table's product name and EXTNAME (docs/isocam-tdf.md).
ISOCAM_EOH_ROOT = "EOHC"


def safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return cleaned.lstrip(".") or "file"


def _primary_header(data: bytes) -> fits.Header:
    try:
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            return fitsio.image_header(hdul)
    except (OSError, ValueError, IndexError) as exc:
        raise ValueError(f"FITS header cannot be read ({exc}); is the file complete?") from exc


def _is_isocam_tdf(data: bytes) -> bool:
    """True if one of the first buffers starts with the ISOCAM sync word and ident."""
    marker = ic.SYNC + ic.IDENT
    return any(
        data[k * ic.BUFFER_BYTES : k * ic.BUFFER_BYTES + len(marker)] == marker
        for k in range(ISOCAM_PROBE_BUFFERS)
    )


def _is_isocam_eoh(header: fits.Header, data: bytes) -> bool:
    """True for an ISO EOH table: FILENAME EOHC<rev>, or a BINTABLE named EOHC."""
    if str(header.get("FILENAME", "")).strip().upper().startswith(ISOCAM_EOH_ROOT):
        return True
    if str(header.get("TELESCOP", "")).strip().upper() != ic.TELESCOP:
        return False  # only ISO files are opened past their primary header
    with fits.open(io.BytesIO(data), memmap=False) as hdul:
        return any(h.name.upper() == ISOCAM_EOH_ROOT for h in hdul[1:])


def gunzip(data: bytes, *, max_bytes: int = DEFAULT_MAX_GUNZIP_BYTES) -> bytes:
    """The decompressed bytes of a gzip file (every member); ValueError when the stream is
    corrupt or truncated, or when it would expand beyond `max_bytes`."""
    out = bytearray()
    rest = data
    while rest.startswith(GZIP_MAGIC):
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            # max_length stops a small file that expands hugely before it fills the memory
            out += inflater.decompress(rest, max_bytes - len(out) + 1)
        except zlib.error as exc:
            raise ValueError(f"corrupt gzip data ({exc}); re-download the file") from exc
        if len(out) > max_bytes:
            raise ValueError(
                f"gzip file expands to more than {max_bytes} bytes (the ingest limit, "
                "max_gunzip_mb): decompress it before submitting, or raise the limit"
            )
        if not inflater.eof:
            raise ValueError(
                f"truncated gzip file: the compressed stream ends after {len(data)} bytes "
                f"({len(out)} bytes decompressed); re-download it"
            )
        rest = inflater.unused_data  # a next member, or padding (ignored)
    return bytes(out)


def _ccsds_chain(data: bytes) -> bool:
    """True when the file opens with CCSDS telemetry packets: the first packets' primary
    headers say version 0, type telemetry, and their lengths chain inside the file (ending
    exactly at its end if it holds fewer than `CCSDS_PROBE_PACKETS` packets)."""
    pos, n = 0, len(data)
    for _ in range(CCSDS_PROBE_PACKETS):
        if n - pos < ccsds.PRIMARY_HEADER_BYTES:
            return False
        ph = ccsds.PrimaryHeader.unpack(data, pos)
        if ph.version != 0 or ph.packet_type != 0:
            return False
        pos += ph.packet_bytes
        if pos > n:
            return False
        if pos == n:
            return True
    return True


@dataclass(frozen=True, slots=True)
class Recognised:
    """A submitted file as ingest sees it: what it is, and its name and bytes after any
    gzip decompression (".gz" dropped from the name)."""

    kind: InputKind
    header: fits.Header | None  #: primary header of a FITS file
    name: str
    data: bytes
    gzipped: bool = False


def recognise(
    name: str, data: bytes, *, max_gunzip_bytes: int = DEFAULT_MAX_GUNZIP_BYTES
) -> Recognised:
    """Recognise a submitted file, decompressing gzip first; raises ValueError saying what is
    wrong or what was expected."""
    if not data:
        raise ValueError("file is empty")
    if not data.startswith(GZIP_MAGIC):
        kind, header = classify(name, data)
        return Recognised(kind, header, name, data)
    inner = gunzip(data, max_bytes=max_gunzip_bytes)
    if not inner:
        raise ValueError("gzip file holds no data")
    if inner.startswith(GZIP_MAGIC):
        raise ValueError("gzip file holds another gzip file: decompress it once before submitting")
    inner_name = name[:-3] if name.lower().endswith(".gz") else name
    kind, header = classify(inner_name, inner)
    return Recognised(kind, header, inner_name, inner, gzipped=True)


#: Archive containers a download may come as: (magic, offset, name).
_ARCHIVE_MAGIC = ((b"PK\x03\x04", 0, "zip"), (b"ustar", 257, "tar"), (b"BZh", 0, "bzip2"),
                  (b"\xfd7zXZ\x00", 0, "xz"), (b"7z\xbc\xaf\x27\x1c", 0, "7z"))


def _archive_kind(data: bytes) -> str:
    """'zip', 'tar', ... when `data` is an archive container (not a FITS or telemetry
    file), else ''."""
    for magic, offset, kind in _ARCHIVE_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return kind
    return ""


def classify(name: str, data: bytes) -> tuple[InputKind, fits.Header | None]:
    """Recognise a submitted file (gzip is decompressed and its content recognised; use
    `recognise` to get the decompressed bytes); raises ValueError saying what was expected."""
    if not data:
        raise ValueError("file is empty")
    if data.startswith(GZIP_MAGIC):
        r = recognise(name, data)
        return r.kind, r.header
    if data.startswith(FITS_MAGIC):
        fitscheck.check_fits(data)  # whole and readable, before any header is trusted
        header = _primary_header(data)
        if "CALTYPE" in header:
            return InputKind.CALIBRATION, header
        if str(header.get("TELESCOP", "")).upper() == tv.TELESCOP or "ATTITUDE" in name.upper():
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                names = {h.name.upper() for h in hdul}
            if names & {"ATTITUDE", "HOUSEKEEPING"} or "ATTITUDE" in name.upper():
                return InputKind.TAUVEX_ATTITUDE, header
        if _is_isocam_eoh(header, data):
            return InputKind.ISOCAM_EOH, header
        try:
            spitzer = mips.recognise_spitzer_fits(name, header) is not None
        except mips.SpitzerNameMismatchError:
            spitzer = True  # a Spitzer file with a problem: grouping reports it
        if spitzer:
            return InputKind.SPITZER_FITS, header
        raise ValueError(
            "FITS file not recognised: expected a Spitzer raw/BCD product (TELESCOP='Spitzer'), "
            "a calibration file (CALTYPE keyword), a TAUVEX attitude table or an ISOCAM EOH "
            "table (EXTNAME EOHC)"
        )
    # an archive's members could hold any sync word: it is named before they are looked for
    archive = _archive_kind(data)
    if archive:
        raise ValueError(f"a {archive} archive: unpack it and submit the folder (skybus run "
                         "reads folders recursively)")
    # before CCSDS: the ISOCAM sync word 1A CF FC 1D would pass the CCSDS version check
    if _is_isocam_tdf(data):
        return InputKind.ISOCAM_TDF, None
    if tv.SYNC_WORD in data[: 4 * tv.FRAME_BYTES]:
        return InputKind.TAUVEX_LEVEL0, None
    # CCSDS packets from the first byte, or (first packet damaged) a CRC-valid MIPS packet
    # near the start: the splitter then reports the damage
    if _ccsds_chain(data) or mips.first_valid_packet(data) is not None:
        return InputKind.MIPS_TELEMETRY, None
    raise ValueError(
        "unrecognised input: not FITS (or gzip FITS), not CCSDS telemetry (MIPS), no TAUVEX "
        "sync word and no ISOCAM TDF buffer (sync 1ACFFC1D + ICAM); "
        "see `skybus run --help` for what can be submitted"
    )


@dataclass(slots=True)
class SpitzerMember:
    """One per-DCE product with its companion files (role -> file name)."""

    primary: str
    kind: str
    expid: int
    dcenum: int
    companions: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class SpitzerProblem:
    name: str
    reason: str


@dataclass(slots=True)
class SpitzerSets:
    #: (instrument, channel, aorkey, "bcd"|"raw") -> members sorted by (expid, dcenum)
    groups: dict[tuple[str, int, int, str], list[SpitzerMember]]
    #: files that cannot be used (dead letters)
    problems: list[SpitzerProblem]
    #: known Spitzer products the pipeline does not use (logged, not dead-lettered)
    ignored: list[SpitzerProblem] = field(default_factory=list)
    #: (instrument, channel, aorkey) -> post-BCD mosaic files by role (maic, munc, mcov)
    mosaics: dict[tuple[str, int, int], dict[str, str]] = field(default_factory=dict)

    def aor_channels(self) -> dict[tuple[str, int], tuple[int, ...]]:
        """(instrument, aorkey) -> channels that have a group or a post-BCD mosaic: the bands
        whose mosaics are band-merged (as `aor_channels` of the telemetry path)."""
        out: dict[tuple[str, int], set[int]] = defaultdict(set)
        for inst, ch, aor, _level in self.groups:
            out[(inst, aor)].add(ch)
        for inst, ch, aor in self.mosaics:
            out[(inst, aor)].add(ch)
        return {k: tuple(sorted(v)) for k, v in out.items()}


def _identity(name: str, header: fits.Header) -> tuple[str, int, int, int, int, str] | str:
    """(instrument, channel, aorkey, expid, dcenum, type) of a per-DCE Spitzer file, or the
    reason it cannot be used."""
    try:
        info = mips.recognise_spitzer_fits(name, header)
    except mips.SpitzerNameMismatchError as exc:
        return str(exc)
    except (TypeError, ValueError) as exc:
        return f"bad identity keyword ({exc})"
    if info is None:
        return (
            "missing identity: need TELESCOP, INSTRUME, CHNLNUM, AORKEY, EXPID, DCENUM in "
            "the header or a Spitzer file name"
        )
    if info.dcenum is None:
        return (f"post-BCD product '{info.product_type}' without a Spitzer post-BCD name: "
                "name it SPITZER_<M|I><ch>_<aorkey>_<expid>_<ver>_E<ens>_<type>.fits")
    return (info.instrument, info.channel, info.aorkey, info.expid, info.dcenum, info.product_type)


_Dce = tuple[str, int, int, int, int]  #: (instrument, channel, aorkey, expid, dcenum)


def _dce_text(dce: _Dce) -> str:
    inst, ch, aor, expid, dcenum = dce
    return f"{inst} ch{ch} AOR {aor} EXPID {expid} DCENUM {dcenum}"


#: What usually makes two files claim one per-DCE product.
_DCE_DUPLICATE_HINT = (" (a bunc or mask with a name or header that does not say so is the usual "
                       "cause: give the files their Spitzer names, *_bcd/_bunc/_bbmsk.fits)")


def _duplicates(what: str, names: list[str], hint: str = "") -> list[SpitzerProblem]:
    """One problem per file when several files claim to be the same product (`what`)."""
    out = []
    for name in names:
        others = ", ".join(n for n in names if n != name)
        out.append(SpitzerProblem(
            name, f"{name}: {others} also claim(s) to be the {what}; none of them is used. "
                  f"Keep one and submit again{hint}"))  # fmt: skip
    return out


def group_spitzer_files(files: list[tuple[str, fits.Header | None]]) -> SpitzerSets:
    """Group archive files per AOR + channel; attach bunc/mask/fbcd companions to their BCD
    (a frame that comes only as the median-filtered fbcd, with no bcd, is that fbcd).

    Of two Spitzer-named versions of one product (an archive reprocessing: `_1_` and `_2_`)
    the newer is used and the older logged; other files that claim to be the same product of
    the same DCE are both reported (neither is used), never one silently replacing the
    other; a BCD without a usable celestial WCS is reported; known products the pipeline does
    not use (ebcd, brmsk) are listed in `ignored`.
    """
    problems: list[SpitzerProblem] = []
    ignored: list[SpitzerProblem] = []
    claims: dict[tuple[_Dce, str], list[tuple[str, str]]] = defaultdict(list)
    pbcd: list[tuple[str, fits.Header | None]] = []
    for name, header in files:
        if _is_pbcd(name):
            pbcd.append((name, header))
            continue
        ident = _identity(name, header if header is not None else fits.Header())
        if isinstance(ident, str):
            problems.append(SpitzerProblem(name, f"{name}: {ident}"))
            continue
        inst, ch, aor, expid, dcenum, kind = ident
        if kind in PRIMARY_BCD_TYPES or kind in RAW_TYPES:
            role = "bcd" if kind in PRIMARY_BCD_TYPES else "raw"
        elif kind in UNC_TYPES:
            role = "bunc"
        elif kind in MASK_TYPES:
            role = "mask"
        elif kind in FILTERED_TYPES:
            role = "fbcd"
        elif kind in UNUSED_TYPES:
            ignored.append(
                SpitzerProblem(name, f"{name}: Spitzer '{kind}' product, not used by the pipeline")
            )
            continue
        else:
            problems.append(
                SpitzerProblem(name, f"{name}: unknown Spitzer product type '{kind}' (skipped)")
            )
            continue
        claims[((inst, ch, aor, expid, dcenum), role)].append((name, kind))
    for dce, role in [k for k in claims if k[1] == "fbcd"]:
        # a Ge download may hold only the median-filtered BCDs (the handbook's choice for
        # point sources): then the fbcd is the frame
        if (dce, "bcd") not in claims:
            claims[(dce, "bcd")] = claims.pop((dce, role))
    for key, claimants in claims.items():
        # an IRAC download holds each frame twice, as bcd and as the artifact-corrected cbcd
        # (each with its unc): the corrected one is used, the other logged
        kinds = {k for _, k in claimants}
        for preferred, other in CORRECTED_OVER_PLAIN:
            if preferred in kinds and other in kinds:
                for name, kind in claimants:
                    if kind == other:
                        ignored.append(SpitzerProblem(
                            name, f"{name}: superseded by the artifact-corrected "
                                  f"'{preferred}' of the same frame"))  # fmt: skip
                claimants = [c for c in claimants if c[1] != other]
        claims[key] = claimants
        # archive reprocessings of one product: the newest version is used
        newest = _newest_version([n for n, _ in claimants])
        if newest is not None:
            for name, _kind in claimants:
                if name != newest:
                    ignored.append(SpitzerProblem(
                        name, f"{name}: superseded by {newest}, a newer version of the same "
                              "product"))  # fmt: skip
            claims[key] = [c for c in claimants if c[0] == newest]
    primaries: dict[tuple[_Dce, str], SpitzerMember] = {}
    not_used: set[_Dce] = set()  # DCEs whose BCD was reported: their companions go too
    headers = dict(files)
    for (dce, role), claimants in claims.items():
        if role not in ("bcd", "raw"):
            continue
        if len(claimants) > 1:
            problems += _duplicates(f"{role.upper()} of {_dce_text(dce)}",
                                    [n for n, _ in claimants], _DCE_DUPLICATE_HINT)
            not_used.add(dce)
            continue
        name, kind = claimants[0]
        header = headers.get(name)
        if role == "bcd" and header is not None:
            wcs = fitsio.celestial_wcs_problem(header)
            if wcs is not None:
                problems.append(SpitzerProblem(
                    name, f"{name}: the BCD has no usable celestial WCS ({wcs}); it cannot be "
                          "mosaicked: re-download it or repair its header",
                ))  # fmt: skip
                not_used.add(dce)
                continue
        primaries[(dce, role)] = SpitzerMember(name, kind, dce[3], dce[4])
    for (dce, role), claimants in claims.items():
        if role in ("bcd", "raw"):
            continue
        names = [n for n, _ in claimants]
        member = primaries.get((dce, "bcd"))
        if len(claimants) > 1:
            problems += _duplicates(f"{role} of {_dce_text(dce)}", names, _DCE_DUPLICATE_HINT)
        elif member is not None:
            member.companions[role] = names[0]
        elif dce in not_used:
            problems.append(
                SpitzerProblem(
                    names[0],
                    f"{names[0]}: {role} of a BCD that is not used (see its dead letter); skipped",
                )
            )
        else:
            problems.append(SpitzerProblem(
                names[0], f"{names[0]}: {role} without its BCD (skipped); submit it with its "
                          "BCD (if the BCD was dead-lettered, see why)",
            ))  # fmt: skip
    groups: dict[tuple[str, int, int, str], list[SpitzerMember]] = defaultdict(list)
    for ((inst, ch, aor, _e, _d), role), member in primaries.items():
        groups[(inst, ch, aor, role)].append(member)
    for members in groups.values():
        members.sort(key=lambda m: (m.expid, m.dcenum))
    with_bcds = {(inst, ch, aor) for inst, ch, aor, level in groups if level == "bcd"}
    mosaics = _group_pbcd(pbcd, with_bcds, problems, ignored)
    return SpitzerSets(dict(groups), problems, ignored, mosaics)


def _newest_version(names: list[str]) -> str | None:
    """Of several Spitzer-named files of one product, the one with the highest version
    number, when every one has a Spitzer name and their versions differ; else None."""
    if len(names) < 2:
        return None
    versions = []
    for name in names:
        try:
            info = mips.recognise_spitzer_fits(name)
        except mips.SpitzerNameMismatchError:
            return None
        if info is None or info.version is None:
            return None
        versions.append(info.version)
    if len(set(versions)) < len(versions):
        return None
    return names[versions.index(max(versions))]


def _is_pbcd(name: str) -> bool:
    """A Spitzer-named post-BCD product (its name and header are checked by `_group_pbcd`)."""
    try:
        info = mips.recognise_spitzer_fits(name)
    except mips.SpitzerNameMismatchError:
        return False
    return info is not None and info.level == "pbcd"


def _group_pbcd(
    files: list[tuple[str, fits.Header | None]],
    with_bcds: set[tuple[str, int, int]],
    problems: list[SpitzerProblem],
    ignored: list[SpitzerProblem],
) -> dict[tuple[str, int, int], dict[str, str]]:
    """Post-BCD mosaics (maic with its munc and mcov) per instrument, channel and AOR; they
    enter at the mosaic level, for extraction. A band whose BCDs were submitted too is
    mosaicked from them (its post-BCD files are logged, not used); two files claiming one
    product, a maic without a usable celestial WCS, a munc or mcov without its maic are
    reported."""
    claims: dict[tuple[tuple[str, int, int], str], list[str]] = defaultdict(list)
    headers = dict(files)
    for name, header in files:
        try:
            info = mips.recognise_spitzer_fits(name, header)
        except mips.SpitzerNameMismatchError as exc:
            problems.append(SpitzerProblem(name, f"{name}: {exc}"))
            continue
        assert info is not None
        role = info.product_type
        band = (info.instrument, info.channel, info.aorkey)
        if role not in PBCD_TYPES:
            ignored.append(SpitzerProblem(
                name, f"{name}: post-BCD '{info.product_type}' product, not used by the "
                      "pipeline (maic, munc and mcov are)"))  # fmt: skip
        elif band in with_bcds:
            ignored.append(SpitzerProblem(
                name, f"{name}: the BCDs of {info.instrument} ch{info.channel} AOR "
                      f"{info.aorkey} were submitted too: the mosaic is built from them"))
        else:
            claims[(band, role)].append(name)
    mosaics: dict[tuple[str, int, int], dict[str, str]] = {}
    for (band, role), names in sorted(claims.items(), key=lambda kv: kv[0][1] != "maic"):
        if len(names) > 1:
            inst, ch, aor = band
            problems += _duplicates(f"{role} of {inst} ch{ch} AOR {aor}", names)
            continue
        name = names[0]
        if role == "maic":
            header = headers.get(name)
            wcs = fitsio.celestial_wcs_problem(header) if header is not None else "no header"
            if wcs is not None:
                problems.append(SpitzerProblem(
                    name, f"{name}: the mosaic has no usable celestial WCS ({wcs}): repair "
                          "its header or re-download it"))  # fmt: skip
                continue
            assert header is not None
            if not bcd.is_mjy_per_sr(header.get("BUNIT")):
                problems.append(SpitzerProblem(
                    name, f"{name}: BUNIT {header.get('BUNIT')!r}: the mosaic must be in MJy/sr "
                          "(set BUNIT = 'MJy/sr' if it is)"))  # fmt: skip
                continue
            mosaics[band] = {"maic": name}
        elif band in mosaics:
            mosaics[band][role] = name
        else:
            problems.append(SpitzerProblem(
                name, f"{name}: {role} without its maic (skipped): submit it with the "
                      "mosaic image"))  # fmt: skip
    return mosaics
