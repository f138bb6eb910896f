"""Pictures for the report: attribution heatmaps, overlays, colour bar, charts.

Every picture comes back as a ``data:`` URI (PNG for pixel maps, SVG for charts)
so the HTML report stays one self-contained file that loads nothing from the
network. Pixel maps are written at their native resolution (a 28x28 map is a
28x28 PNG of about a kilobyte) and scaled up by the browser with
``image-rendering: pixelated``; that keeps a report with hundreds of maps small.

All attribution pictures share one diverging colour scale, :class:`ColourScale`,
centred on zero, so a colour means the same number in every map of a report.
Values beyond the scale are drawn in the end colours (the colour bar shows this
with arrow ends); NaN (no image of that slice and class) is drawn grey.

Matplotlib is used through :class:`matplotlib.figure.Figure` directly, never
through ``pyplot``, so no global backend or figure state is touched.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib import rc_context as _rc_context
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

COLORMAP = "RdBu_r"
LUT_SIZE = 127
NAN_RGB = (214, 214, 214)
SCALE_PERCENTILE = 99.5
OVERLAY_MAX_ALPHA = 0.75
LABEL_MAX_CHARS = 42

INK = "#1f2933"
MUTED = "#7b8794"
GRID = "#e4e7eb"
HIGHLIGHT = "#c81e1e"

_RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "bias-audit-report",
    "text.parse_math": False,
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.edgecolor": MUTED,
    "axes.labelcolor": INK,
    "xtick.color": INK,
    "ytick.color": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@dataclass(frozen=True)
class ColourScale:
    """A symmetric diverging scale ``[-limit, +limit]`` shared by all maps.

    ``limit`` is the ``SCALE_PERCENTILE`` percentile of the absolute finite
    values of every map given, so one extreme pixel does not wash out the rest.
    """

    limit: float
    colormap: str = COLORMAP

    @classmethod
    def from_maps(cls, maps: Sequence[np.ndarray]) -> ColourScale:
        values = [np.abs(np.asarray(m, np.float64)).ravel() for m in maps]
        values = [v[np.isfinite(v)] for v in values]
        pooled = np.concatenate(values) if values else np.zeros(0)
        limit = float(np.percentile(pooled, SCALE_PERCENTILE)) if pooled.size else 0
        if not np.isfinite(limit) or limit <= 0:
            limit = 1.0
        return cls(limit=limit)

    def indices(self, values: np.ndarray) -> np.ndarray:
        """``(H, W)`` values to uint8 indices into :func:`palette`.

        ``0 .. LUT_SIZE - 1`` run from ``-limit`` to ``+limit`` (the middle one
        is zero); ``LUT_SIZE`` marks NaN.
        """
        values = np.asarray(values, np.float64)
        finite = np.isfinite(values)
        position = np.clip(np.where(finite, values, 0.0) / self.limit, -1.0, 1.0)
        index = np.round((position + 1.0) * (LUT_SIZE - 1) / 2).astype(np.uint8)
        index[~finite] = LUT_SIZE
        return index

    def palette(self) -> np.ndarray:
        """``(LUT_SIZE + 1, 3)`` uint8 colours: the colormap, then NaN grey."""
        return _palette(self.colormap)

    def rgb(self, values: np.ndarray) -> np.ndarray:
        """``(H, W)`` values to ``(H, W, 3)`` uint8 colours; NaN becomes grey."""
        return self.palette()[self.indices(values)]


@functools.cache
def _palette(name: str) -> np.ndarray:
    rgba = colormaps[name](np.linspace(0.0, 1.0, LUT_SIZE))
    table = np.round(rgba[:, :3] * 255).astype(np.uint8)
    table = np.vstack([table, np.array(NAN_RGB, np.uint8)])
    table.setflags(write=False)
    return table


def png_data_uri(rgb: np.ndarray) -> str:
    """``(H, W, 3)`` or ``(H, W)`` uint8 pixels as a ``data:image/png`` URI."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def heatmap_uri(values: np.ndarray, scale: ColourScale) -> str:
    """An ``(H, W)`` attribution map drawn on the shared scale, as a PNG URI.

    The PNG is a palette image (one byte a pixel, ``LUT_SIZE`` colour steps plus
    grey), much smaller than an RGB one.
    """
    image = Image.fromarray(scale.indices(values), mode="P")
    image.putpalette(scale.palette().ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_uri(image: np.ndarray) -> str:
    """An ``(H, W, C)`` image with values in ``[0, 1]`` (C is 1 or 3) as a PNG URI."""
    return png_data_uri(_to_rgb_uint8(image))


def overlay_uri(image: np.ndarray, values: np.ndarray, scale: ColourScale) -> str:
    """The map blended over a grey copy of the image, as a PNG URI.

    Opacity grows with ``|value| / scale.limit`` up to ``OVERLAY_MAX_ALPHA``, so
    weak attribution leaves the image visible and strong attribution covers it.
    """
    base = _to_rgb_uint8(image).astype(np.float64)
    grey = base.mean(axis=2, keepdims=True).repeat(3, axis=2)
    values = np.asarray(values, np.float64)
    strength = np.clip(np.abs(np.nan_to_num(values)) / scale.limit, 0.0, 1.0)
    alpha = (OVERLAY_MAX_ALPHA * strength)[..., None]
    blended = (1.0 - alpha) * grey + alpha * scale.rgb(values).astype(np.float64)
    return png_data_uri(np.round(blended).astype(np.uint8))


def colourbar_uri(scale: ColourScale, label: str) -> str:
    """A horizontal colour bar for the shared scale, as an SVG URI."""
    with _rc_context(_RC):
        fig = Figure(figsize=(5.6, 0.95))
        ax = fig.add_axes((0.04, 0.55, 0.92, 0.2))
        mappable = ScalarMappable(
            norm=Normalize(-scale.limit, scale.limit),
            cmap=colormaps[scale.colormap].resampled(LUT_SIZE),
        )
        bar = fig.colorbar(mappable, cax=ax, orientation="horizontal", extend="both")
        bar.set_ticks(np.linspace(-scale.limit, scale.limit, 5))
        bar.ax.set_xticklabels(
            [_short_number(t) for t in np.linspace(-scale.limit, scale.limit, 5)]
        )
        bar.outline.set_edgecolor(MUTED)
        bar.ax.tick_params(labelsize=8, length=3)
        fig.text(0.5, 0.04, label, ha="center", va="bottom", fontsize=8, color=INK)
        return _svg_uri(fig)


@dataclass(frozen=True)
class Interval:
    """One row of a dot-and-whisker chart; ``low``/``high`` are None without a CI."""

    label: str
    value: float
    low: float | None
    high: float | None
    highlighted: bool = False


def interval_chart_uri(
    panels: Sequence[tuple[str, Sequence[Interval], float | None]],
    percent: Sequence[bool],
) -> str:
    """Dot-and-whisker panels side by side sharing one row per slice, as SVG.

    ``panels`` holds ``(title, rows, reference)`` per metric; every panel has the
    same row labels in the same order. ``reference`` (the whole data set's
    value) is drawn as a dashed line. Highlighted rows (a finding on that slice
    and metric) are drawn in red. ``percent`` says per panel whether values are
    fractions to be shown as percentages.
    """
    labels = [_truncate(r.label) for r in panels[0][1]]
    n_rows = len(labels)
    height = 0.8 + 0.19 * max(n_rows, 1)
    label_width = 0.07 * max((len(s) for s in labels), default=8) + 0.3
    panel_width = 2.6
    width = label_width + panel_width * len(panels)
    with _rc_context(_RC):
        fig = Figure(figsize=(width, height))
        left = label_width / width
        span = (1 - left - 0.01) / len(panels)
        bottom = 0.45 / height
        top = 1 - 0.35 / height
        y = np.arange(n_rows)[::-1]
        for i, ((title, rows, reference), as_percent) in enumerate(
            zip(panels, percent, strict=True)
        ):
            ax = fig.add_axes(
                (left + i * span + 0.012, bottom, span - 0.03, top - bottom)
            )
            factor = 100.0 if as_percent else 1.0
            value = np.array([r.value for r in rows], np.float64) * factor
            low = np.array([np.nan if r.low is None else r.low for r in rows]) * factor
            high = np.array([np.nan if r.high is None else r.high for r in rows])
            high = high * factor
            marked = np.array([r.highlighted for r in rows], bool)
            for chosen, colour in ((~marked, INK), (marked, HIGHLIGHT)):
                whisker = chosen & np.isfinite(low) & np.isfinite(high)
                if whisker.any():
                    ax.hlines(
                        y[whisker], low[whisker], high[whisker], color=colour, lw=1.2
                    )
                dot = chosen & np.isfinite(value)
                if dot.any():
                    ax.plot(
                        value[dot], y[dot], "o", color=colour, markersize=3.4, ls=""
                    )
            if reference is not None and np.isfinite(reference):
                ax.axvline(
                    reference * factor, color=MUTED, linestyle="--", linewidth=0.8
                )
            ax.set_title(title, fontsize=9, color=INK, loc="left")
            ax.set_ylim(-0.7, n_rows - 0.3)
            ax.set_yticks(y)
            ax.set_yticklabels(labels if i == 0 else [])
            ax.tick_params(axis="y", length=0, labelsize=8)
            ax.tick_params(axis="x", labelsize=7.5)
            ax.grid(axis="x", color=GRID, linewidth=0.6)
            ax.set_axisbelow(True)
            if as_percent:
                ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:g}%")
        return _svg_uri(fig)


