"""What a submitted file is: MIPS telemetry, Spitzer archive FITS, calibration FITS, TAUVEX,
ISOCAM TDF + EOH.

Recognition goes by content first (FITS header keywords, telemetry sync patterns), then by
the mission's file-naming rules; names alone are never trusted for FITS.
"""

from __future__ import annotations

import enum
import io
from collections import defaultdict
from dataclasses import dataclass, field

from astropy.io import fits

from services.ingest import mips
from shared.instruments import isocam as ic
from shared.instruments import tauvex as tv

FITS_MAGIC = b"SIMPLE  ="
CCSDS_VERSION_MASK = 0xE0

BCD_TYPES = {"bcd", "cbcd", "fbcd", "ebcd"}
UNC_TYPES = {"bunc", "cbunc"}
MASK_TYPES = {"bbmsk", "bmask", "bimsk", "brmsk"}
RAW_TYPES = {"raw", "dce"}


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
            return hdul[0].header.copy()
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


def classify(name: str, data: bytes) -> tuple[InputKind, fits.Header | None]:
    """Recognise a submitted file; raises ValueError saying what was expected."""
    if not data:
        raise ValueError("file is empty")
    if data.startswith(FITS_MAGIC):
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
    # before CCSDS: the ISOCAM sync word 1A CF FC 1D would pass the CCSDS version check
    if _is_isocam_tdf(data):
        return InputKind.ISOCAM_TDF, None
    if tv.SYNC_WORD in data[: 4 * tv.FRAME_BYTES]:
        return InputKind.TAUVEX_LEVEL0, None
    # CCSDS space packets: version bits 000 and a telecommand/telemetry header
    if len(data) >= 6 and data[0] & CCSDS_VERSION_MASK == 0:
        return InputKind.MIPS_TELEMETRY, None
    raise ValueError(
        "unrecognised input: not FITS, not CCSDS telemetry (MIPS), no TAUVEX sync word and no "
        "ISOCAM TDF buffer (sync 1ACFFC1D + ICAM); "
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
    problems: list[SpitzerProblem]


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
        return ("missing identity: need TELESCOP, INSTRUME, CHNLNUM, AORKEY, EXPID, DCENUM in "
                "the header or a Spitzer file name")
    if info.dcenum is None:
        return f"post-BCD product '{info.product_type}': submit the BCDs to mosaic them again"
    return (info.instrument, info.channel, info.aorkey, info.expid, info.dcenum,
            info.product_type)


def group_spitzer_files(files: list[tuple[str, fits.Header | None]]) -> SpitzerSets:
    """Group archive files per AOR + channel; attach bunc/mask companions to their BCD."""
    problems: list[SpitzerProblem] = []
    primaries: dict[tuple[str, int, int, int, int, str], SpitzerMember] = {}
    companions: list[tuple[tuple[str, int, int, int, int], str, str]] = []
    for name, header in files:
        ident = _identity(name, header if header is not None else fits.Header())
        if isinstance(ident, str):
            problems.append(SpitzerProblem(name, f"{name}: {ident}"))
            continue
        inst, ch, aor, expid, dce, kind = ident
        if kind in BCD_TYPES - {"fbcd", "ebcd"} or kind in RAW_TYPES:
            level = "bcd" if kind in BCD_TYPES else "raw"
            primaries[(inst, ch, aor, expid, dce, level)] = SpitzerMember(name, kind, expid, dce)
        elif kind in UNC_TYPES:
            companions.append(((inst, ch, aor, expid, dce), "bunc", name))
        elif kind in MASK_TYPES - {"brmsk"}:
            companions.append(((inst, ch, aor, expid, dce), "mask", name))
        else:
            problems.append(SpitzerProblem(name, f"{name}: product type '{kind}' is not used by "
                                                 "the pipeline (skipped)"))
    for (inst, ch, aor, expid, dce), role, name in companions:
        member = primaries.get((inst, ch, aor, expid, dce, "bcd"))
        if member is None:
            problems.append(SpitzerProblem(name, f"{name}: {role} without its BCD (skipped)"))
        else:
            member.companions[role] = name
    groups: dict[tuple[str, int, int, str], list[SpitzerMember]] = defaultdict(list)
    for (inst, ch, aor, _e, _d, level), member in primaries.items():
        groups[(inst, ch, aor, level)].append(member)
    for members in groups.values():
        members.sort(key=lambda m: (m.expid, m.dcenum))
    return SpitzerSets(dict(groups), problems)
