"""Output mosaic grid (north-up TAN WCS) and the fast input-pixel -> output-pixel mapping.

BCDs carry their distortion as TAN-SIP keywords; the mosaic applies it. astropy's `WCS` costs
~4 ms to build and ~6 ms to transform one 128x128 frame, which alone would eat the step's time
budget at 200 frames, so TAN(-SIP) headers are evaluated here directly in numpy (SIP polynomial
-> CD -> gnomonic deprojection as unit vectors -> gnomonic projection onto the output plane).
Any other projection falls back to astropy (`all_pix2world`), which is exact but slower.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from shared.bcd import BCDFrame


class GridError(ValueError):
    """The frames' WCS or the requested output grid cannot be used; the message says why."""


_SIP_KEY = re.compile(r"^([AB])_(\d+)_(\d+)$")


def _unit_vector(ra_deg: np.ndarray | float, dec_deg: np.ndarray | float) -> np.ndarray:
    ra = np.radians(ra_deg)
    dec = np.radians(dec_deg)
    cd = np.cos(dec)
    return np.stack(np.broadcast_arrays(cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)), axis=-1)


def _tangent_basis(ra_deg: float, dec_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, east, north) unit vectors of the tangent plane at (ra, dec)."""
    ra, dec = math.radians(ra_deg), math.radians(dec_deg)
    centre = np.array([math.cos(dec) * math.cos(ra), math.cos(dec) * math.sin(ra), math.sin(dec)])
    east = np.array([-math.sin(ra), math.cos(ra), 0.0])
    north = np.array([-math.sin(dec) * math.cos(ra), -math.sin(dec) * math.sin(ra), math.cos(dec)])
    return centre, east, north


def _cd_matrix(header: Mapping[str, Any]) -> np.ndarray | None:
    """The 2x2 CD matrix (deg/pixel) from CDi_j, or CDELTi x PCi_j, or CDELTi and CROTA2 (the
    older AIPS convention of many archive files); None when the header has none of them."""
    if any(k in header for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2")):
        return np.array(
            [
                [float(header.get("CD1_1", 0.0)), float(header.get("CD1_2", 0.0))],
                [float(header.get("CD2_1", 0.0)), float(header.get("CD2_2", 0.0))],
            ]
        )
    if "CDELT1" not in header or "CDELT2" not in header:
        return None
    cdelt = np.array([float(header["CDELT1"]), float(header["CDELT2"])])
    if any(k in header for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2")):
        pc = np.array(
            [
                [float(header.get("PC1_1", 1.0)), float(header.get("PC1_2", 0.0))],
                [float(header.get("PC2_1", 0.0)), float(header.get("PC2_2", 1.0))],
            ]
        )
        return cdelt[:, None] * pc
    rho = math.radians(float(header.get("CROTA2", 0.0)))
    c, s = math.cos(rho), math.sin(rho)
    # FITS WCS paper II, eq. 189: CROTA2 rotates the intermediate world coordinates.
    return np.array([[cdelt[0] * c, -cdelt[1] * s], [cdelt[0] * s, cdelt[1] * c]])


@dataclass(frozen=True, slots=True)
class TanSip:
    """A parsed celestial TAN(-SIP) WCS: enough to map pixels to sky unit vectors quickly."""

    crpix: tuple[float, float]
    cd_deg: np.ndarray  #: 2x2 CD matrix, deg per pixel
    crval_deg: tuple[float, float]
    sip_a: tuple[tuple[int, int, float], ...]
    sip_b: tuple[tuple[int, int, float], ...]

    @classmethod
    def from_header(cls, header: fits.Header) -> TanSip | None:
        """Parse `header`, or return None when it is not a plain celestial TAN(-SIP) WCS."""
        # one pass over the cards: astropy's per-key Header lookups cost ~50 us each
        kv = {card.keyword: card.value for card in header.cards}
        c1 = str(kv.get("CTYPE1", "")).upper()
        c2 = str(kv.get("CTYPE2", "")).upper()
        if not (c1.startswith("RA---TAN") and c2.startswith("DEC--TAN")):
            return None
        if c1[8:] not in ("", "-SIP") or c2[8:] not in ("", "-SIP"):
            return None
        if float(kv.get("LONPOLE", 180.0)) != 180.0:
            return None
        if any(k.startswith(("PV1_", "PV2_")) for k in kv):
            return None
        if any(k not in kv for k in ("CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2")):
            return None
        cd = _cd_matrix(kv)
        if cd is None or not np.all(np.isfinite(cd)) or abs(np.linalg.det(cd)) == 0.0:
            return None
        sip_a: list[tuple[int, int, float]] = []
        sip_b: list[tuple[int, int, float]] = []
        if c1.endswith("-SIP") and "A_ORDER" in kv:
            a_order = int(kv["A_ORDER"])
            b_order = int(kv.get("B_ORDER", a_order))
            for key, value in kv.items():
                m = _SIP_KEY.match(key)
                if m is None:
                    continue
                p, q = int(m.group(2)), int(m.group(3))
                order = a_order if m.group(1) == "A" else b_order
                if p + q > order:
                    continue
                (sip_a if m.group(1) == "A" else sip_b).append((p, q, float(value)))
        return cls(
            crpix=(float(kv["CRPIX1"]), float(kv["CRPIX2"])),
            cd_deg=cd,
            crval_deg=(float(kv["CRVAL1"]), float(kv["CRVAL2"])),
            sip_a=tuple(sip_a),
            sip_b=tuple(sip_b),
        )

    def pixel_to_vectors(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Sky unit vectors (..., 3) of 0-based pixel coordinates, SIP distortion included."""
        u = x + 1.0 - self.crpix[0]
        v = y + 1.0 - self.crpix[1]
        if self.sip_a or self.sip_b:
            order = max(p + q for p, q, _ in self.sip_a + self.sip_b)
            upow = [np.ones_like(u), u]
            vpow = [np.ones_like(v), v]
            for _ in range(2, order + 1):
                upow.append(upow[-1] * u)
                vpow.append(vpow[-1] * v)
            du = np.zeros_like(u)
            dv = np.zeros_like(v)
            for p, q, c in self.sip_a:
                du += c * upow[p] * vpow[q]
            for p, q, c in self.sip_b:
                dv += c * upow[p] * vpow[q]
            u = u + du
            v = v + dv
        cd = np.radians(self.cd_deg)
        xi = cd[0, 0] * u + cd[0, 1] * v
        eta = cd[1, 0] * u + cd[1, 1] * v
        centre, east, north = _tangent_basis(*self.crval_deg)
        vec = centre + xi[..., None] * east + eta[..., None] * north
        vec /= np.sqrt(np.einsum("...i,...i->...", vec, vec))[..., None]
        return vec


