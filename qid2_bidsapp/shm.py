"""Spherical harmonics of one shell: the real, symmetric ``descoteaux07`` basis and its fits.

Science shared by the ``sh`` engine, the diffusion model, the simulator and the evaluation
(all of them import it; it imports none of them). The series has even orders only, so it is
antipodally symmetric; the Laplace–Beltrami regularised fit is Descoteaux et al., MRM 2007.
Because every fit is linear in the data, one matrix maps the N acquired volumes to
coefficients or to the signal at any target directions, for all voxels at once.
"""

from __future__ import annotations

import numpy as np
from dipy.core.geometry import cart2sphere
from dipy.reconst.shm import real_sh_descoteaux_from_index, sph_harm_ind_list

#: Lowest and highest SH order chosen automatically from the direction count.
MIN_AUTO_ORDER = 2
MAX_AUTO_ORDER = 8

#: Voxels processed at once when applying a direction matrix (bounds temporary memory).
DEFAULT_CHUNK_VOXELS = 65536

ORDER_RULE = (
    f"largest even l with (l+1)(l+2)/2 <= N acquired directions, "
    f"at least {MIN_AUTO_ORDER}, at most {MAX_AUTO_ORDER}"
)


def sh_order_for(n_directions: int) -> int:
    """Choose the SH order for a shell with a given number of directions.

    Parameters
    ----------
    n_directions : int
        Number of acquired (non-b0) directions of the shell.

    Returns
    -------
    int
        The largest even order ``l`` whose number of coefficients ``(l+1)(l+2)/2`` does not
        exceed ``n_directions``, clamped to ``[2, 8]``.

    Examples
    --------
    >>> [sh_order_for(n) for n in (6, 15, 28, 45, 100)]
    [2, 4, 6, 8, 8]

    """
    order = MIN_AUTO_ORDER
    while order + 2 <= MAX_AUTO_ORDER and n_sh_coefficients(order + 2) <= n_directions:
        order += 2
    return order


def n_sh_coefficients(order: int) -> int:
    """Return the number of coefficients of a symmetric SH series of even ``order``.

    Parameters
    ----------
    order : int
        Even maximal SH order.

    Returns
    -------
    int
        ``(order + 1) * (order + 2) // 2``.

    """
    return (order + 1) * (order + 2) // 2


def _unit_rows(vectors: np.ndarray, name: str) -> np.ndarray:
    """Return ``vectors`` as a float64 (K, 3) array with unit rows."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"{name} must have shape (K, 3), got {v.shape}")
    norms = np.linalg.norm(v, axis=1)
    if v.shape[0] and (not np.all(np.isfinite(norms)) or np.any(norms < 1e-6)):
        raise ValueError(f"{name} contains zero-length or non-finite directions")
    return v / norms[:, None] if v.shape[0] else v


def sh_basis_matrix(bvecs: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate the symmetric ``descoteaux07`` SH basis at directions.

    Parameters
    ----------
    bvecs : ndarray, shape (K, 3)
        Unit directions.
    order : int
        Even maximal SH order.

    Returns
    -------
    basis : ndarray, shape (K, C)
        Basis functions (columns) evaluated at the directions (rows).
    l_values : ndarray, shape (C,)
        Order ``l`` of each column.

    """
    if order < 0 or order % 2:
        raise ValueError(f"SH order must be a non-negative even integer, got {order}")
    v = _unit_rows(bvecs, "bvecs")
    m_values, l_values = sph_harm_ind_list(order)
    _, theta, phi = cart2sphere(v[:, 0], v[:, 1], v[:, 2])
    basis = real_sh_descoteaux_from_index(
        m_values[None, :], l_values[None, :], theta[:, None], phi[:, None], legacy=False
    )
    basis = np.asarray(basis, dtype=np.float64).reshape(v.shape[0], len(l_values))
    return basis, np.asarray(l_values)


