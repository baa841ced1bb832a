"""Scores of an up-sampled acquisition, on plain arrays.

FA agreement (mean absolute error and SSIM of the FA maps), image agreement of the synthesised
volumes (NRMSE, PSNR, SSIM) and agreement of the rotation-invariant spherical-harmonic
features (RISH, NMSE per order). Every metric is computed in a brain mask.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from ..qc import masked_mae, masked_nrmse, resolve_mask
from ..shm import sh_basis_matrix

#: SSIM constants and Gaussian window of Wang et al. (IEEE TIP 2004).
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_SIGMA = 1.5
#: The Gaussian window is cut at this many standard deviations (11 voxels wide at σ = 1.5,
#: as in scikit-image's ``structural_similarity(gaussian_weights=True)``).
SSIM_TRUNCATE = 3.5
#: SH order and Laplace–Beltrami weight of the RISH fit.
RISH_ORDER = 4
RISH_LAMBDA = 0.006


def fa_mae(fa: np.ndarray, fa_reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute FA error in the mask.

    Parameters
    ----------
    fa, fa_reference : ndarray, shape (X, Y, Z)
        FA maps.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to compare (``None``: all).

    Returns
    -------
    float
        ``mean(|fa - fa_reference|)`` over the mask; NaN for an empty mask.

    """
    return masked_mae(fa, fa_reference, mask)


def ssim_map(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float,
    *,
    sigma: float = SSIM_SIGMA,
    truncate: float = SSIM_TRUNCATE,
) -> np.ndarray:
    """Local structural similarity of two images with a Gaussian window (Wang et al. 2004).

    ``SSIM = (2 μa μb + C1)(2 σab + C2) / ((μa² + μb² + C1)(σa² + σb² + C2))`` with
    ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``, ``L = data_range``, local means and (population)
    covariances from a normalised Gaussian window of standard deviation ``sigma`` voxels,
    borders mirrored (``reflect``). The same definition as scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

    Parameters
    ----------
    a, b : ndarray
        Images of the same shape (2D or 3D).
    data_range : float
        Dynamic range ``L`` of the images (1 for FA).
    sigma : float, optional
        Window standard deviation in voxels.
    truncate : float, optional
        Window half-width in standard deviations.

    Returns
    -------
    ndarray
        SSIM at every voxel, same shape as the images (1 where they are identical).

    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")

    def smooth(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, sigma=sigma, truncate=truncate, mode="reflect")

    mu_a, mu_b = smooth(a), smooth(b)
    var_a = smooth(a * a) - mu_a * mu_a
    var_b = smooth(b * b) - mu_b * mu_b
    cov = smooth(a * b) - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return numerator / denominator


def ssim(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, *, data_range: float
) -> float:
    """Mean structural similarity (`ssim_map`) over a mask.

    Parameters
    ----------
    a, b : ndarray, shape (X, Y, Z)
        Images (the whole image enters the local windows; only the mean is masked).
    mask : ndarray of bool, optional
        Voxels whose local SSIM is averaged (``None``: all).
    data_range : float
        Dynamic range of the images (1 for FA maps).

    Returns
    -------
    float
        Mean SSIM in the mask; NaN for an empty mask.

    """
    values = ssim_map(a, b, data_range)
    mask = resolve_mask(mask, values.shape)
    return float(values[mask].mean()) if mask.any() else float("nan")


def nrmse(pred: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised root-mean-square error ``‖pred − ref‖ / ‖ref‖`` over the mask, all volumes.

    Parameters
    ----------
    pred, reference : ndarray, shape (X, Y, Z) or (X, Y, Z, K)
        Prediction and reference.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to compare.

    Returns
    -------
    float

    """
    return masked_nrmse(pred, reference, mask)


