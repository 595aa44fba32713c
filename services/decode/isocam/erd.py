"""ISOCAM Derive_ERD: a CTDF observation slice -> CIER edited raw data (one row per readout)."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from services.ingest.isocam import TdfObservation
from shared.instruments import isocam as ic

VERSION = "ERD 1.0"

#: CIER columns: name, FITS format, unit.
CIER_COLUMNS = (
    ("GSCPTKEY", "J", "ITK"), ("F2BOOTTI", "J", "ITK"), ("UTK", "D", "1/24 s"),
    ("READCNT", "J", None), ("READOUT", "5A", None), ("GAIN", "I", None),
    ("TINT", "E", "s"), ("TINTITK", "I", "ITK"), ("LENS", "E", "arcsec"), ("FILTER", "6A", None),
    ("RA", "D", "deg"), ("DEC", "D", "deg"), ("ROLL", "E", "deg"),
    ("ARRAY", f"{ic.NPIX}I", "adu"),
)


def derive_erd(chunk: bytes | TdfObservation) -> fits.HDUList:
    """CTDF slice (bytes or object) -> CIER product (empty primary + BINTABLE 'CIER').

    Rows: every F2 readout (RESET and EOI) whose UTK lies in [UTKSTART, UTKEND), in ITK order;
    GSCPTKEY = CAMITK0 + F2BOOTTI; ARRAY holds the 32x32 values (ADU) as a 1024 vector, row
    major (index = 32 y + x). The primary header carries TREF*, CAMITK0/CAMUTK0 and the
    observation's instrument set-up (first readout).
    """
    obs = TdfObservation.from_bytes(chunk) if isinstance(chunk, bytes) else chunk
    blocks = ic.parse_blocks(obs.buffers)
    f2 = blocks.f2
    sync = obs.clock.sync_at(obs.utk_start)
    itk = obs.clock.camitk0 + f2["bootti"].astype(np.int64)
    utk = sync.itk_to_utk(itk.astype(np.float64))
    keep = (utk >= obs.utk_start) & (utk < obs.utk_end)
    f2, itk, utk = f2[keep], itk[keep], utk[keep]
    order = np.argsort(itk, kind="stable")
    f2, itk, utk = f2[order], itk[order], utk[order]
    dup = np.zeros(itk.size, dtype=bool)
    dup[1:] = (itk[1:] == itk[:-1]) & (f2["kind"][1:] == f2["kind"][:-1])
    f2, itk, utk = f2[~dup], itk[~dup], utk[~dup]

    h = obs.header("CIER")
    if f2.size:
        h["FILTER"] = (f2["filter"][0].decode().strip(), "LW filter")
        h["LENS"] = (f2["lens_das"][0] / 10.0, "[arcsec] pixel field of view")
        h["GAIN"] = (int(f2["gain"][0]), "electronic gain")
        h["TINT"] = (round(float(f2["tint_itk"][0]) * sync.trefitku_s, 6), "[s] integration")
    h["NREADOUT"] = (int(f2.size), "F2 readouts (RESET + EOI)")
    h["NDUPREAD"] = (int(dup.sum()), "duplicate readouts dropped")
    h["NBADCHN"] = (int(blocks.malformed_buffer.size), "buffers with a broken block chain")
    h["NBUFFERS"] = (int(obs.buffers.shape[0]), "good TDF buffers decoded")
    h["DERIVERD"] = (VERSION, "version of Derive_ERD")
    kinds = np.array([ic.READOUT_NAMES[ic.ReadoutKind(k)] for k in (0, 1)])
    data = {
        "GSCPTKEY": itk, "F2BOOTTI": f2["bootti"].astype(np.int64), "UTK": utk,
        "READCNT": f2["readcnt"].astype(np.int64), "READOUT": kinds[f2["kind"].astype(int)],
        "GAIN": f2["gain"].astype(np.int16), "TINT": f2["tint_itk"] * sync.trefitku_s,
        "TINTITK": f2["tint_itk"].astype(np.int16), "LENS": f2["lens_das"] / 10.0,
        "FILTER": np.char.strip(np.char.decode(f2["filter"], "ascii")),
        "RA": f2["ra_deg"].astype(np.float64), "DEC": f2["dec_deg"].astype(np.float64),
        "ROLL": f2["roll_deg"].astype(np.float32), "ARRAY": f2["array"].astype(np.int16),
    }
    cols = [fits.Column(n, f, unit=u, array=data[n]) for n, f, u in CIER_COLUMNS]
    return ic.table_product(h, cols, root="CIER")
