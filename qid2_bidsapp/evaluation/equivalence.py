"""Equivalent directions: how many acquired directions a method's FA error is worth.

For a case, DTI is fitted on best-spread subsets of N directions of the full acquisition
(every b=0 volume kept) for a grid of N (`direction_grid`); their FA error against the
reference is a curve falling with N. A method's *equivalent directions* is the N at which the
curve reaches the method's own FA error (linear interpolation between grid points): "30
directions up-sampled ≈ N acquired". Against the full acquisition the curve ends at 0 (the full
scan is its own reference); against the noise-free truth it ends at the full scan's error.
"""

from __future__ import annotations

import numpy as np

from ..qc import fit_dti
from .metrics import fa_mae
from .split import best_spread_subset

#: Fewest directions of a subset (a tensor has 6 unknowns besides S0).
MIN_DIRECTIONS = 6
#: At most this many subset sizes per shell.
MAX_GRID = 14


def direction_grid(
    n_full: int, max_points: int = MAX_GRID, include: tuple[int, ...] = ()
) -> np.ndarray:
    """Subset sizes from `MIN_DIRECTIONS` to `n_full`, denser at the low end.

    Parameters
    ----------
    n_full : int
        Directions of the full acquisition's shell.
    max_points : int
        Largest number of geometrically spaced sizes.
    include : tuple of int
        Sizes added to the grid (e.g. the input's direction count).

    Returns
    -------
    ndarray of int
        Sorted, unique, ending at `n_full`.

    """
    if n_full <= MIN_DIRECTIONS:
        return np.array([n_full])
    grid = np.rint(np.geomspace(MIN_DIRECTIONS, n_full, max_points)).astype(int)
    extra = [n for n in include if MIN_DIRECTIONS <= n <= n_full]
    return np.unique(np.concatenate([grid, np.asarray(extra, dtype=int)]))


def subset_curve(
    data: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    references: dict[str, np.ndarray],
    *,
    b0_threshold: float = 50.0,
    include: tuple[int, ...] = (),
) -> dict[str, list[tuple[int, float]]]:
    """FA error of DTI on best-spread subsets of N directions (per shell), for each reference.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
        The full acquisition.
    bvals, bvecs : ndarray
        Its gradients.
    labels : ndarray of int, shape (V,)
        Shell label of each volume (0 for b=0).
    mask : ndarray of bool
        Brain mask.
    references : dict of str to ndarray
        Reference FA maps by name (``{"": fa_full, "_truth": fa_truth}``).
    b0_threshold : float
        b-values at or below it are b=0.
    include : tuple of int
        Subset sizes added to the grid (`direction_grid`).

    Returns
    -------
    dict of str to list of (int, float)
        For each reference, ``(N per shell, FA MAE)`` along the grid of the smallest shell.

    """
    shells = [np.flatnonzero(labels == s) for s in np.unique(labels[labels > 0])]
    b0 = np.flatnonzero(labels == 0)
    n_full = min(len(s) for s in shells)
    curves: dict[str, list[tuple[int, float]]] = {name: [] for name in references}
    for n in direction_grid(n_full, include=include):
        keep = [b0] + [s[best_spread_subset(bvecs[s], int(n))] for s in shells]
        idx = np.sort(np.concatenate(keep))
        fa = fit_dti(data[..., idx], bvals[idx], bvecs[idx], mask, b0_threshold=b0_threshold).fa
        for name, fa_ref in references.items():
            curves[name].append((int(n), fa_mae(fa, fa_ref, mask)))
    return curves


def equivalent_directions(curve: list[tuple[int, float]], error: float) -> float:
    """Find the N at which a falling error curve reaches `error` (linear interpolation).

    Parameters
    ----------
    curve : list of (int, float)
        ``(N, FA MAE)`` pairs, N increasing.
    error : float
        A method's FA MAE.

    Returns
    -------
    float
        N; ``-inf`` when `error` is above the curve's first point (worth fewer than its
        smallest N), ``inf`` when below its last point (worth more than the full
        acquisition), NaN for a NaN error or an empty curve.

    """
    if not curve or not np.isfinite(error):
        return float("nan")
    ns = np.array([n for n, _ in curve], dtype=float)
    errs = np.minimum.accumulate(np.array([e for _, e in curve], dtype=float))  # monotone
    if error > errs[0]:
        return float("-inf")
    if error < errs[-1]:
        return float("inf")
    for k in range(1, len(ns)):
        if errs[k] <= error:
            e0, e1 = errs[k - 1], errs[k]
            if e0 == e1:
                return float(ns[k])
            return float(ns[k - 1] + (e0 - error) / (e0 - e1) * (ns[k] - ns[k - 1]))
    return float(ns[-1])