def sh_fit_matrix(bvecs_in: np.ndarray, order: int, lambda_: float) -> np.ndarray:
    """Linear map from signals at acquired directions to their SH coefficients.

    ``c = (BᵀB + λ·diag(l²(l+1)²))⁻¹ Bᵀ s``; the minimum-norm least-squares solution when the
    system is singular (``λ = 0`` and fewer directions than coefficients).

    Parameters
    ----------
    bvecs_in : ndarray, shape (N, 3)
        Acquired unit directions.
    order : int
        Even maximal SH order.
    lambda_ : float
        Laplace–Beltrami regularisation weight (>= 0).

    Returns
    -------
    ndarray, shape (C, N), float64
        ``F`` such that ``F @ s`` are the coefficients (``C = n_sh_coefficients(order)``).

    """
    if lambda_ < 0 or not np.isfinite(lambda_):
        raise ValueError(f"lambda_ must be a finite number >= 0, got {lambda_}")
    b_in, l_values = sh_basis_matrix(bvecs_in, order)
    laplace_beltrami = (l_values * (l_values + 1.0)) ** 2
    normal = b_in.T @ b_in + lambda_ * np.diag(laplace_beltrami)
    fit, *_ = np.linalg.lstsq(normal, b_in.T, rcond=None)
    return fit


def sh_prediction_matrix(
    bvecs_in: np.ndarray, bvecs_out: np.ndarray, order: int, lambda_: float
) -> np.ndarray:
    """Linear map from signals at acquired directions to the SH fit at target directions.

    The coefficients are ``c = (BᵀB + λ·diag(l²(l+1)²))⁻¹ Bᵀ s`` (Laplace–Beltrami
    regularisation); when that system is singular (``λ = 0`` and fewer directions than
    coefficients) the minimum-norm least-squares solution is used.

    Parameters
    ----------
    bvecs_in : ndarray, shape (N, 3)
        Acquired unit directions.
    bvecs_out : ndarray, shape (M, 3)
        Target unit directions.
    order : int
        Even maximal SH order.
    lambda_ : float
        Laplace–Beltrami regularisation weight (>= 0).

    Returns
    -------
    ndarray, shape (M, N), float64
        ``P`` such that ``P @ s`` is the SH fit of ``s`` evaluated at ``bvecs_out``.

    """
    b_out, _ = sh_basis_matrix(bvecs_out, order)
    return b_out @ sh_fit_matrix(bvecs_in, order, lambda_)


def apply_direction_matrix(
    signal: np.ndarray,
    matrix: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
) -> np.ndarray:
    """Apply an (M, N) direction matrix to every voxel of a 4D volume.

    Parameters
    ----------
    signal : ndarray, shape (X, Y, Z, N)
        Input volumes.
    matrix : ndarray, shape (M, N)
        Linear map from the N input volumes to the M output volumes.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to compute; the others are 0. ``None`` computes every voxel.
    chunk_voxels : int, optional
        Voxels multiplied at once (in float64), bounding temporary memory.

    Returns
    -------
    ndarray, shape (X, Y, Z, M), float32
        Output volumes, negative values clipped to 0.

    """
    signal = np.asarray(signal)
    matrix = np.asarray(matrix, dtype=np.float64)
    if signal.ndim != 4:
        raise ValueError(f"signal must be 4D (X, Y, Z, N), got shape {signal.shape}")
    if matrix.ndim != 2 or matrix.shape[1] != signal.shape[3]:
        raise ValueError(
            f"matrix shape {matrix.shape} does not match {signal.shape[3]} input volumes"
        )
    spatial = signal.shape[:3]
    out = np.zeros((*spatial, matrix.shape[0]), dtype=np.float32)
    if mask is None:
        voxels = np.arange(int(np.prod(spatial)))  # every voxel
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != spatial:
            raise ValueError(f"mask shape {mask.shape} does not match signal shape {spatial}")
        voxels = np.flatnonzero(mask)
    n_vox = int(np.prod(spatial))
    flat_in = signal.reshape(n_vox, signal.shape[3])
    flat_out = out.reshape(n_vox, matrix.shape[0])
    step = max(1, int(chunk_voxels))
    for start in range(0, voxels.size, step):
        idx = voxels[start : start + step]
        values = flat_in[idx].astype(np.float64) @ matrix.T
        flat_out[idx] = np.clip(values, 0.0, None)
    return out