def sparkline_uri(values: Sequence[float | None], percent: bool = False) -> str:
    """A small line chart of one metric over runs (oldest first), as SVG.

    Missing values (None or NaN) leave a gap; the last point is marked.
    """
    data = np.array([np.nan if v is None else float(v) for v in values], np.float64)
    factor = 100.0 if percent else 1.0
    with _rc_context(_RC):
        fig = Figure(figsize=(1.7, 0.45))
        ax = fig.add_axes((0.02, 0.12, 0.96, 0.76))
        x = np.arange(len(data))
        ax.plot(x, data * factor, color=INK, linewidth=1.1)
        finite = np.flatnonzero(np.isfinite(data))
        if finite.size:
            last = finite[-1]
            ax.plot(x[last], data[last] * factor, "o", color=HIGHLIGHT, markersize=3)
            low, high = np.nanmin(data * factor), np.nanmax(data * factor)
            pad = (high - low) * 0.15 or abs(high) * 0.05 or 1.0
            ax.set_ylim(low - pad, high + pad)
        ax.set_xlim(-0.3, max(len(data) - 1, 1) + 0.3)
        ax.set_axis_off()
        return _svg_uri(fig)


def block_downsample(values: np.ndarray, max_side: int) -> np.ndarray:
    """Average ``(..., H, W)`` maps over square blocks so both sides <= max_side.

    The block size is the smallest integer that fits; edge blocks that the image
    does not fill are averaged over the pixels they have. NaN stays NaN only
    where a whole block is NaN.
    """
    values = np.asarray(values, np.float64)
    height, width = values.shape[-2:]
    factor = int(np.ceil(max(height, width) / max_side))
    if factor <= 1:
        return values
    out_h, out_w = -(-height // factor), -(-width // factor)
    padded = np.full(values.shape[:-2] + (out_h * factor, out_w * factor), np.nan)
    padded[..., :height, :width] = values
    blocks = padded.reshape(values.shape[:-2] + (out_h, factor, out_w, factor))
    finite = np.isfinite(blocks)
    counts = finite.sum(axis=(-3, -1))
    sums = np.where(finite, blocks, 0.0).sum(axis=(-3, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def downsample_factor(shape: Sequence[int], max_side: int) -> int:
    """The block size :func:`block_downsample` uses for maps of ``shape``."""
    return max(1, int(np.ceil(max(shape[-2:]) / max_side)))


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float64)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = image.repeat(3, axis=-1)
    image = np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0)
    return np.round(image * 255).astype(np.uint8)


def _svg_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None}, transparent=True)
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode()


def _short_number(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value:+.2g}".replace("e-0", "e-").replace("e+0", "e")


def _truncate(text: str) -> str:
    if len(text) <= LABEL_MAX_CHARS:
        return text
    return text[: LABEL_MAX_CHARS - 1] + "…"
