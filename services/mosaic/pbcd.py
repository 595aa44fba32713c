"""Post-BCD mosaic products: `maic` image, `munc` uncertainty and `mcov` coverage HDU lists.

Each product is a primary image HDU with the mosaic's TAN WCS, BUNIT, the mission keywords
copied from a template BCD header (TELESCOP, INSTRUME, CHNLNUM, AORKEY ...), NFRAMES, the
step's parameters and a HISTORY record of the inputs; the image product also carries a
PROVENANCE binary table (one row per input frame: name, DCENUM, used, offset subtracted,
outliers rejected, unc scale) in the way Gemini DRAGONS keeps provenance.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from services.mosaic.coadd import Mosaic

#: Keywords copied from the template (first input BCD) when present.
_COPIED = (
    "TELESCOP",
    "INSTRUME",
    "CHNLNUM",
    "AORKEY",
    "EXPID",
    "AOT_TYPE",
    "AORLABEL",
    "OBJECT",
    "PROGID",
    "FOVID",
    "DATE_OBS",
    "MJD_OBS",
    "SCLK_OBS",
    "EXPTIME",
    "FLUXCONV",
    "EQUINOX",
)

_KINDS = {
    "maic": ("mosaic image (surface brightness)", True),
    "munc": ("mosaic uncertainty (1 sigma)", True),
    "mcov": ("mosaic coverage (frames per output pixel)", False),
}


def _header(mosaic: Mosaic, template: fits.Header, creator: str, kind: str) -> fits.Header:
    what, has_unit = _KINDS[kind]
    h = fits.Header()
    for key in _COPIED:
        if key in template:
            h[key] = (template[key], template.comments[key])
    h["CREATOR"] = (creator, "software that made this product")
    h["FILETYPE"] = (kind, what)
    for card in mosaic.header.cards:
        if card.keyword in ("NAXIS", "NAXIS1", "NAXIS2", "BUNIT"):
            continue
        h[card.keyword] = (card.value, card.comment)
    if has_unit:
        h["BUNIT"] = (mosaic.bunit, "unit of the data")
    h["NFRAMES"] = (mosaic.n_frames_used, "number of input frames coadded")
    h["NFRAMIN"] = (mosaic.n_frames_in, "number of input frames given")
    h["NOUTLIER"] = (mosaic.n_outliers, "input pixels rejected as outliers (rmask)")
    used = mosaic.used
    offsets = mosaic.offsets_mjysr[used]
    h["OFFSRMS"] = (
        float(np.sqrt(np.mean(offsets**2))) if offsets.size else 0.0,
        "rms of offsets subtracted (BUNIT)",
    )
    p = mosaic.parameters
    h["MATCHBKG"] = (bool(p.get("match_background", False)), "overlap background matching")
    sigma = p.get("outlier_sigma")
    h["OUTLSIG"] = (
        float(sigma) if isinstance(sigma, int | float) else -1.0,
        "outlier clip threshold (sigma; -1 = off)",
    )
    h["SELFFLAT"] = (bool(p.get("self_flat", False)), "self-flat divided through")
    fatal = p.get("fatal_bits", 0)
    h["FATALBIT"] = (int(fatal) if isinstance(fatal, int) else 0, "mask bits treated as no data")
    h["DROPDCE0"] = (bool(p.get("drop_first_dce", False)), "DCENUM 0 frames skipped")
    h["WEIGHTNG"] = (str(p.get("weighting", "")), "coadd weighting")
    pixfrac = p.get("pixfrac", 1.0)
    h["PIXFRAC"] = (
        float(pixfrac) if isinstance(pixfrac, int | float) else 1.0,
        "drizzle footprint shrink factor",
    )
    h.add_history(f"{creator}: coadd of {mosaic.n_frames_used} of {mosaic.n_frames_in} frames")
    for key, u, off, nrej in zip(
        mosaic.frame_keys, used, mosaic.offsets_mjysr, mosaic.outliers_per_frame, strict=True
    ):
        if u:
            h.add_history(f"input {key} offset {off:+.5g} outliers {int(nrej)}")
        else:
            h.add_history(f"input {key} not used")
    for note in mosaic.notes:
        h.add_history(note)
    return h


def _provenance(mosaic: Mosaic) -> fits.BinTableHDU:
    names = [k.encode("ascii", "replace") for k in mosaic.frame_keys]
    width = max([1, *(len(n) for n in names)])
    cols = [
        fits.Column(name="FRAME", format=f"{width}A", array=np.array(names)),
        fits.Column(name="USED", format="L", array=mosaic.used),
        fits.Column(
            name="OFFSET", format="D", unit=mosaic.bunit, array=np.nan_to_num(mosaic.offsets_mjysr)
        ),
        fits.Column(name="NOUTLIER", format="K", array=mosaic.outliers_per_frame),
        fits.Column(name="UNCSCALE", format="D", array=mosaic.unc_scale),
    ]
    hdu = fits.BinTableHDU.from_columns(cols, name="PROVENANCE")
    hdu.header["COMMENT"] = "one row per input frame; OFFSET was subtracted from the frame"
    return hdu


def mosaic_hdus(
    mosaic: Mosaic, *, template_header: fits.Header, creator: str
) -> dict[str, fits.HDUList]:
    """The mosaic as FITS products: {"maic": image, "munc": uncertainty, "mcov": coverage}.

    `template_header` is one input BCD header (mission keywords are copied from it);
    `creator` names the software and version (CREATOR). Images are float32, NaN where no
    frame contributes; every product passes `fitsverify`.
    """
    out: dict[str, fits.HDUList] = {}
    planes = {"maic": mosaic.image, "munc": mosaic.unc, "mcov": mosaic.coverage}
    for kind, plane in planes.items():
        hdu = fits.PrimaryHDU(
            data=np.asarray(plane, dtype=np.float32),
            header=_header(mosaic, template_header, creator, kind),
        )
        hdus = [hdu]
        if kind == "maic":
            hdus.append(_provenance(mosaic))
        out[kind] = fits.HDUList(hdus)
    return out
