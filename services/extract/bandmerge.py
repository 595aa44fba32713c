"""Band-merging of point-source lists (24/70/160 um): positional matching and upper limits."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from services.extract.photometry import wcs_pixel_scale_arcsec
from services.extract.prfmodel import SkyPsf
from services.extract.upperlimits import UPPER_LIMIT_CONVENTION, forced_upper_limits
from shared.bcd import BCDFrame
from shared.instruments import mips

_REQUIRED = ("RA", "Dec", "delta_RA", "delta_Dec", "flux", "delta_flux")


class BandmergeError(ValueError):
    """The source lists cannot be merged (missing columns, no bands)."""


def _band_fwhm(name: str, table: Table, fwhm_arcsec: Mapping[str, float] | None) -> float:
    if fwhm_arcsec and name in fwhm_arcsec:
        return float(fwhm_arcsec[name])
    if "FWHM" in table.meta:
        return float(table.meta["FWHM"])
    band = mips.band_named(name)
    if band is not None:
        return band.psf_fwhm_arcsec
    raise BandmergeError(
        f"no PSF FWHM for band {name!r}: pass fwhm_arcsec={{{name!r}: ...}} or set meta FWHM"
    )


def _frames_fwhm(name: str, table: Table, frames: Sequence[BCDFrame], mosaic_fwhm: float,
                 ) -> float:
    """The PSF FWHM to fit on a band's BCDs: the multiframe fit's (meta MFFWHM) when the list
    was refined on them, else the list's mosaic FWHM with the resampling broadening removed
    (the band's calibrated PSF for a MIPS band)."""
    from services.extract.multiframe import frames_psf_fwhm

    if "MFFWHM" in table.meta:
        return float(table.meta["MFFWHM"])
    return frames_psf_fwhm(mosaic_fwhm, mips.band_named(name),
                           frame_pixel_arcsec=wcs_pixel_scale_arcsec(frames[0].wcs),
                           mosaic_pixel_arcsec=float(table.meta.get("PIXSCAL", 0.0)))


def _lent_diffraction_psf(name: str, lists: Mapping[str, Table], frames_fwhm: float,
                          ) -> SkyPsf | None:
    """The BCD-level diffraction PSF of MIPS band `name` as another band of the same
    telescope measured it, when `name`'s own extraction could not compare PSF models (meta
    PRFTEST 0: too few bright sources) and another band's chose the obscured Airy pattern on
    >= 3 sources: that band's obscuration, its lambda/D relative to its optics' (the source
    colours' shift), and its jitter (its mosaic blur less two boxes of its BCD pixel, as in
    `SkyPsf.on_frames`). None otherwise."""
    band = mips.band_named(name)
    if band is None or lists[name].meta.get("PRFTEST") != 0:
        return None
    for other, t in lists.items():
        m, ob = t.meta, mips.band_named(other)
        tested = m.get("PRFTEST")
        if (other == name or ob is None or m.get("PRFMODEL") != "obscured Airy"
                or not isinstance(tested, (int, np.integer)) or tested < 3
                or "PRFLAMD" not in m):
            continue
        scale = float(m["PRFLAMD"]) / ob.lambda_over_d_arcsec
        box2 = 2.0 * 8.0 * math.log(2.0) / 12.0 * ob.pixel_arcsec**2
        jitter = math.sqrt(max(float(m.get("PRFBLUR", 0.0)) ** 2 - box2, 0.0))
        return SkyPsf(frames_fwhm, lambda_over_d_arcsec=band.lambda_over_d_arcsec * scale,
                      obscuration=float(m.get("PRFOBSC", 0.0)), blur_fwhm_arcsec=jitter)
    return None


def _tangent_offsets_arcsec(ra: np.ndarray, dec: np.ndarray, ra0: float,
                            dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Local east/north offsets (arcsec) from (ra0, dec0): flat-sky is fine over a mosaic."""
    dra = ((np.asarray(ra) - ra0 + 180.0) % 360.0 - 180.0) * math.cos(math.radians(dec0))
    return dra * 3600.0, (np.asarray(dec) - dec0) * 3600.0


def bandmerge(
    lists: Mapping[str, Table],
    *,
    frames_by_band: Mapping[str, Sequence[BCDFrame]] | None = None,
    chi2_max: float = 13.8,
    pos_floor_arcsec: float | Mapping[str, float] = 0.3,
    max_radius_arcsec: float | Mapping[tuple[str, str], float] | None = None,
    fwhm_arcsec: Mapping[str, float] | None = None,
    nsigma: float = 3.0,
    fatal_bits: int = mips.FATAL_BITS,
    mosaics: Mapping[str, BCDFrame] | None = None,
) -> Table:
    """Merge per-band source lists (the `extract_sources` tables) into one band-merged list.

    Bands are merged in the order of `lists` (shortest wavelength first, e.g. 24um, 70um,
    160um). A source of a later band is matched to the merged list so far when the chi^2 of the
    separation, with each position's uncertainty (delta_RA, delta_Dec, arcsec) plus a
    systematic floor `pos_floor_arcsec` in quadrature, is below `chi2_max` (13.8: 99.9% for
    2 degrees of freedom) and the separation below `max_radius_arcsec` (default: half the
    larger FWHM of the pair); matches are one-to-one, best chi^2 first. CnfFlag has one digit
    per band pair (24-70, 24-160, 70-160 ...): 1 when a source of either band had several
    candidates in the other band within the match window, else 0.

    Output columns: IDNum, RA, Dec (inverse-variance weighted over detections, degrees),
    Delta_RA, Delta_Dec (arcsec), CnfFlag, and per band <b>: srcid_<b>, flux_<b>,
    delta_flux_<b>, flux_ap_<b>, snr_<b> (uJy), flag_<b> ('D' detected, 'U' upper limit from
    forced photometry on that band's BCDs, 'N' no data), ulim_<b> (uJy, for 'U' rows: see
    meta ULCONV), nframes_<b>. For 'U' rows flux/delta_flux/snr are the forced-photometry
    values. A band without frames in `frames_by_band` but with its mosaic in `mosaics` (a
    post-BCD mosaic entered without its BCDs: the mosaic as one frame, its unc calibrated to
    the measured noise, e.g. munc x the list's UNCSCALE) gets its forced photometry there, with
    the list's own (mosaic) FWHM and nframes 1; a band with neither gets 'N' where not
    detected.
    A MIPS band whose extraction could not test its PSF (meta PRFTEST 0) while another band
    chose the telescope's diffraction pattern is measured on its BCDs with that pattern (meta
    ULPSFLNT, DFPSFLNT): its limits and its detections' flux, delta_flux and snr (the list's
    Gaussian fluxes are ~0.8 of the truth on diffraction-limited data; flux_ap stays the
    list's).
    """
    names = list(lists)
    if not names:
        raise BandmergeError("no source lists to merge")
    for name in names:
        missing = [c for c in _REQUIRED if c not in lists[name].colnames]
        if missing:
            raise BandmergeError(f"source list {name!r} lacks columns {missing}")
    frames_by_band = frames_by_band or {}
    fwhm = {b: _band_fwhm(b, lists[b], fwhm_arcsec) for b in names}
    lent_to: list[str] = []  # bands measured on another band's diffraction pattern

    def floor(b: str) -> float:
        if isinstance(pos_floor_arcsec, Mapping):
            return float(pos_floor_arcsec.get(b, 0.3))
        return float(pos_floor_arcsec)

    def radius(a: str, b: str) -> float:
        if max_radius_arcsec is None:
            return 0.5 * max(fwhm[a], fwhm[b])
        if isinstance(max_radius_arcsec, Mapping):
            return float(max_radius_arcsec.get((a, b), max_radius_arcsec.get((b, a), 0.0))
                         or 0.5 * max(fwhm[a], fwhm[b]))
        return float(max_radius_arcsec)

    all_ra = np.concatenate([np.asarray(lists[b]["RA"], dtype=float) for b in names])
    all_dec = np.concatenate([np.asarray(lists[b]["Dec"], dtype=float) for b in names])
    if all_ra.size == 0:
        ra0, dec0 = 0.0, 0.0
    else:
        dec0 = float(np.mean(all_dec))
        ra0 = float(np.degrees(np.arctan2(np.mean(np.sin(np.radians(all_ra))),
                                          np.mean(np.cos(np.radians(all_ra))))) % 360.0)

    # Per band: offsets (arcsec) and their 1-sigma errors including the floor.
    pos = {}
    for b in names:
        t = lists[b]
        e, n = _tangent_offsets_arcsec(t["RA"], t["Dec"], ra0, dec0)
        se = np.hypot(np.asarray(t["delta_RA"], dtype=float), floor(b))
        sn = np.hypot(np.asarray(t["delta_Dec"], dtype=float), floor(b))
        pos[b] = (e, n, se, sn)

    # Merged rows: member index per band (-1 none), running weighted position.
    first = names[0]
    n0 = len(lists[first])
    member = {b: np.full(n0, -1, dtype=np.int64) for b in names}
    member[first] = np.arange(n0)
    me, mn, mse, msn = (a.copy() for a in pos[first])
    conf: dict[tuple[str, str], np.ndarray] = {}
    for b in names[1:]:
        e, n, se, sn = pos[b]
        nb = e.size
        rows_e, rows_n = me, mn
        # Candidate pairs within the hard radius; chi^2 with combined uncertainties.
        r = max(radius(a, b) for a in names[: names.index(b)])
        pairs_row: np.ndarray = np.zeros(0, dtype=np.int64)
        pairs_src: np.ndarray = np.zeros(0, dtype=np.int64)
        if nb and rows_e.size:
            tree = cKDTree(np.column_stack([e, n]))
            hits = tree.query_ball_point(np.column_stack([rows_e, rows_n]), r)
            lens = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
            pairs_row = np.repeat(np.arange(rows_e.size), lens)
            pairs_src = np.fromiter(itertools.chain.from_iterable(hits), dtype=np.int64,
                                    count=int(lens.sum()))
        chi2 = ((rows_e[pairs_row] - e[pairs_src]) ** 2 / (mse[pairs_row] ** 2 + se[pairs_src] ** 2)
                + (rows_n[pairs_row] - n[pairs_src]) ** 2
                / (msn[pairs_row] ** 2 + sn[pairs_src] ** 2))
        good = chi2 < chi2_max
        pairs_row, pairs_src, chi2 = pairs_row[good], pairs_src[good], chi2[good]
        row_cands = np.bincount(pairs_row, minlength=rows_e.size)
        src_cands = np.bincount(pairs_src, minlength=nb)
        # One-to-one, best chi^2 first (greedy is the usual band-merge choice).
        order = np.argsort(chi2, kind="stable")
        used_row = np.zeros(rows_e.size, dtype=bool)
        used_src = np.zeros(nb, dtype=bool)
        match_row: list[int] = []
        match_src: list[int] = []
        for k in order:  # loop over candidate pairs only (~ number of sources)
            i, j = int(pairs_row[k]), int(pairs_src[k])
            if not used_row[i] and not used_src[j]:
                used_row[i] = used_src[j] = True
                match_row.append(i)
                match_src.append(j)
        mr = np.asarray(match_row, dtype=np.int64)
        ms = np.asarray(match_src, dtype=np.int64)
        member[b][mr] = ms
        # Confusion of a merged row with band b: several candidates on either side.
        conf_row = row_cands > 1
        conf_row[mr] |= src_cands[ms] > 1
        # Weighted positions of matched rows.
        we1, we2 = 1 / mse[mr] ** 2, 1 / se[ms] ** 2
        wn1, wn2 = 1 / msn[mr] ** 2, 1 / sn[ms] ** 2
        me[mr] = (me[mr] * we1 + e[ms] * we2) / (we1 + we2)
        mn[mr] = (mn[mr] * wn1 + n[ms] * wn2) / (wn1 + wn2)
        mse[mr] = 1 / np.sqrt(we1 + we2)
        msn[mr] = 1 / np.sqrt(wn1 + wn2)
        # Unmatched sources of band b start new rows.
        new = np.flatnonzero(~used_src)
        nold = me.size
        for a in names:
            member[a] = np.concatenate([member[a], np.full(new.size, -1, dtype=np.int64)])
        member[b][nold:] = new
        me = np.concatenate([me, e[new]])
        mn = np.concatenate([mn, n[new]])
        mse = np.concatenate([mse, se[new]])
        msn = np.concatenate([msn, sn[new]])
        conf_all = np.concatenate([conf_row, src_cands[new] > 1])
        for key in list(conf):
            conf[key] = np.concatenate([conf[key], np.zeros(new.size, dtype=bool)])
        for a in names[: names.index(b)]:
            # The (a, b) digit: this row holds a band-a or band-b source with several
            # candidates in the other band.
            conf[(a, b)] = conf_all & ((member[a] >= 0) | (member[b] >= 0))

    nrow = me.size
    dec_m = dec0 + mn / 3600.0
    ra_m = (ra0 + me / 3600.0 / math.cos(math.radians(dec0))) % 360.0
    out = Table()
    out["IDNum"] = np.arange(1, nrow + 1, dtype=np.int32)
    out["RA"] = ra_m
    out["RA"].unit = "deg"
    out["Dec"] = dec_m
    out["Dec"].unit = "deg"
    out["Delta_RA"] = mse
    out["Delta_RA"].unit = "arcsec"
    out["Delta_Dec"] = msn
    out["Delta_Dec"].unit = "arcsec"
    pairs = list(itertools.combinations(names, 2))
    digits = [conf.get(p, np.zeros(nrow, dtype=bool)).astype(int) for p in pairs]
    out["CnfFlag"] = ["".join(str(d[i]) for d in digits) if digits else "" for i in range(nrow)]
    for b in names:
        t = lists[b]
        idx = member[b]
        det = idx >= 0
        flux = np.full(nrow, np.nan)
        dflux = np.full(nrow, np.nan)
        fap = np.full(nrow, np.nan)
        ulim = np.full(nrow, np.nan)
        nfr = np.zeros(nrow, dtype=np.int32)
        srcid = np.full(nrow, -1, dtype=np.int32)
        flag = np.full(nrow, "N", dtype="U1")
        flux[det] = np.asarray(t["flux"], dtype=float)[idx[det]]
        dflux[det] = np.asarray(t["delta_flux"], dtype=float)[idx[det]]
        if "flux_ap" in t.colnames:
            fap[det] = np.asarray(t["flux_ap"], dtype=float)[idx[det]]
        if "srcid" in t.colnames:
            srcid[det] = np.asarray(t["srcid"])[idx[det]]
        if "coverage" in t.colnames:
            cov = np.asarray(t["coverage"], dtype=float)[idx[det]]
            nfr[det] = np.where(np.isfinite(cov), cov, 0).astype(np.int32)
        flag[det] = "D"
        undetected = np.flatnonzero(~det)
        frames = frames_by_band.get(b, ())
        mosaic = (mosaics or {}).get(b)
        lent = None
        if len(frames):
            psf_fwhm = _frames_fwhm(b, lists[b], frames, fwhm[b])
            lent = _lent_diffraction_psf(b, lists, psf_fwhm)
        if lent is not None:
            # The band's own fluxes assumed a Gaussian PSF (it could not test its PSF): on a
            # diffraction-limited telescope they are ~0.8 of the truth. Every merged position
            # is measured on its BCDs with the pattern another band of the telescope chose,
            # its detections' fluxes too (positions fixed, all fitted jointly).
            ul = forced_upper_limits(ra_m, dec_m, frames, fwhm_arcsec=psf_fwhm, nsigma=nsigma,
                                     fatal_bits=fatal_bits, psf=lent,
                                     neighbours=(ra_m[:0], dec_m[:0]))  # all targets: joint
            got = np.asarray(ul["n_frames"]) > 0
            remeasured = np.flatnonzero(det & got)
            flux[remeasured] = np.asarray(ul["flux"])[remeasured]
            dflux[remeasured] = np.asarray(ul["delta_flux"])[remeasured]
            lent_to.append(b)
            sel = undetected[got[undetected]]
            flux[sel] = np.asarray(ul["flux"])[sel]
            dflux[sel] = np.asarray(ul["delta_flux"])[sel]
            ulim[sel] = np.asarray(ul["ulim"])[sel]
            nfr[sel] = np.asarray(ul["n_frames"])[sel]
            flag[sel] = "U"
        elif undetected.size and (len(frames) or mosaic is not None):
            # The PSF the band's extraction fitted (the Gaussian or the diffraction pattern).
            psf = SkyPsf.from_table_meta(lists[b].meta, fwhm[b])
            if len(frames):
                psf = psf.on_frames(frame_pixel_arcsec=wcs_pixel_scale_arcsec(frames[0].wcs),
                                    fwhm_arcsec=psf_fwhm)
            else:
                assert mosaic is not None
                frames, psf_fwhm = (mosaic,), fwhm[b]
            # every merged position (detected in any band) is a prior for the joint fit
            ul = forced_upper_limits(ra_m[undetected], dec_m[undetected], frames,
                                     fwhm_arcsec=psf_fwhm, nsigma=nsigma, fatal_bits=fatal_bits,
                                     neighbours=(ra_m[det], dec_m[det]), psf=psf)
            got = np.asarray(ul["n_frames"]) > 0
            sel = undetected[got]
            flux[sel] = np.asarray(ul["flux"])[got]
            dflux[sel] = np.asarray(ul["delta_flux"])[got]
            ulim[sel] = np.asarray(ul["ulim"])[got]
            nfr[sel] = np.asarray(ul["n_frames"])[got]
            flag[sel] = "U"
        out[f"srcid_{b}"] = srcid
        out[f"flux_{b}"] = flux
        out[f"flux_{b}"].unit = "uJy"
        out[f"delta_flux_{b}"] = dflux
        out[f"delta_flux_{b}"].unit = "uJy"
        out[f"flux_ap_{b}"] = fap
        out[f"flux_ap_{b}"].unit = "uJy"
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"snr_{b}"] = flux / dflux
        out[f"flag_{b}"] = flag
        out[f"ulim_{b}"] = ulim
        out[f"ulim_{b}"].unit = "uJy"
        out[f"nframes_{b}"] = nfr
    if lent_to:
        # Bands measured on another band's diffraction PSF: their limits, and their
        # detections' flux and delta_flux (forced on the BCDs; flux_ap stays the list's).
        out.meta["ULPSFLNT"] = ",".join(lent_to)
        out.meta["DFPSFLNT"] = ",".join(lent_to)
    out.meta.update({"BANDS": ",".join(names), "CHI2MAX": chi2_max, "NSIGMA": nsigma,
                     "ULCONV": UPPER_LIMIT_CONVENTION,
                     "CNFPAIRS": ",".join(f"{a}-{b}" for a, b in pairs)})
    return out
