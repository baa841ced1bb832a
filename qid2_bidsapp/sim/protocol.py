"""Gradient protocols for simulation: uniform shells and well-spread subsets of them."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from ..gradients import select_target_directions
from .geometry import rotation_matrix


@lru_cache(maxsize=256)
def _base_shell(n: int, variant: int) -> np.ndarray:
    directions = select_target_directions(np.empty((0, 3)), n, seed=variant, n_iter=500)
    directions.setflags(write=False)
    return directions


def uniform_shell(n: int, seed: int = 0, *, n_variants: int = 2) -> np.ndarray:
    """Return n uniformly spread directions (antipodal electrostatic repulsion), randomly rotated.

    The repulsion (`qid2_bidsapp.gradients.select_target_directions`, ~0.5 s for 120
    directions) is run for at most `n_variants` starting seeds per n and cached; every seed then
    applies its own random rotation, which keeps the set uniform and makes new ones for free.

    Parameters
    ----------
    n : int
        Number of directions.
    seed : int
        Seed of the variant and the rotation.
    n_variants : int
        Distinct optimised sets per n.

    Returns
    -------
    ndarray, shape (n, 3)
        Unit directions.

    """
    if n < 1:
        raise ValueError(f"need at least one direction, got {n}")
    rng = np.random.default_rng([seed, n])
    base = _base_shell(int(n), int(rng.integers(n_variants)))
    rotation = rotation_matrix(rng.standard_normal(3), rng.uniform(0.0, 180.0))
    return base @ rotation.T


def uniform_subset(bvecs: np.ndarray, k: int, *, start: int | None = None) -> np.ndarray:
    """Choose k of the directions that are themselves well spread (greedy farthest point).

    Starting from one direction, repeatedly add the direction whose smallest antipodal angle
    to the chosen ones is largest.

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        Unit directions.
    k : int
        Size of the subset (``1 <= k <= N``).
    start : int, optional
        First direction (default: the one closest to the mean axis, i.e. deterministic).

    Returns
    -------
    ndarray of int, shape (k,)
        Sorted indices into `bvecs`.

    """
    vectors = np.asarray(bvecs, dtype=np.float64)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    n = len(vectors)
    if not 1 <= k <= n:
        raise ValueError(f"subset size must be in 1..{n}, got {k}")
    if start is None:
        start = int(np.argmax(np.abs(vectors[:, 2])))
    closeness = np.abs(vectors @ vectors[start])  # |cos| to the nearest chosen direction
    chosen = [int(start)]
    for _ in range(k - 1):
        closeness[chosen] = np.inf
        nxt = int(np.argmin(closeness))
        chosen.append(nxt)
        closeness = np.maximum(closeness, np.abs(vectors @ vectors[nxt]))
    return np.sort(np.array(chosen, dtype=int))


def acquisition(
    shells: dict[float, int] | Sequence[tuple[float, int]], n_b0: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Build a protocol: b = 0 volumes first, then each shell's uniform directions.

    Parameters
    ----------
    shells : dict or sequence of (b, n)
        b-value (s/mm^2) and number of directions of each shell.
    n_b0 : int
        Number of b = 0 volumes.
    seed : int
        Seed of the directions (each shell gets its own rotation).

    Returns
    -------
    bvals : ndarray, shape (N,)
    bvecs : ndarray, shape (N, 3)
        Zeros for b = 0.

    """
    items = list(shells.items()) if isinstance(shells, dict) else list(shells)
    bvals = [np.zeros(n_b0)]
    bvecs = [np.zeros((n_b0, 3))]
    for i, (b, n) in enumerate(items):
        bvals.append(np.full(int(n), float(b)))
        bvecs.append(uniform_shell(int(n), seed=seed * 7919 + i))
    return np.concatenate(bvals), np.vstack(bvecs)
