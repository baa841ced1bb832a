"""Plain plotting functions for the qid2 reports.

Every function takes arrays and an output path, writes one PNG atomically and returns the path.
Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly: no
``pyplot`` figure registry and no GUI backend, so there is nothing to close with ``plt.close``
(and nothing that can be forgotten): once saved, no global registry holds a figure and Python's
garbage collector reclaims it, so memory stays flat over many runs (checked over 120 figures),
and plotting is safe in worker threads and processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..derivatives import atomic_open

__all__ = [
    "fold_to_hemisphere",
    "plot_color_fa",
    "plot_directions",
    "plot_fa_comparison",
    "plot_fa_scatter",
    "plot_gaps",
    "plot_run_values",
    "plot_volume_comparison",
    "save_figure",
]

ACQUIRED_STYLE = {"color": "#1f5fa8", "marker": "o", "s": 30, "label": "acquired"}
SYNTH_STYLE = {"color": "#e07b00", "marker": "^", "s": 34, "label": "synthesised"}
PANEL_INCHES = 2.1
DPI = 100


def save_figure(fig: Figure, out_path: Path, *, dpi: int = DPI) -> Path:
    """Save a figure as PNG atomically.

    The PNG is written to a temporary file in the destination folder and renamed into place,
    so readers never see a partial image.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure to save.
    out_path : Path
        Destination ``.png`` file; its folder is created when missing.
    dpi : int, optional
        Resolution.

    Returns
    -------
    Path
        ``out_path``.

    """
    with atomic_open(out_path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    return Path(out_path)


def _new_figure(width: float, height: float) -> Figure:
    """Create a stand-alone Agg figure (not registered with pyplot)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def fold_to_hemisphere(vectors: np.ndarray) -> np.ndarray:
    """Flip antipodal directions onto the upper (z >= 0) hemisphere.

    Parameters
    ----------
    vectors : ndarray, shape (N, 3)
        Gradient directions (any norm; zero rows are dropped).

    Returns
    -------
    ndarray, shape (M, 3)
        Unit vectors with ``z >= 0`` (rows on the equator keep ``y >= 0``).

    """
    v = np.asarray(vectors, dtype=float).reshape(-1, 3)
    norms = np.linalg.norm(v, axis=1)
    v = v[norms > 1e-6] / norms[norms > 1e-6, None]
    flip = (v[:, 2] < 0) | ((np.abs(v[:, 2]) < 1e-9) & (v[:, 1] < 0))
    v[flip] *= -1
    return v


