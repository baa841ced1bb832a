"""Uniform input subsets of an acquisition: the best-spread directions of each shell."""

from __future__ import annotations

import math

import numpy as np

from ..gradients import B0_THRESHOLD, SHELL_TOLERANCE, group_shells

#: Smallest distance between two points used in the electrostatic energy (repeated directions).
_MIN_DISTANCE = 1e-6
#: Upper bound on improving swaps in `best_spread_subset` (never reached in practice).
_MAX_SWAPS = 10000


def _unit(bvecs: np.ndarray) -> np.ndarray:
    b = np.asarray(bvecs, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 3:
        raise ValueError(f"bvecs must have shape (N, 3), got {b.shape}")
    norms = np.linalg.norm(b, axis=1)
    if b.shape[0] and (not np.all(np.isfinite(norms)) or np.any(norms < 1e-6)):
        raise ValueError("bvecs contains zero-length or non-finite directions")
    return b / norms[:, None] if b.shape[0] else b


def pair_energy(bvecs: np.ndarray) -> np.ndarray:
    """Antipodally symmetric electrostatic pair energies of a direction set.

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        Directions (normalised here).

    Returns
    -------
    ndarray, shape (N, N)
        ``1/|a_i - a_j| + 1/|a_i + a_j|`` off the diagonal (each direction stands for itself and
        its antipode), 0 on it.

    """
    b = _unit(bvecs)
    cos = np.clip(b @ b.T, -1.0, 1.0)
    minus = np.sqrt(np.maximum(2.0 - 2.0 * cos, 0.0))
    plus = np.sqrt(np.maximum(2.0 + 2.0 * cos, 0.0))
    energy = 1.0 / np.maximum(minus, _MIN_DISTANCE) + 1.0 / np.maximum(plus, _MIN_DISTANCE)
    np.fill_diagonal(energy, 0.0)
    return energy


def subset_energy(bvecs: np.ndarray, indices: np.ndarray) -> float:
    """Electrostatic energy of a subset of directions (lower = more uniform).

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        All directions.
    indices : array of int
        The subset.

    Returns
    -------
    float
        Sum of `pair_energy` over the pairs of the subset.

    """
    idx = np.asarray(indices, dtype=np.intp)
    return float(0.5 * pair_energy(bvecs)[np.ix_(idx, idx)].sum())


def _greedy(energy: np.ndarray, start: int, n: int) -> np.ndarray:
    """Add, one at a time, the direction of lowest energy with those chosen (ties: lowest index)."""
    chosen = np.zeros(energy.shape[0], dtype=bool)
    chosen[start] = True
    load = energy[start].copy()
    for _ in range(n - 1):
        candidates = np.where(chosen, np.inf, load)
        nxt = int(np.argmin(candidates))
        chosen[nxt] = True
        load += energy[nxt]
    return np.flatnonzero(chosen)


def _refine(energy: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """Swap one chosen for one unchosen direction while that lowers the energy (best swap first)."""
    n = energy.shape[0]
    chosen = np.zeros(n, dtype=bool)
    chosen[subset] = True
    for _ in range(_MAX_SWAPS):
        inside, outside = np.flatnonzero(chosen), np.flatnonzero(~chosen)
        if outside.size == 0:
            break
        load = energy[:, inside].sum(axis=1)  # energy of each direction with the subset
        # change when `i` (inside) leaves and `j` (outside) enters
        delta = load[outside][None, :] - energy[np.ix_(inside, outside)] - load[inside][:, None]
        k = int(np.argmin(delta))
        if delta.flat[k] >= -1e-9 * max(1.0, abs(float(load[inside].sum()))):
            break
        i, j = np.unravel_index(k, delta.shape)
        chosen[inside[i]] = False
        chosen[outside[j]] = True
    return np.flatnonzero(chosen)


def best_spread_subset(bvecs: np.ndarray, n: int) -> np.ndarray:
    """Choose the ``n`` most uniformly spread of a set of directions, deterministically.

    Minimises the antipodally symmetric electrostatic energy (`pair_energy`) of the subset:
    a greedy build from every possible first direction, the lowest-energy result, then
    best-improvement single swaps until no swap lowers the energy. No randomness: the same
    directions in the same order always give the same subset.

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        Directions of one shell (any hemisphere; ``d`` and ``-d`` are the same direction).
    n : int
        Subset size, ``1 <= n <= N``.

    Returns
    -------
    ndarray of int, shape (n,)
        Sorted indices into ``bvecs``.

    """
    b = _unit(bvecs)
    total = b.shape[0]
    if int(n) != n or not 1 <= n <= total:
        raise ValueError(f"subset size must be an integer between 1 and {total}, got {n}")
    n = int(n)
    if n == total:
        return np.arange(total, dtype=np.intp)
    energy = pair_energy(b)
    best, best_energy = None, np.inf
    for start in range(total):
        subset = _greedy(energy, start, n)
        e = 0.5 * energy[np.ix_(subset, subset)].sum()
        if e < best_energy - 1e-12:
            best, best_energy = subset, e
    return np.sort(_refine(energy, best)).astype(np.intp)


def n_input_for(n_directions: int, fraction: float) -> int:
    """Return how many of a shell's directions are given as input.

    Parameters
    ----------
    n_directions : int
        Directions of the shell in the full acquisition.
    fraction : float
        Fraction to keep, in (0, 1).

    Returns
    -------
    int
        ``ceil(fraction * n_directions)``, at least 1 and at most ``n_directions - 1``.

    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1 (exclusive), got {fraction}")
    if n_directions < 2:
        raise ValueError(f"a shell needs at least 2 directions to split, got {n_directions}")
    return min(max(1, math.ceil(fraction * n_directions - 1e-9)), n_directions - 1)


def uniform_split(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    fraction: float = 0.5,
    n_input: int | None = None,
    b0_threshold: float = B0_THRESHOLD,
    shell_tolerance: float = SHELL_TOLERANCE,
) -> np.ndarray:
    """Volumes of a full acquisition given as input: every b=0 and a uniform part of each shell.

    Parameters
    ----------
    bvals : ndarray, shape (V,)
        b-values of the full acquisition.
    bvecs : ndarray, shape (V, 3)
        Its directions (FSL image axes; anything for b=0 volumes).
    fraction : float, optional
        Fraction of each shell's directions to keep (`n_input_for`); default one half.
    n_input : int, optional
        Directions to keep per shell instead of ``fraction``.
    b0_threshold, shell_tolerance : float, optional
        As in `~qid2_bidsapp.gradients.group_shells`.

    Returns
    -------
    ndarray of int
        Sorted volume indices: all b=0 volumes and `best_spread_subset` of each shell. The
        other diffusion-weighted volumes are the held-out ones the methods predict.

    """
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvecs.shape != (bvals.size, 3):
        raise ValueError(f"bvecs must have shape ({bvals.size}, 3), got {bvecs.shape}")
    labels = group_shells(bvals, b0_threshold=b0_threshold, tolerance=shell_tolerance)
    keep = [np.flatnonzero(labels == 0)]
    for shell in np.unique(labels[labels > 0]):
        members = np.flatnonzero(labels == shell)
        if n_input is None:
            count = n_input_for(members.size, fraction)
        else:
            if not 1 <= n_input < members.size:
                raise ValueError(
                    f"n_input must be between 1 and {members.size - 1} for the b={shell} shell "
                    f"({members.size} directions), got {n_input}"
                )
            count = int(n_input)
        keep.append(members[best_spread_subset(bvecs[members], count)])
    return np.sort(np.concatenate(keep)).astype(np.intp)
