"""ISOCAM ingest (TDF_First_Scan): a revolution's TDF + EOH -> one CTDF slice per observation.

Checks every 8192-byte buffer (sync, ident, revolution, checksum, counter continuity), derives
the revolution's clock calibration (CAMITK0/CAMUTK0, ITK unit) from the F1 housekeeping, and
splits the good buffers into observations using the EOH table. Bad buffers are counted and
reported as `Problem`s, never silently dropped, and never stop the rest of the revolution.
A slice is stored as a FITS file (CTDF + 8-digit observation number): see `TdfObservation`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numpy.typing import NDArray

from shared import fitsio
from shared.instruments import isocam as ic
from shared.instruments.isocam import Problem

__all__ = ["HOUSEKEEPING_ONLY", "ClockCalibration", "EohError", "IngestResult", "NotTdfError",
           "Problem", "TdfObservation", "read_eoh", "split_tdf"]

EOH_COLUMNS = ("OBSNUM", "UTKSTART", "UTKEND")
#: Reason of the `Problem` that counts buffers between observations: expected in every
#: revolution (slews, idle time), so callers may report it without treating it as a defect.
HOUSEKEEPING_ONLY = "buffers outside any EOH observation (housekeeping only, not sliced)"


class NotTdfError(ValueError):
    """The input is not an ISOCAM TDF (no 8192-byte buffers starting with the sync word)."""


class EohError(ValueError):
    """The EOH input cannot be read or lacks the observation boundary columns."""


@dataclass(frozen=True, slots=True)
class ClockCalibration:
    """TDF_First_Scan clock calibration, valid for the whole revolution."""

    camitk0: int  #: ITK when the F2BOOTTI counter was reset (ITK = CAMITK0 + F2BOOTTI)
    camutk0: int  #: UTK at the same instant
    itk_unit_s: float  #: fitted ITK unit (s)
    n_samples: int  #: F1 (ITK, UTK) samples used
    rms_utk: float  #: rms residual of the fit (UTK units)

    def sync_at(self, utk: int) -> ic.TimeSync:
        """TREF* for a reference instant near `utk`: integer ITK, nearest integer UTK."""
        itk = round(self.camitk0 + (utk - self.camutk0) / ic.UTK_PER_S / self.itk_unit_s)
        ref_utk = round(self.camutk0 + (itk - self.camitk0) * self.itk_unit_s * ic.UTK_PER_S)
        return ic.TimeSync(int(ref_utk), float(itk), self.itk_unit_s)


@dataclass(slots=True)
class TdfObservation:
    """The good buffers of one observation plus what Derive_ERD needs to decode them."""

    obsnum: str
    revolution: int
    utk_start: int
    utk_end: int
    clock: ClockCalibration
    buffers: NDArray[np.uint8]  #: (n, 8192) good buffers overlapping [utk_start, utk_end)
    aot: str = ""
    target: str = ""
    problems: list[Problem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ic.product_name("CTDF", self.obsnum)

    def header(self, root: str) -> fits.Header:
        """The observation's primary-header keywords (identity, times, template, clock
        reset, TREF* synchronisation) that every product of it (CTDF, CIER ...) carries."""
        h = ic.base_header(obsnum=self.obsnum, revolution=self.revolution, root=root)
        h["UTKSTART"] = (self.utk_start, "UTK of the observation start (EOH)")
        h["UTKEND"] = (self.utk_end, "UTK of the observation end (EOH)")
        h["DATE-OBS"] = (ic.utk_to_isot(self.utk_start), "UTC start")
        h["DATE-END"] = (ic.utk_to_isot(self.utk_end), "UTC end")
        h["AOT"] = (self.aot, "observing template")
        h["OBJECT"] = (self.target, "target name")
        h["CAMITK0"] = (self.clock.camitk0, "ITK at reset of the F2BOOTTI counter")
        h["CAMUTK0"] = (self.clock.camutk0, "UTK at reset of the F2BOOTTI counter")
        for k, v, c in self.clock.sync_at(self.utk_start).header_cards():
            h[k] = (v, c)
        return h

    def to_bytes(self) -> bytes:
        """CTDF FITS: primary header (OBSNUM, clock, TREF*) + BINTABLE of raw buffers."""
        h = self.header("CTDF")
        h["CLKITKU"] = (self.clock.itk_unit_s, "[s] ITK unit fitted over the revolution")
        h["CLKRMS"] = (round(self.clock.rms_utk, 4), "[UTK] rms of the clock fit")
        h["NBUFFERS"] = (int(self.buffers.shape[0]), "good TDF buffers in this slice")
        h["NPROBLEM"] = (sum(p.count for p in self.problems), "defects counted in this slice")
        for p in self.problems[:20]:
            h.add_comment(f"problem: {p}"[:72])
        hdr = np.ascontiguousarray(self.buffers[:, :ic.HEADER_BYTES]).view(ic.BUFFER_HEADER)
        cols = [
            fits.Column("BUFCOUNT", "J", array=hdr["bufcount"].ravel().astype(np.int64)),
            fits.Column("UTK", "J", unit="1/24 s", array=hdr["utk"].ravel().astype(np.int64)),
            fits.Column("BUFFER", f"{ic.BUFFER_BYTES}B", array=self.buffers),
        ]
        hdul = ic.table_product(h, cols, root="CTDF")
        buf = io.BytesIO()
        hdul.writeto(buf, checksum=True)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TdfObservation:
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            h = hdul[0].header
            if not str(h.get("FILENAME", "")).startswith("CTDF"):
                raise ValueError("not a CTDF observation slice (FILENAME does not start CTDF)")
            bufs = np.asarray(hdul[1].data["BUFFER"], dtype=np.uint8).reshape(-1, ic.BUFFER_BYTES)
            clock = ClockCalibration(int(h["CAMITK0"]), int(h["CAMUTK0"]), float(h["CLKITKU"]),
                                     0, float(h["CLKRMS"]))
            return cls(str(h["OBSNUM"]), int(h["REVOLUTN"]), int(h["UTKSTART"]),
                       int(h["UTKEND"]), clock, bufs.copy(), str(h["AOT"]), str(h["OBJECT"]))


@dataclass(slots=True)
class IngestResult:
    """Output of `split_tdf`: observations plus an account of every buffer."""

    observations: list[TdfObservation]
    problems: list[Problem]
    clock: ClockCalibration
    revolution: int
    n_buffers: int  #: complete 8192-byte buffers in the input
    n_good: int  #: buffers that passed every check
    n_bad_checksum: int
    n_bad_sync: int


def read_eoh(eoh: bytes) -> Table:
    """EOH FITS bytes -> Table (OBSNUM str, UTKSTART, UTKEND int) sorted by UTKSTART."""
    tab = fitsio.read_bintable(eoh, required=EOH_COLUMNS, what="EOH input", error=EohError)
    tab["OBSNUM"] = [str(s.decode() if isinstance(s, bytes) else s).strip()
                     for s in tab["OBSNUM"]]
    bad = [s for s in tab["OBSNUM"] if not (s.isdigit() and len(s) == 8)]
    if bad:
        raise EohError(f"EOH observation numbers must have 8 digits: {bad[:5]}")
    tab.sort("UTKSTART")
    return tab


def _first(idx: NDArray[np.integer]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.asarray(idx)[:10])


def clock_calibration(f1: NDArray, utk: NDArray[np.integer]) -> ClockCalibration:
    """Fit UTK = a + b ITK over the F1 samples; CAMITK0 from ITK - BOOTTI after the reset.

    F1 ITK is the instrument clock truncated at the buffer's UTK instant, so the sample is
    taken at ITK + 0.5 (unbiased).
    """
    itk = f1["itk"].astype(np.float64) + 0.5
    u = np.asarray(utk, dtype=np.float64)
    if itk.size < 2:
        raise ValueError("fewer than two F1 housekeeping samples: no clock calibration")
    x0 = itk.mean()
    b, a = np.polyfit(itk - x0, u, 1)
    rms = float(np.std(u - (a + b * (itk - x0))))
    after = f1["bootti"] > 0
    if not after.any():
        raise ValueError("the F2BOOTTI counter never runs in this TDF: no CAMITK0")
    camitk0 = int(np.median(f1["itk"][after].astype(np.int64) - f1["bootti"][after]))
    camutk0 = round(a + b * (camitk0 - x0))
    return ClockCalibration(camitk0, int(camutk0), float(b / ic.UTK_PER_S), int(itk.size), rms)


def split_tdf(tdf: bytes, eoh: bytes) -> IngestResult:
    """TDF_First_Scan: check buffers, calibrate the clock, split the revolution by the EOH.

    `tdf` is the revolution's telemetry (8192-byte buffers, aligned at the start); `eoh` the
    EOH table (FITS: OBSNUM, UTKSTART, UTKEND in UTK). Raises `NotTdfError` (a ValueError) when
    fewer than half of the buffers carry the sync word and ident, `EohError` when the EOH
    cannot be read. Every other defect is a counted `Problem`.
    """
    problems: list[Problem] = []
    n_full, rest = divmod(len(tdf), ic.BUFFER_BYTES)
    if n_full == 0:
        raise NotTdfError(f"input of {len(tdf)} bytes holds no complete {ic.BUFFER_BYTES}-byte "
                          "ISOCAM TDF buffer")
    if rest:
        problems.append(Problem(f"truncated final buffer ({rest} of {ic.BUFFER_BYTES} bytes) "
                                "dropped", 1, (n_full,)))
    buf = np.frombuffer(tdf, dtype=np.uint8, count=n_full * ic.BUFFER_BYTES)
    buf = buf.reshape(n_full, ic.BUFFER_BYTES)
    hdr = np.ascontiguousarray(buf[:, :ic.HEADER_BYTES]).view(ic.BUFFER_HEADER).ravel()
    sync_ok = (hdr["sync"] == ic.SYNC) & (hdr["ident"] == ic.IDENT)
    if sync_ok.mean() < 0.5:
        raise NotTdfError(
            f"only {int(sync_ok.sum())} of {n_full} {ic.BUFFER_BYTES}-byte buffers start with the "
            f"ISOCAM sync {ic.SYNC.hex().upper()} + {ic.IDENT.decode()}: not a TDF (or not "
            "aligned)")
    eoh_tab = read_eoh(eoh)
    if (~sync_ok).any():
        bad = np.nonzero(~sync_ok)[0]
        problems.append(Problem("bad sync/ident (buffer skipped)", int(bad.size), _first(bad)))
    revolution = int(np.bincount(hdr["revolution"][sync_ok].astype(np.int64)).argmax())
    wrong_rev = sync_ok & (hdr["revolution"] != revolution)
    if wrong_rev.any():
        problems.append(Problem(f"revolution differs from {revolution} (buffer skipped)",
                                int(wrong_rev.sum()), _first(np.nonzero(wrong_rev)[0])))
    csum_bad = sync_ok & (ic.buffer_checksum(buf) != hdr["checksum"])
    if csum_bad.any():
        problems.append(Problem("bad checksum (buffer skipped)", int(csum_bad.sum()),
                                _first(np.nonzero(csum_bad)[0])))
    good = sync_ok & ~wrong_rev & ~csum_bad
    gidx = np.nonzero(good)[0]
    counts = hdr["bufcount"][gidx].astype(np.int64)
    gaps = np.diff(counts) - 1
    if (gaps > 0).any():
        problems.append(Problem("buffer counter gaps (buffers missing from the TDF)",
                                int(gaps[gaps > 0].sum()), _first(gidx[1:][gaps > 0])))
    if (gaps < 0).any():
        problems.append(Problem("buffer counter not increasing", int((gaps < 0).sum()),
                                _first(gidx[1:][gaps < 0])))
    blocks = ic.parse_blocks(buf[gidx])
    if blocks.malformed_buffer.size:
        problems.append(Problem("malformed block chain (rest of buffer skipped)",
                                int(blocks.malformed_buffer.size),
                                _first(gidx[blocks.malformed_buffer])))
    clock = clock_calibration(blocks.f1, hdr["utk"][gidx[blocks.f1_buffer]])

    utk_buf = hdr["utk"][gidx].astype(np.int64)
    in_any = np.zeros(gidx.size, dtype=bool)
    observations: list[TdfObservation] = []
    for row in eoh_tab:  # a handful of observations per revolution
        u0, u1 = int(row["UTKSTART"]), int(row["UTKEND"])
        sel = (utk_buf + ic.UTK_PER_BUFFER > u0) & (utk_buf < u1)
        in_any |= sel
        obsnum = str(row["OBSNUM"])
        obs_problems = [Problem(p.reason, int(np.count_nonzero((b >= u0) & (b < u1))), (),
                                obsnum)
                        for p, b in _problem_utks(problems, hdr) if
                        np.count_nonzero((b >= u0) & (b < u1))]
        if not sel.any():
            obs_problems.append(Problem("no good buffer in the observation's UTK range", 1, (),
                                        obsnum))
        observations.append(TdfObservation(
            obsnum, revolution, u0, u1, clock, np.ascontiguousarray(buf[gidx[sel]]),
            _text(row, "AOT"), _text(row, "OBJECT"), obs_problems))
    if (~in_any).any():
        problems.append(Problem(HOUSEKEEPING_ONLY, int((~in_any).sum()), _first(gidx[~in_any])))
    return IngestResult(observations, problems, clock, revolution, n_full, int(good.sum()),
                        int(csum_bad.sum()), int((~sync_ok).sum()))


def _text(row: object, name: str) -> str:
    try:
        v = row[name]  # type: ignore[index]
    except KeyError:
        return ""
    return str(v.decode() if isinstance(v, bytes) else v).strip()


def _problem_utks(problems: list[Problem], hdr: NDArray) -> list[tuple[Problem, NDArray]]:
    """UTK of the first buffers each buffer-level problem names (to attribute it to an obs)."""
    out = []
    for p in problems:
        idx = np.asarray([i for i in p.first_buffers if i < hdr.size], dtype=np.int64)
        if idx.size:
            out.append((p, hdr["utk"][idx].astype(np.int64)))
    return out