def psnr(
    pred: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    data_range: float | None = None,
) -> float:
    """Peak signal-to-noise ratio ``10 log10(L² / MSE)`` over the mask, all volumes.

    Parameters
    ----------
    pred, reference : ndarray, shape (X, Y, Z) or (X, Y, Z, K)
        Prediction and reference.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to compare.
    data_range : float, optional
        Peak value ``L``; default the maximum of ``reference`` in the mask.

    Returns
    -------
    float
        PSNR in dB; ``inf`` for identical images, NaN for an empty mask.

    """
    pred = np.asarray(pred, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if pred.shape != reference.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {reference.shape}")
    mask = resolve_mask(mask, reference.shape[:3])
    p, r = pred[mask], reference[mask]
    if r.size == 0:
        return float("nan")
    peak = float(r.max()) if data_range is None else float(data_range)
    mse = float(np.mean((p - r) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(peak**2 / mse))


def volume_ssim(
    pred: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    data_range: float | None = None,
) -> float:
    """Mean over volumes of the masked SSIM of each 3D volume.

    Parameters
    ----------
    pred, reference : ndarray, shape (X, Y, Z, K)
        Synthesised volumes and their references.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels whose local SSIM is averaged.
    data_range : float, optional
        Default: the maximum of ``reference`` in the mask (over all volumes).

    Returns
    -------
    float
        NaN when there are no volumes or the mask is empty.

    """
    pred = np.asarray(pred, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if pred.shape != reference.shape or pred.ndim != 4:
        raise ValueError(f"need two 4D arrays of one shape, got {pred.shape} and {reference.shape}")
    mask = resolve_mask(mask, reference.shape[:3])
    if reference.shape[3] == 0 or not mask.any():
        return float("nan")
    peak = float(reference[mask].max()) if data_range is None else float(data_range)
    if not peak > 0:
        return float("nan")
    values = [
        ssim(pred[..., k], reference[..., k], mask, data_range=peak)
        for k in range(reference.shape[3])
    ]
    return float(np.mean(values))


def rish_features(
    signal: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    order: int = RISH_ORDER,
    lambda_: float = RISH_LAMBDA,
) -> dict[int, np.ndarray]:
    """Rotation-invariant SH features of one shell: ``RISH_l = Σ_m c_lm²`` per voxel.

    The coefficients are a Laplace–Beltrami regularised least-squares fit in DIPY's real,
    symmetric ``descoteaux07`` basis (orthonormal, so the features are rotation invariant).

    Parameters
    ----------
    signal : ndarray, shape (X, Y, Z, N)
        Diffusion-weighted volumes of one shell.
    bvecs : ndarray, shape (N, 3)
        Their unit directions.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to compute (``None``: all).
    order : int, optional
        Highest even SH order (4 gives RISH L0, L2 and L4).
    lambda_ : float, optional
        Laplace–Beltrami regularisation weight.

    Returns
    -------
    dict
        ``{l: ndarray (V,)}`` for l = 0, 2, ..., order, over the voxels of the mask.

    """
    signal = np.asarray(signal)
    if signal.ndim != 4 or signal.shape[3] != np.shape(bvecs)[0]:
        raise ValueError(
            f"signal {signal.shape} and bvecs {np.shape(bvecs)} do not describe one shell"
        )
    mask = resolve_mask(mask, signal.shape[:3])
    basis, l_values = sh_basis_matrix(bvecs, order)
    penalty = lambda_ * np.diag((l_values * (l_values + 1.0)) ** 2)
    fit, *_ = np.linalg.lstsq(basis.T @ basis + penalty, basis.T, rcond=None)  # (C, N)
    coefficients = signal[mask].astype(np.float64) @ fit.T  # (V, C)
    return {
        int(ell): (coefficients[:, l_values == ell] ** 2).sum(axis=1)
        for ell in range(0, order + 1, 2)
    }


def nmse(pred: np.ndarray, reference: np.ndarray) -> float:
    """Normalised mean squared error ``‖pred − ref‖² / ‖ref‖²``.

    Parameters
    ----------
    pred, reference : ndarray
        Arrays of one shape.

    Returns
    -------
    float
        NaN when ``reference`` is zero or empty.

    """
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch: {p.shape} vs {r.shape}")
    denominator = float(np.sum(r * r))
    if r.size == 0 or denominator == 0.0:
        return float("nan")
    return float(np.sum((p - r) ** 2) / denominator)


def rish_nmse(
    signal: np.ndarray,
    bvecs: np.ndarray,
    reference: np.ndarray,
    reference_bvecs: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    order: int = RISH_ORDER,
) -> dict[int, float]:
    """NMSE of the RISH features of one shell against those of a reference shell.

    Parameters
    ----------
    signal : ndarray, shape (X, Y, Z, N)
        The shell under test (e.g. acquired + synthesised volumes).
    bvecs : ndarray, shape (N, 3)
        Its directions.
    reference : ndarray, shape (X, Y, Z, N')
        The reference shell (e.g. the full acquisition); directions may differ.
    reference_bvecs : ndarray, shape (N', 3)
        Its directions.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to compare.
    order : int, optional
        Highest SH order.

    Returns
    -------
    dict
        ``{l: NMSE}`` for l = 0, 2, ..., order.

    """
    test = rish_features(signal, bvecs, mask, order=order)
    ref = rish_features(reference, reference_bvecs, mask, order=order)
    return {ell: nmse(test[ell], ref[ell]) for ell in ref}
