"""The QID² paper's "Interp" baseline: least-squares direction interpolation.

For each target direction ``g``, the ``R`` acquired directions nearest to ``g`` (by the
antipodally symmetric angle ``arccos(|g·b|)``) are taken, each flipped into ``g``'s hemisphere
(DWI is antipodally symmetric, ``S(-b) = S(b)``), and the coefficients ``c`` of the
minimum-norm least-squares solution of ``g ≈ Σ cᵢ bᵢ`` are applied to the reference images:
``S(g) = Σ cᵢ S(bᵢ)``.

This is kept faithful to the paper's baseline on purpose. It is a comparison point, not a
good up-sampler: the coefficients express a *vector*, not a signal on the sphere, so they can
be large and of mixed sign when the references are nearly coplanar (three neighbours close to
one great circle), and the prediction then amplifies noise or over/undershoots. Only the
antipodal flip (absent from the public reference code, which ranks by signed dot product) is
added.
"""

from __future__ import annotations

import numpy as np

from ..gradients import nearest_directions
from ..shm import DEFAULT_CHUNK_VOXELS, _unit_rows, apply_direction_matrix


def _target_weights(target: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Minimum-norm least-squares coefficients expressing ``target`` in flipped ``references``.

    Parameters
    ----------
    target : ndarray, shape (3,)
        Unit target direction.
    references : ndarray, shape (R, 3)
        Unit reference directions (any hemisphere).

    Returns
    -------
    ndarray, shape (R,)
        Weights to apply to the reference signals.

    """
    signs = np.where(references @ target < 0.0, -1.0, 1.0)
    flipped = references * signs[:, None]
    coefficients, *_ = np.linalg.lstsq(flipped.T, target, rcond=None)
    return coefficients


def interp_weights(
    bvecs_in: np.ndarray, bvecs_out: np.ndarray, n_neighbours: int = 3
) -> np.ndarray:
    """Weight matrix of the "Interp" baseline (sparse, stored dense).

    Parameters
    ----------
    bvecs_in : ndarray, shape (N, 3)
        Acquired unit directions.
    bvecs_out : ndarray, shape (M, 3)
        Target unit directions.
    n_neighbours : int, optional
        Number ``R`` of nearest acquired directions used per target (default 3); capped at N.

    Returns
    -------
    ndarray, shape (M, N), float64
        Row ``j`` holds the ``R`` least-squares coefficients of target ``j`` at the columns of
        its neighbours, zeros elsewhere; ``W @ s`` is the prediction.

    """
    if int(n_neighbours) != n_neighbours or n_neighbours < 1:
        raise ValueError(f"n_neighbours must be a positive integer, got {n_neighbours}")
    b_in = _unit_rows(bvecs_in, "bvecs_in")
    b_out = _unit_rows(bvecs_out, "bvecs_out")
    if b_in.shape[0] == 0:
        raise ValueError("interp needs at least one acquired direction")
    weights = np.zeros((b_out.shape[0], b_in.shape[0]), dtype=np.float64)
    if b_out.shape[0] == 0:
        return weights
    k = min(int(n_neighbours), b_in.shape[0])
    neighbours, _ = nearest_directions(b_out, b_in, k)
    for j, idx in enumerate(neighbours):
        weights[j, idx] = _target_weights(b_out[j], b_in[idx])
    return weights


class InterpUpsampler:
    """The paper's "Interp" baseline (``--engine interp``).

    Unstable when a target's references are nearly coplanar; see the module docstring.

    Parameters
    ----------
    n_neighbours : int, optional
        Number ``R`` of nearest acquired directions per target (default 3, as in the paper).
    chunk_voxels : int, optional
        Voxels processed at once when applying the weights.

    """

    name = "interp"

    def __init__(self, n_neighbours: int = 3, *, chunk_voxels: int = DEFAULT_CHUNK_VOXELS):
        n_neighbours = 3 if n_neighbours is None else n_neighbours
        if int(n_neighbours) != n_neighbours or n_neighbours < 1:
            raise ValueError(f"n_neighbours must be a positive integer, got {n_neighbours}")
        self.n_neighbours = int(n_neighbours)
        self.chunk_voxels = int(chunk_voxels)

    def predict(
        self,
        signal: np.ndarray,
        b0: np.ndarray,
        bvecs_in: np.ndarray,
        bvecs_out: np.ndarray,
        bval: float,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Synthesise the signal at new directions of one shell (see ``Upsampler.predict``).

        ``b0`` and ``bval`` are not used.

        Parameters
        ----------
        signal : ndarray, shape (X, Y, Z, N)
            Acquired diffusion-weighted volumes of this shell.
        b0 : ndarray, shape (X, Y, Z)
            Mean b=0 image (unused).
        bvecs_in : ndarray, shape (N, 3)
            Unit gradient directions of ``signal``.
        bvecs_out : ndarray, shape (M, 3)
            Unit gradient directions to synthesise.
        bval : float
            The shell's b-value (unused).
        mask : ndarray of bool, shape (X, Y, Z), optional
            Voxels to predict; others are 0. ``None`` predicts every voxel.

        Returns
        -------
        ndarray, shape (X, Y, Z, M), float32
            Non-negative predicted signal.

        """
        weights = interp_weights(bvecs_in, bvecs_out, self.n_neighbours)
        return apply_direction_matrix(signal, weights, mask, chunk_voxels=self.chunk_voxels)

    def settings(self) -> dict:
        """Return the engine's settings as JSON-serialisable provenance.

        Returns
        -------
        dict
            ``{"n_neighbours": R}``.

        """
        return {"n_neighbours": self.n_neighbours}
