"""Conditioning of the diffusion model on plain arrays: references, tokens, signal scaling.

Everything here is numpy in, numpy out (no torch), so the engine and the training data
pipeline build the model inputs the same way.
"""

from __future__ import annotations

import numpy as np

from ..gradients import nearest_directions

#: Features per direction token (see `direction_tokens`).
TOKEN_FEATURES = 9

#: Default b0 below which ``S/S0`` is set to 0.
B0_EPS = 1e-6

_SQRT2 = np.sqrt(2.0)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms < 1e-12) or not np.all(np.isfinite(norms)):
        raise ValueError("directions must be finite, non-zero vectors")
    return vectors / norms


def select_references(target: np.ndarray, bvecs_in: np.ndarray, r: int) -> np.ndarray:
    """Choose the acquired directions that condition the synthesis of one target.

    Directions are ranked by the antipodally symmetric angle ``arccos(|g . b|)``
    (`gradients.nearest_directions`): ``b`` and ``-b`` are the same measurement.

    Parameters
    ----------
    target : ndarray, shape (3,)
        Target direction (normalised here).
    bvecs_in : ndarray, shape (N, 3)
        Acquired directions of the shell, N >= 1.
    r : int
        Number of references R (>= 1).

    Returns
    -------
    ndarray of int, shape (r,)
        Indices into `bvecs_in`, nearest first (ties by index). When N < r, the N available
        directions are followed by copies of the nearest one, so the output always has R
        entries (the nearest slice is the most informative one to repeat).

    Raises
    ------
    ValueError
        For ``r < 1`` or no acquired directions.

    """
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    bvecs_in = np.asarray(bvecs_in, dtype=np.float64).reshape(-1, 3)
    if len(bvecs_in) == 0:
        raise ValueError("no acquired directions to choose references from")
    k = min(r, len(bvecs_in))
    indices, _ = nearest_directions(_unit(target), _unit(bvecs_in), k)
    chosen = indices[0]
    if k < r:
        chosen = np.concatenate([chosen, np.full(r - k, chosen[0], dtype=chosen.dtype)])
    return chosen.astype(np.intp)


def direction_tokens(target: np.ndarray, refs: np.ndarray, bval: float) -> np.ndarray:
    """Encode the target and reference directions as cross-attention tokens.

    One token per direction, first the target, then each reference, with `TOKEN_FEATURES`
    features::

        gx², gy², gz², √2·gx·gy, √2·gx·gz, √2·gy·gz, b/1000, |g·target|, role

    The first six are the unique entries of ``g gᵀ`` (scaled so that their Euclidean distance
    is the Frobenius distance of the outer products): an encoding invariant to ``g -> -g``.
    ``role`` is 1 for the target and 0 for a reference; ``|g·target|`` is 1 for the target.
    Because the references are sorted nearest first, ``|g·target|`` also tells the network
    which token belongs to which reference slice.

    Parameters
    ----------
    target : ndarray, shape (3,)
        Target direction (normalised here).
    refs : ndarray, shape (r, 3)
        Reference directions, in the order of the reference slices.
    bval : float
        The shell's b-value in s/mm².

    Returns
    -------
    ndarray, shape (r + 1, TOKEN_FEATURES), float32

    """
    t = _unit(target)
    refs = np.asarray(refs, dtype=np.float64).reshape(-1, 3)
    g = np.vstack([t, _unit(refs)]) if len(refs) else t
    gx, gy, gz = g.T
    cos = np.abs(g @ t[0])
    cos[0] = 1.0
    role = np.zeros(len(g))
    role[0] = 1.0
    tokens = np.column_stack(
        [
            gx**2,
            gy**2,
            gz**2,
            _SQRT2 * gx * gy,
            _SQRT2 * gx * gz,
            _SQRT2 * gy * gz,
            np.full(len(g), float(bval) / 1000.0),
            np.clip(cos, 0.0, 1.0),
            role,
        ]
    )
    return tokens.astype(np.float32)


def normalise_signal(
    signal: np.ndarray, b0: np.ndarray, clip: float, eps: float = B0_EPS
) -> np.ndarray:
    """Divide by S0 and clip: the physical scale the model works on.

    Parameters
    ----------
    signal : ndarray, shape (..., N) or the shape of `b0`
        Diffusion-weighted signal.
    b0 : ndarray, shape (...)
        The b=0 image. When it has one dimension fewer than `signal` it is broadcast over the
        last axis of `signal` (the volumes); otherwise numpy broadcasting applies.
    clip : float
        Upper clip of ``S/S0`` (``ModelConfig.signal_clip``).
    eps : float
        Where ``b0 <= eps`` (background, or no signal), the output is 0.

    Returns
    -------
    ndarray, float32
        ``S/S0`` clipped to ``[0, clip]``; non-finite values become 0.

    """
    signal = np.asarray(signal, dtype=np.float64)
    b0 = np.asarray(b0, dtype=np.float64)
    if b0.ndim == signal.ndim - 1:
        b0 = b0[..., None]
    valid = b0 > eps
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(valid, signal / np.where(valid, b0, 1.0), 0.0)
    ratio = np.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(ratio, 0.0, clip).astype(np.float32)


def to_model_space(x, clip: float):
    """Map ``S/S0`` in ``[0, clip]`` to the model's ``[-1, 1]``: ``2 x / clip - 1``.

    Parameters
    ----------
    x : ndarray or torch.Tensor
        Normalised signal.
    clip : float
        ``ModelConfig.signal_clip``.

    Returns
    -------
    Same type as `x`.

    """
    return 2.0 * x / clip - 1.0


def from_model_space(y, clip: float):
    """Inverse of `to_model_space`: ``(y + 1) clip / 2`` (no clipping).

    Parameters
    ----------
    y : ndarray or torch.Tensor
        Model-space values.
    clip : float
        ``ModelConfig.signal_clip``.

    Returns
    -------
    Same type as `y`.

    """
    return (y + 1.0) * (clip / 2.0)