def pixel_to_vectors(header: fits.Header, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sky unit vectors (..., 3) of 0-based pixel coordinates of a frame with `header`.

    Uses the fast numpy TAN-SIP path when possible, astropy `all_pix2world` otherwise.
    """
    tan = TanSip.from_header(header)
    if tan is not None:
        return tan.pixel_to_vectors(x, y)
    try:
        wcs = WCS(header, relax=True).celestial
    except Exception as exc:  # astropy raises many types for bad WCS; report them all alike
        raise GridError(
            f"frame WCS cannot be parsed ({exc}); fix the header's WCS keywords"
        ) from exc
    if wcs.naxis != 2:
        raise GridError("frame has no celestial WCS (CTYPE1/2); mosaicking needs one")
    ra, dec = wcs.all_pix2world(x, y, 0)
    return _unit_vector(ra, dec)


@dataclass(frozen=True, slots=True)
class OutputGrid:
    """A north-up (or any CD) TAN output grid of shape (ny, nx) without distortion."""

    shape: tuple[int, int]
    crpix: tuple[float, float]
    crval_deg: tuple[float, float]
    cd_deg: np.ndarray

    @property
    def pixel_arcsec(self) -> float:
        """Mean side of an output pixel, arcsec."""
        return float(math.sqrt(abs(np.linalg.det(self.cd_deg)))) * 3600.0

    @property
    def pixel_sr(self) -> float:
        """Solid angle of an output pixel at the tangent point, steradian."""
        return float(abs(np.linalg.det(np.radians(self.cd_deg))))

    def vectors_to_pixel(self, vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based output pixel coordinates of sky unit vectors (..., 3)."""
        centre, east, north = _tangent_basis(*self.crval_deg)
        w = vec @ centre
        xi = np.degrees((vec @ east) / w)
        eta = np.degrees((vec @ north) / w)
        inv = np.linalg.inv(self.cd_deg)
        x = inv[0, 0] * xi + inv[0, 1] * eta + self.crpix[0] - 1.0
        y = inv[1, 0] * xi + inv[1, 1] * eta + self.crpix[1] - 1.0
        # points on the far hemisphere have no gnomonic image: push them off the grid
        behind = w <= 0
        if np.any(behind):
            x = np.where(behind, -1e9, x)
            y = np.where(behind, -1e9, y)
        return x, y

    def header(self) -> fits.Header:
        """The grid as FITS WCS keywords (NAXIS1/2 included)."""
        h = fits.Header()
        h["NAXIS"] = 2
        h["NAXIS1"] = self.shape[1]
        h["NAXIS2"] = self.shape[0]
        h["WCSAXES"] = (2, "number of WCS axes")
        h["CTYPE1"] = ("RA---TAN", "gnomonic projection, no distortion")
        h["CTYPE2"] = ("DEC--TAN", "gnomonic projection, no distortion")
        h["CRPIX1"] = self.crpix[0]
        h["CRPIX2"] = self.crpix[1]
        h["CRVAL1"] = (self.crval_deg[0], "[deg] RA at CRPIX1, CRPIX2")
        h["CRVAL2"] = (self.crval_deg[1], "[deg] Dec at CRPIX1, CRPIX2")
        h["CD1_1"] = float(self.cd_deg[0, 0])
        h["CD1_2"] = float(self.cd_deg[0, 1])
        h["CD2_1"] = float(self.cd_deg[1, 0])
        h["CD2_2"] = float(self.cd_deg[1, 1])
        h["CUNIT1"] = "deg"
        h["CUNIT2"] = "deg"
        h["RADESYS"] = "ICRS"
        h["PXSCAL1"] = (-self.pixel_arcsec, "[arcsec/pixel] output pixel scale, axis 1")
        h["PXSCAL2"] = (self.pixel_arcsec, "[arcsec/pixel] output pixel scale, axis 2")
        return h

    @property
    def wcs(self) -> WCS:
        return WCS(self.header())

    @classmethod
    def from_header(cls, header: fits.Header) -> OutputGrid:
        """Grid of a given TAN header (NAXIS1/2, CRPIX, CRVAL, CD or CDELT+PC), no SIP."""
        tan = TanSip.from_header(header)
        if tan is None or tan.sip_a or tan.sip_b:
            raise GridError("output header must be a plain RA---TAN/DEC--TAN WCS without SIP")
        try:
            shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        except KeyError as exc:
            raise GridError("output header needs NAXIS1 and NAXIS2") from exc
        return cls(shape=shape, crpix=tan.crpix, crval_deg=tan.crval_deg, cd_deg=tan.cd_deg)


def frame_outline_vectors(frame: BCDFrame, *, step_px: int = 16) -> np.ndarray:
    """Sky unit vectors (n, 3) along the edges of a frame's pixel footprint."""
    ny, nx = frame.data.shape
    xs = np.unique(np.r_[np.arange(-0.5, nx - 0.5, step_px), nx - 0.5])
    ys = np.unique(np.r_[np.arange(-0.5, ny - 0.5, step_px), ny - 0.5])
    ex = np.r_[xs, xs, np.full(ys.size, -0.5), np.full(ys.size, nx - 0.5)]
    ey = np.r_[np.full(xs.size, -0.5), np.full(xs.size, ny - 0.5), ys, ys]
    return pixel_to_vectors(frame.header, ex, ey)


def native_pixel_arcsec(frame: BCDFrame) -> float:
    """Mean pixel side of a frame at its reference pixel, arcsec (SIP ignored: it is < 1%)."""
    tan = TanSip.from_header(frame.header)
    if tan is not None:
        return float(math.sqrt(abs(np.linalg.det(tan.cd_deg)))) * 3600.0
    wcs = WCS(frame.header, relax=True).celestial
    scales = wcs.proj_plane_pixel_scales()
    return (
        float(math.sqrt(float(scales[0].to_value("deg")) * float(scales[1].to_value("deg"))))
        * 3600.0
    )


def stray_frames(
    frames: list[BCDFrame] | tuple[BCDFrame, ...], *, max_separation_deg: float = 5.0
) -> list[tuple[int, float]]:
    """(index, separation in degrees) of the frames whose centre lies more than
    `max_separation_deg` from the median centre of all of them: one AOR and band covers at most
    a few degrees, so such a frame has a wrong WCS (or belongs elsewhere) and would stretch the
    output grid over the sky."""
    if len(frames) < 3:
        return []
    centres = np.array(
        [
            pixel_to_vectors(f.header, np.array((f.data.shape[1] - 1) / 2.0),
                             np.array((f.data.shape[0] - 1) / 2.0))
            for f in frames
        ]
    ).reshape(len(frames), 3)
    median = np.median(centres, axis=0)
    norm = float(np.linalg.norm(median))
    if norm < 1e-6:
        return []
    sep = np.degrees(np.arccos(np.clip(centres @ (median / norm), -1.0, 1.0)))
    return [(int(i), float(sep[i])) for i in np.flatnonzero(sep > max_separation_deg)]


def output_grid(
    frames: list[BCDFrame] | tuple[BCDFrame, ...], *, pixel_arcsec: float, margin_px: int = 2
) -> OutputGrid:
    """North-up TAN grid of `pixel_arcsec` pixels that covers every frame's footprint.

    The tangent point is the mean direction of the frames' outlines, so the grid works across
    RA = 0 and near the poles (but not for fields larger than a hemisphere).
    """
    if not frames:
        raise GridError("no frames to build an output grid from")
    if not (pixel_arcsec > 0 and math.isfinite(pixel_arcsec)):
        raise GridError(f"pixel_arcsec must be positive and finite, got {pixel_arcsec}")
    outline = np.concatenate([frame_outline_vectors(f) for f in frames])
    mean = outline.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:
        raise GridError("frames are spread over the whole sky; mosaic them in separate fields")
    mean /= norm
    ra0 = math.degrees(math.atan2(mean[1], mean[0])) % 360.0
    dec0 = math.degrees(math.asin(max(-1.0, min(1.0, mean[2]))))
    scale = pixel_arcsec / 3600.0
    cd = np.array([[-scale, 0.0], [0.0, scale]])
    probe = OutputGrid(shape=(1, 1), crpix=(1.0, 1.0), crval_deg=(ra0, dec0), cd_deg=cd)
    x, y = probe.vectors_to_pixel(outline)
    if np.any(x < -1e8):
        raise GridError("frames span more than a hemisphere; mosaic them in separate fields")
    x0 = math.floor(float(x.min())) - margin_px
    y0 = math.floor(float(y.min())) - margin_px
    nx = math.ceil(float(x.max())) - x0 + margin_px + 1
    ny = math.ceil(float(y.max())) - y0 + margin_px + 1
    return OutputGrid(shape=(ny, nx), crpix=(1.0 - x0, 1.0 - y0), crval_deg=(ra0, dec0), cd_deg=cd)