def _lambert(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project upper-hemisphere unit vectors onto the unit disc (equal-area, seen from +z)."""
    scale = 1.0 / np.sqrt(1.0 + np.clip(v[:, 2], 0.0, 1.0))
    return v[:, 0] * scale, v[:, 1] * scale


def _draw_disc(ax) -> None:
    """Draw the hemisphere outline and 30/60 degree elevation circles."""
    t = np.linspace(0, 2 * np.pi, 256)
    for elevation in (0, 30, 60):
        z = np.sin(np.deg2rad(elevation))
        r = np.sqrt(1 - z**2) / np.sqrt(1 + z)
        style = {"color": "0.3", "lw": 1.0} if elevation == 0 else {"color": "0.8", "lw": 0.6}
        ax.plot(r * np.cos(t), r * np.sin(t), **style)
    ax.plot([-1, 1], [0, 0], color="0.85", lw=0.6)
    ax.plot([0, 0], [-1, 1], color="0.85", lw=0.6)
    ax.text(1.03, 0, "x", va="center", fontsize=8, color="0.4")
    ax.text(0, 1.03, "y", ha="center", fontsize=8, color="0.4")
    ax.set_xlim(-1.12, 1.12)
    ax.set_ylim(-1.12, 1.12)
    ax.set_aspect("equal")
    ax.set_axis_off()


def plot_directions(
    shells: Sequence[float],
    acquired: Sequence[np.ndarray],
    synthesized: Sequence[np.ndarray],
    out_path: Path,
) -> Path:
    """Plot acquired and synthesised gradient directions, one hemisphere panel per shell.

    Antipodal directions are folded onto the z >= 0 hemisphere (the diffusion signal is
    antipodally symmetric) and shown in a Lambert equal-area projection seen from +z; the
    outer circle is the equator, the inner circles are 30 and 60 degrees elevation.

    Parameters
    ----------
    shells : sequence of float
        b-value of each shell (s/mm^2).
    acquired : sequence of ndarray, shape (N_i, 3)
        Acquired directions of each shell.
    synthesized : sequence of ndarray, shape (M_i, 3)
        Synthesised directions of each shell.
    out_path : Path
        Destination PNG.

    Returns
    -------
    Path
        ``out_path``.

    """
    n = max(len(shells), 1)
    fig = _new_figure(3.2 * n, 3.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, bval, acq, syn in zip(axes, shells, acquired, synthesized, strict=False):
        _draw_disc(ax)
        for vecs, style in ((acq, ACQUIRED_STYLE), (syn, SYNTH_STYLE)):
            v = fold_to_hemisphere(vecs)
            x, y = _lambert(v)
            ax.scatter(x, y, edgecolors="white", linewidths=0.5, zorder=3, **style)
        ax.set_title(
            f"b = {bval:g} s/mm²\n{len(acq)} acquired + {len(syn)} synthesised", fontsize=9
        )
    if len(shells) == 0:
        _draw_disc(axes[0])
        axes[0].set_title("no up-sampled shell", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.subplots_adjust(bottom=0.12)
    return save_figure(fig, out_path)


def _robust_max(*arrays: np.ndarray, mask: np.ndarray | None = None, q: float = 99.5) -> float:
    """Return the ``q``-th percentile of the (masked) values of all arrays, at least a tiny eps."""
    values = []
    for a in arrays:
        a = np.asarray(a, dtype=float)
        sel = a[mask] if mask is not None and mask.any() else a.ravel()
        values.append(sel[np.isfinite(sel)])
    allv = np.concatenate(values) if values else np.zeros(1)
    if allv.size == 0:
        return 1e-6
    return float(max(np.percentile(allv, q), 1e-6))


def _montage(stack: np.ndarray, gap: int, fill: float) -> tuple[np.ndarray, list[float]]:
    """Place the slices of ``stack`` (X, Y, S[, 3]) side by side along x, ``gap`` voxels apart.

    Returns the montage (X_total, Y[, 3]) and the x centre of each slice.
    """
    stack = np.asarray(stack, dtype=float)
    n_x, n_s = stack.shape[0], stack.shape[2]
    pieces, centres = [], []
    spacer = np.full((gap, *stack.shape[1:2], *stack.shape[3:]), fill)
    for s in range(n_s):
        if s:
            pieces.append(spacer)
        centres.append(s * (n_x + gap) + (n_x - 1) / 2)
        pieces.append(stack[:, :, s])
    return np.concatenate(pieces, axis=0), centres


def _slice_grid(
    rows: Sequence[tuple[str, np.ndarray, dict]],
    slice_labels: Sequence[str],
    out_path: Path,
    *,
    title: str | None = None,
    aspect: float = 1.0,
) -> Path:
    """Plot rows of axial slices; each row is ``(label, stack (X, Y, S[, 3]), imshow kwargs)``.

    Each row is one montage image (one axes per row keeps plotting fast); slice ``s`` is shown
    with the first axis left-right and the second bottom-top. A row's kwargs may carry
    ``colorbar`` (a label) to add a colour bar to that row.
    """
    n_x, n_y = rows[0][1].shape[:2]
    gap = max(1, n_x // 25)
    n_s = len(slice_labels)
    img_w = PANEL_INCHES * n_s
    row_h = img_w * (n_y * aspect) / (n_s * n_x + (n_s - 1) * gap)
    fig = _new_figure(img_w + 1.6, len(rows) * (row_h + 0.25) + 0.5)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for r, (label, stack, kwargs) in enumerate(rows):
        kwargs = dict(kwargs)
        cbar_label = kwargs.pop("colorbar", None)
        ax = axes[r]
        is_rgb = np.ndim(stack) == 4
        montage, centres = _montage(stack, gap, 1.0 if is_rgb else np.nan)
        if is_rgb:
            im = ax.imshow(np.transpose(montage, (1, 0, 2)), origin="lower", aspect=aspect)
        else:
            cmap = matplotlib.colormaps[kwargs.pop("cmap", "gray")].with_extremes(bad="white")
            im = ax.imshow(
                montage.T,
                origin="lower",
                aspect=aspect,
                cmap=cmap,
                interpolation="nearest",
                **kwargs,
            )
        ax.set_yticks([])
        ax.set_ylabel(label, fontsize=9)
        if r == 0:
            ax.xaxis.tick_top()
            ax.set_xticks(centres, slice_labels, fontsize=8)
            ax.tick_params(axis="x", length=0)
        else:
            ax.set_xticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if cbar_label is not None and not is_rgb:
            cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, aspect=10)
            cb.set_label(cbar_label, fontsize=7)
            cb.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_path)


def plot_volume_comparison(
    nearest: np.ndarray,
    synthesized: np.ndarray,
    out_path: Path,
    *,
    slice_labels: Sequence[str],
    mask: np.ndarray | None = None,
    title: str | None = None,
    aspect: float = 1.0,
) -> Path:
    """Plot a synthesised volume against its nearest acquired volume, slice by slice.

    Rows: nearest acquired volume, synthesised volume (both on one shared grey scale), and their
    difference (synthesised - acquired; inside ``mask`` only) on a symmetric scale of half that
    range.

    Parameters
    ----------
    nearest : ndarray, shape (X, Y, S)
        The shown axial slices of the acquired volume nearest in direction.
    synthesized : ndarray, shape (X, Y, S)
        The same slices of the synthesised volume.
    out_path : Path
        Destination PNG.
    slice_labels : sequence of str
        One label per slice (e.g. ``"z = 12"``).
    mask : ndarray of bool, shape (X, Y, S), optional
        Brain mask on the same slices; sets the intensity scale and limits the difference.
    title : str, optional
        Figure title.
    aspect : float, optional
        Voxel height / width ratio of the displayed slices.

    Returns
    -------
    Path
        ``out_path``.

    """
    vmax = _robust_max(nearest, synthesized, mask=mask)
    diff = np.asarray(synthesized, dtype=float) - np.asarray(nearest, dtype=float)
    if mask is not None:
        diff = np.where(mask, diff, np.nan)  # blank outside the brain
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": vmax, "colorbar": "signal (shared scale)"}
    rows = [
        ("nearest acquired", nearest, grey),
        ("synthesised", synthesized, grey),
        (
            "synth − acquired",
            diff,
            {"cmap": "RdBu_r", "vmin": -vmax / 2, "vmax": vmax / 2, "colorbar": "difference"},
        ),
    ]
    return _slice_grid(rows, slice_labels, out_path, title=title, aspect=aspect)


def plot_uncertainty(
    std_mean: np.ndarray,
    relative: np.ndarray,
    out_path: Path,
    *,
    slice_labels: Sequence[str],
    title: str | None = None,
    aspect: float = 1.0,
) -> Path:
    """Plot the diffusion engine's uncertainty: mean sample std and std relative to the signal.

    Parameters
    ----------
    std_mean : ndarray, shape (X, Y, S)
        Per-voxel mean, over the synthesised volumes, of the standard deviation of the K
        samples (signal units); NaN outside the brain.
    relative : ndarray, shape (X, Y, S)
        The same divided by the mean synthesised signal, in percent; NaN outside the brain.
    out_path : Path
        Destination PNG.
    slice_labels : sequence of str
        One label per slice.
    title : str, optional
        Figure title.
    aspect : float, optional
        Voxel height / width ratio of the displayed slices.

    Returns
    -------
    Path
        ``out_path``.

    """
    finite = relative[np.isfinite(relative)]
    rel_max = float(np.percentile(finite, 99)) if finite.size else 1.0
    rows = [
        (
            "sample std",
            std_mean,
            {"cmap": "magma", "vmin": 0.0, "vmax": _robust_max(std_mean), "colorbar": "signal"},
        ),
        (
            "std / signal",
            relative,
            {"cmap": "magma", "vmin": 0.0, "vmax": max(rel_max, 1e-6), "colorbar": "%"},
        ),
    ]
    return _slice_grid(rows, slice_labels, out_path, title=title, aspect=aspect)


def plot_fa_comparison(
    fa_acquired: np.ndarray,
    fa_upsampled: np.ndarray,
    out_path: Path,
    *,
    slice_labels: Sequence[str],
    mask: np.ndarray | None = None,
    title: str | None = None,
    aspect: float = 1.0,
) -> Path:
    """Plot FA before and after up-sampling and their difference.

    Parameters
    ----------
    fa_acquired : ndarray, shape (X, Y, S)
        FA of the DTI fit on the acquired volumes only (shown slices).
    fa_upsampled : ndarray, shape (X, Y, S)
        FA of the DTI fit on the merged DWI (shown slices).
    out_path : Path
        Destination PNG.
    slice_labels : sequence of str
        One label per slice.
    mask : ndarray of bool, shape (X, Y, S), optional
        Brain mask; the difference is shown inside it only.
    title : str, optional
        Figure title.
    aspect : float, optional
        Voxel height / width ratio of the displayed slices.

    Returns
    -------
    Path
        ``out_path``.

    """
    fa_a = np.nan_to_num(np.asarray(fa_acquired, dtype=float))
    fa_u = np.nan_to_num(np.asarray(fa_upsampled, dtype=float))
    diff = fa_u - fa_a
    if mask is not None:
        diff = np.where(mask, diff, np.nan)  # blank outside the brain
    lim = max(_robust_max(np.abs(diff), mask=mask, q=99.0), 0.05)
    fa_kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "colorbar": "FA"}
    rows = [
        ("FA acquired", fa_a, fa_kw),
        ("FA upsampled", fa_u, fa_kw),
        (
            "upsampled − acquired",
            diff,
            {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim, "colorbar": "ΔFA"},
        ),
    ]
    return _slice_grid(rows, slice_labels, out_path, title=title, aspect=aspect)


def plot_color_fa(
    rgb_acquired: np.ndarray,
    rgb_upsampled: np.ndarray,
    out_path: Path,
    *,
    slice_labels: Sequence[str],
    title: str | None = None,
    aspect: float = 1.0,
) -> Path:
    """Plot colour-coded FA (principal direction x FA) before and after up-sampling.

    Parameters
    ----------
    rgb_acquired : ndarray, shape (X, Y, S, 3)
        Colour FA of the DTI fit on the acquired volumes, values in [0, 1].
    rgb_upsampled : ndarray, shape (X, Y, S, 3)
        Colour FA of the DTI fit on all (merged) volumes.
    out_path : Path
        Destination PNG.
    slice_labels : sequence of str
        One label per slice.
    title : str, optional
        Figure title.
    aspect : float, optional
        Voxel height / width ratio of the displayed slices.

    Returns
    -------
    Path
        ``out_path``.

    """
    rows = [
        ("acquired", np.clip(np.nan_to_num(rgb_acquired), 0, 1), {}),
        ("upsampled", np.clip(np.nan_to_num(rgb_upsampled), 0, 1), {}),
    ]
    return _slice_grid(rows, slice_labels, out_path, title=title, aspect=aspect)


def _run_axis(ax, labels: Sequence[str]) -> None:
    """Label the x axis with one (rotated) tick per run."""
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)


def _group_width(n: int) -> float:
    return float(np.clip(1.5 + 0.35 * n, 5.0, 16.0))


def plot_run_values(
    labels: Sequence[str],
    values: Sequence[float],
    out_path: Path,
    *,
    ylabel: str,
    title: str | None = None,
) -> Path:
    """Plot one value per run (and shell) as bars; missing values (NaN) are marked ``n/a``.

    Parameters
    ----------
    labels : sequence of str
        One label per bar.
    values : sequence of float
        Bar heights.
    out_path : Path
        Destination PNG.
    ylabel : str
        Y axis label.
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        ``out_path``.

    """
    vals = np.asarray(values, dtype=float)
    fig = _new_figure(_group_width(len(labels)), 3.4)
    ax = fig.subplots()
    x = np.arange(len(labels))
    ax.bar(x, np.nan_to_num(vals), color="#1f5fa8", width=0.7)
    for xi in x[~np.isfinite(vals)]:
        ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=7, color="0.4")
    _run_axis(ax, labels)
    ax.set_ylabel(ylabel, fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, out_path)


def plot_fa_scatter(
    fa_acquired: Sequence[float],
    fa_upsampled: Sequence[float],
    labels: Sequence[str],
    out_path: Path,
) -> Path:
    """Scatter mean FA (acquired-only) against mean FA (merged), one point per run and shell.

    Parameters
    ----------
    fa_acquired : sequence of float
        Mean FA in the mask, acquired volumes only.
    fa_upsampled : sequence of float
        Mean FA in the mask, merged DWI.
    labels : sequence of str
        One label per point (annotated when there are few points).
    out_path : Path
        Destination PNG.

    Returns
    -------
    Path
        ``out_path``.

    """
    a = np.asarray(fa_acquired, dtype=float)
    u = np.asarray(fa_upsampled, dtype=float)
    ok = np.isfinite(a) & np.isfinite(u)
    fig = _new_figure(4.4, 4.2)
    ax = fig.subplots()
    if ok.any():
        lo = float(min(a[ok].min(), u[ok].min()))
        hi = float(max(a[ok].max(), u[ok].max()))
        pad = max(0.02, 0.1 * (hi - lo))
        lo, hi = max(lo - pad, 0.0), min(hi + pad, 1.0)
    else:
        lo, hi = 0.0, 1.0
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--", label="identity")
    ax.scatter(a[ok], u[ok], color="#1f5fa8", s=28, zorder=3, label="run / shell")
    if ok.sum() <= 12:
        for xi, yi, lab in zip(a[ok], u[ok], np.asarray(labels, dtype=object)[ok], strict=True):
            ax.annotate(lab, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("mean FA, acquired only", fontsize=9)
    ax.set_ylabel("mean FA, upsampled (merged)", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    ax.grid(color="0.92")
    return save_figure(fig, out_path)


def plot_gaps(
    labels: Sequence[str],
    gap_acquired: Sequence[float],
    gap_merged: Sequence[float],
    out_path: Path,
) -> Path:
    """Plot the largest angular gap before and after up-sampling, one pair per run and shell.

    Parameters
    ----------
    labels : sequence of str
        One label per run and shell.
    gap_acquired : sequence of float
        Largest angular gap of the acquired directions (degrees).
    gap_merged : sequence of float
        Largest angular gap after up-sampling (degrees).
    out_path : Path
        Destination PNG.

    Returns
    -------
    Path
        ``out_path``.

    """
    before = np.asarray(gap_acquired, dtype=float)
    after = np.asarray(gap_merged, dtype=float)
    x = np.arange(len(labels))
    fig = _new_figure(_group_width(len(labels)), 3.4)
    ax = fig.subplots()
    ax.vlines(x, np.fmin(before, after), np.fmax(before, after), color="0.75", lw=2)
    ax.scatter(x, before, label="acquired", zorder=3, **_no_label(ACQUIRED_STYLE))
    ax.scatter(x, after, label="merged", zorder=3, **_no_label(SYNTH_STYLE))
    _run_axis(ax, labels)
    ax.set_ylabel("largest angular gap (°)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, frameon=False)
    return save_figure(fig, out_path)


def _no_label(style: dict) -> dict:
    return {k: v for k, v in style.items() if k != "label"}
