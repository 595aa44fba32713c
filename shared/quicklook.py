"""Quick-look PNG of a mosaic: asinh stretch between percentiles, about 600 px on a side."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def stretch(image: np.ndarray, *, lo_pct: float = 0.5, hi_pct: float = 99.7) -> np.ndarray:
    """Image scaled to [0, 1] by an asinh stretch between two percentiles (NaN -> 0)."""
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape)
    lo, hi = np.percentile(image[finite], [lo_pct, hi_pct])
    if not hi > lo:
        hi = lo + 1.0
    x = np.clip((np.where(finite, image, lo) - lo) / (hi - lo), 0.0, 1.0)
    # asinh with a soft knee at 10% of the range keeps faint sky and bright cores visible
    return np.arcsinh(x / 0.1) / np.arcsinh(1.0 / 0.1)


def quicklook_png(image: np.ndarray, *, title: str = "", size_px: int = 600) -> bytes:
    """PNG bytes of `image` (any unit), north up as stored (origin lower left), ~`size_px`."""
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"quick-look needs a non-empty 2-D image, got shape {image.shape}")
    data = stretch(np.asarray(image, dtype=np.float64))
    dpi = 100
    # pyplot is not thread-safe; a bare Figure with an Agg canvas is
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.94 if title else 1.0))
    ax.imshow(data, origin="lower", cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.text(0.5, 0.97, title, ha="center", va="center", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
