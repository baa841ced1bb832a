"""Inputs of the SH-field model, as numpy arrays: the same code in training and inference.

For one shell with N acquired directions, every voxel gets (`shell_features`):

* the order-2 least-squares SH fit of ``S/S0`` (6 coefficients; a tensor-like fit, unbiased),
* the Laplace–Beltrami regularised fit at the model's order (λ = ``prior_lambda``; this is also
  the *prior* the network corrects and the output outside the brain mask),
* ``S0 / S0_ref`` (tissue contrast; ``S0_ref`` is the median b=0 signal in the brain mask, so
  nothing depends on the units of the signal), and the brain mask.

Coefficients are put in *model space* by multiplying order ``l`` by ``order_scales[l // 2]``
(`coefficient_scales`). The condition of slice z (`slice_condition`) stacks the features of
slices ``z - c .. z + c`` (``c = context_slices``; edge slices repeated at the volume's ends)
and three constant maps: b/1000, sqrt(6/N) and 1/sqrt(number of b=0 volumes averaged), then
the noise level (``noise_input``) and a summary of the whole input window (``summary_input``:
quantiles of the prior's anisotropy over its brain voxels, `window_summary`).

Directions are in the model frame of the slice axis (`model.data.model_frame_bvecs`): the
coefficients, and so the network's output, are expressed in the voxel axes of the slices.
"""

from __future__ import annotations

import functools

import numpy as np
from dipy.reconst.shm import sph_harm_ind_list

from ..shm import sh_basis_matrix, sh_fit_matrix
from .field_config import FieldConfig

#: S0 below this fraction of S0_ref counts as no signal (S/S0 set to 0).
RELATIVE_B0_EPS = 1e-3
#: Upper clip of S0 / S0_ref.
S0_RELATIVE_CLIP = 4.0


def order_of_coefficients(sh_order: int) -> np.ndarray:
    """Order ``l`` of each coefficient of the ``descoteaux07`` series up to `sh_order`.

    Parameters
    ----------
    sh_order : int
        Even maximal order.

    Returns
    -------
    ndarray of int, shape (C,)

    """
    return np.asarray(sph_harm_ind_list(int(sh_order))[1], dtype=int)


def coefficient_scales(config: FieldConfig, sh_order: int | None = None) -> np.ndarray:
    """Model-space multiplier of each coefficient (``order_scales[l // 2]``).

    Parameters
    ----------
    config : FieldConfig
        The model configuration.
    sh_order : int, optional
        Order of the series (default ``config.sh_order``; 2 for the order-2 fit).

    Returns
    -------
    ndarray, shape (C,), float64

    """
    orders = order_of_coefficients(config.sh_order if sh_order is None else sh_order)
    return np.asarray(config.order_scales, dtype=np.float64)[orders // 2]


def fit_matrices(bvecs: np.ndarray, config: FieldConfig) -> tuple[np.ndarray, np.ndarray]:
    """Matrices from the N acquired signals to the two fits, already in model space.

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        Acquired directions (model frame).
    config : FieldConfig
        The model configuration.

    Returns
    -------
    order2 : ndarray, shape (6, N)
        Least-squares order-2 fit (minimum-norm when N < 6), scaled.
    regularised : ndarray, shape (C, N)
        Regularised fit at ``config.sh_order`` with ``config.prior_lambda``, scaled.

    """
    order2 = sh_fit_matrix(bvecs, 2, 0.0) * coefficient_scales(config, 2)[:, None]
    regularised = sh_fit_matrix(bvecs, config.sh_order, config.prior_lambda)
    return order2, regularised * coefficient_scales(config)[:, None]


def reference_s0(b0: np.ndarray, mask: np.ndarray) -> float:
    """Return the S0 every relative quantity refers to: the median b=0 signal in the mask.

    Parameters
    ----------
    b0 : ndarray
        Mean b=0 image.
    mask : ndarray of bool
        Brain mask (same shape).

    Returns
    -------
    float
        Positive; falls back to the median of the positive b=0 values, then 1.

    """
    values = np.asarray(b0, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        values = np.asarray(b0, dtype=np.float64)
        values = values[np.isfinite(values) & (values > 0)]
    return float(np.median(values)) if values.size else 1.0


def relative_signal(signal: np.ndarray, b0: np.ndarray, s0_ref: float, clip: float) -> np.ndarray:
    """``S/S0`` clipped to ``[0, clip]``; 0 where ``S0 <= RELATIVE_B0_EPS * s0_ref``.

    Parameters
    ----------
    signal : ndarray, shape (..., N)
        Diffusion-weighted signal.
    b0 : ndarray, shape (...)
        Mean b=0 image.
    s0_ref : float
        `reference_s0`.
    clip : float
        Upper clip.

    Returns
    -------
    ndarray, shape (..., N), float32

    """
    b0 = np.asarray(b0, dtype=np.float32)[..., None]
    valid = b0 > RELATIVE_B0_EPS * s0_ref
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(valid, np.asarray(signal, dtype=np.float32) / np.where(valid, b0, 1), 0)
    return np.clip(np.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0), 0.0, clip)


#: Directions the tensor prior's signal is projected onto SH from (a fixed uniform set).
PRIOR_DIRECTIONS = 60
#: Lowest S/S0 taken before the logarithm of the tensor fit.
LOG_FLOOR = 1e-3
#: Voxels fitted at once by `dti_prior` (bounds its memory).
PRIOR_CHUNK = 65536


def _dense_directions() -> np.ndarray:
    from ..sim.protocol import uniform_shell

    return uniform_shell(PRIOR_DIRECTIONS, seed=0)


def dti_prior(
    ratio: np.ndarray, bvecs: np.ndarray, bval: float, n_b0: int, config: FieldConfig
) -> np.ndarray:
    """SH coefficients (model space) of the signal of a tensor fitted to one shell.

    The tensor and S0 are fitted per voxel (log-linear WLS, as DIPY's ``TensorModel``) to the
    shell's ``S/S0`` and to the b=0 image (ratio 1, counted `n_b0` times, at most 6); the fitted
    signal ``S0_fit/S0 · exp(-b gᵀDg)`` on `PRIOR_DIRECTIONS` fixed directions, clipped to
    ``[0, signal_clip]``, is projected onto the SH basis of order ``config.sh_order``. Merging
    volumes evaluated from it with the acquired ones and refitting a tensor gives back (up to
    that projection) the tensor of the acquired directions: DTI on the acquired directions.

    Parameters
    ----------
    ratio : ndarray, shape (..., N)
        ``S/S0`` of the shell (`relative_signal`).
    bvecs : ndarray, shape (N, 3)
        Directions (model frame).
    bval : float
        The shell's b-value.
    n_b0 : int
        b=0 volumes averaged into S0.
    config : FieldConfig
        The model configuration.

    Returns
    -------
    ndarray, shape (..., C), float32

    """
    from ..qc import _design_matrix, _wls_tensor

    shape = ratio.shape[:-1]
    flat = np.asarray(ratio).reshape(-1, ratio.shape[-1])
    reps = int(np.clip(n_b0, 1, 6))
    bvals = np.r_[np.zeros(reps), np.full(len(bvecs), float(bval))]
    g = np.vstack([np.zeros((reps, 3)), np.asarray(bvecs, dtype=np.float64)])
    design = _design_matrix(bvals, g)
    pinv = np.linalg.pinv(design)
    dense = _dense_directions()
    dense_design = _design_matrix(np.full(len(dense), float(bval)), dense)
    fit = sh_fit_matrix(dense, config.sh_order, 0.0) * coefficient_scales(config)[:, None]
    out = np.empty((len(flat), fit.shape[0]), dtype=np.float32)
    for start in range(0, len(flat), PRIOR_CHUNK):  # bounded memory on big volumes
        part = flat[start : start + PRIOR_CHUNK].astype(np.float64)
        log_signal = np.log(np.maximum(np.hstack([np.ones((len(part), reps)), part]), LOG_FLOOR))
        params = _wls_tensor(log_signal, design, pinv)
        with np.errstate(over="ignore"):
            fitted = np.exp(np.clip(params @ dense_design.T, -50.0, np.log(config.signal_clip)))
        out[start : start + PRIOR_CHUNK] = fitted @ fit.T
    return out.reshape(*shape, -1)


def shell_features(
    signal: np.ndarray,
    b0: np.ndarray,
    mask: np.ndarray,
    bvecs: np.ndarray,
    config: FieldConfig,
    *,
    s0_ref: float | None = None,
    bval: float = 1000.0,
    n_b0: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel features of one shell and the prior, in model space (slice axis last).

    Parameters
    ----------
    signal : ndarray, shape (X, Y, Z, N)
        Acquired diffusion-weighted volumes of the shell.
    b0 : ndarray, shape (X, Y, Z)
        Mean b=0 image.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
    bvecs : ndarray, shape (N, 3)
        Directions in the model frame.
    config : FieldConfig
        The model configuration.
    s0_ref : float, optional
        Reference S0 (default `reference_s0` of `b0` in `mask`).
    bval : float
        The shell's b-value (the ``dti`` prior needs it).
    n_b0 : int
        b=0 volumes averaged into `b0` (the ``dti`` prior weights the b=0 image by it).

    Returns
    -------
    features : ndarray, shape (X, Y, Z, F), float32
        ``F = config.features_per_slice``: the order-2 fit (``sh`` prior) or the tensor
        prior (``dti``), the regularised fit, S0/S0_ref, the mask.
    prior : ndarray, shape (X, Y, Z, C), float32
        The prior's coefficients (model space): a view of ``features``.

    """
    signal = np.asarray(signal)
    mask = np.asarray(mask, dtype=bool)
    if s0_ref is None:
        s0_ref = reference_s0(b0, mask)
    order2, regularised = fit_matrices(bvecs, config)
    ratio = relative_signal(signal, b0, s0_ref, config.signal_clip)
    nc = regularised.shape[0]
    features = np.empty((*signal.shape[:3], config.features_per_slice), dtype=np.float32)
    if config.prior == "dti":
        first = nc
        features[..., :nc] = dti_prior(ratio, bvecs, bval, n_b0, config)
        features[..., nc : 2 * nc] = ratio @ regularised.T.astype(np.float32)
    else:
        first = order2.shape[0]
        weights = np.vstack([order2, regularised]).T.astype(np.float32)  # (N, 6 + C)
        features[..., : first + nc] = ratio @ weights
    features[..., first + nc] = np.clip(np.asarray(b0) / s0_ref, 0.0, S0_RELATIVE_CLIP)
    features[..., first + nc + 1] = mask
    offset = config.prior_offset
    return features, features[..., offset : offset + nc]


def scalar_values(
    bval: float, n_directions: int, n_b0: int, noise_rel: float | None = None
) -> np.ndarray:
    """Return the constant maps of the condition.

    Parameters
    ----------
    bval : float
        The shell's b-value (map: b/1000).
    n_directions : int
        Acquired directions of the shell (map: sqrt(6/N)).
    n_b0 : int
        b=0 volumes averaged into S0 (map: 1/sqrt(n_b0)).
    noise_rel : float, optional
        Noise sigma / S0_ref, for models with ``noise_input`` (map: 10 x noise_rel).

    Returns
    -------
    ndarray, shape (N_SCALAR_CHANNELS,) or (N_SCALAR_CHANNELS + 1,), float32

    """
    values = [float(bval) / 1000.0, np.sqrt(6.0 / max(1, n_directions)), 1 / np.sqrt(max(1, n_b0))]
    if noise_rel is not None:
        values.append(10.0 * float(noise_rel) if np.isfinite(noise_rel) else 0.0)
    return np.asarray(values, dtype=np.float32)


def context_indices(z: int, n_slices: int, context: int) -> np.ndarray:
    """Slices ``z - context .. z + context``, clamped to the volume (edges repeated).

    Parameters
    ----------
    z : int
        Centre slice.
    n_slices : int
        Slices of the volume.
    context : int
        Slices on each side.

    Returns
    -------
    ndarray of int, shape (2 * context + 1,)

    """
    return np.clip(np.arange(z - context, z + context + 1), 0, n_slices - 1)


#: Quantiles of the window's anisotropy index given to ``summary_input`` models.
SUMMARY_QUANTILES = (0.25, 0.5, 0.75, 0.9)
#: Multiplier of the anisotropy index (typical brain values become about 0.1-1.5).
SUMMARY_SCALE = 4.0


def anisotropy_index(coefficients: np.ndarray, config: FieldConfig) -> np.ndarray:
    """Rotation-invariant anisotropy of a signal field: ``||c_2|| / c_00`` (RISH-2 over mean).

    Parameters
    ----------
    coefficients : ndarray, shape (..., C)
        Model-space coefficients (order ``config.sh_order``).
    config : FieldConfig
        The model configuration.

    Returns
    -------
    ndarray, shape (...), float64
        0 where ``c_00 <= 0``.

    """
    orders = order_of_coefficients(config.sh_order)
    plain = np.asarray(coefficients, dtype=np.float64) / coefficient_scales(config)
    l2 = np.sqrt(np.sum(plain[..., orders == 2] ** 2, axis=-1))
    c00 = plain[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c00 > 1e-6, l2 / np.where(c00 > 1e-6, c00, 1.0), 0.0)


def window_summary(features: np.ndarray, slices: np.ndarray, config: FieldConfig) -> np.ndarray:
    """Quantiles of the prior's anisotropy over the brain voxels of a window's slices.

    A summary of everything the network sees (the slice and its context, the whole in-plane
    window) that tells how anisotropic this brain is at this noise level; the same function
    builds it in training (on the crop) and at inference (on the slice's window).

    Parameters
    ----------
    features : ndarray, shape (H, W, Z, F)
        `shell_features`.
    slices : ndarray of int
        The slices of the window (`context_indices`).
    config : FieldConfig
        The model configuration.

    Returns
    -------
    ndarray, shape (len(SUMMARY_QUANTILES),), float32
        ``SUMMARY_SCALE`` x the `SUMMARY_QUANTILES` of `anisotropy_index`; zeros without
        brain voxels.

    """
    part = features[:, :, np.asarray(slices)]
    inside = part[..., config.features_per_slice - 1] > 0.5
    if not inside.any():
        return np.zeros(len(SUMMARY_QUANTILES), dtype=np.float32)
    start = config.prior_offset
    prior = part[inside][:, start : start + config.n_coefficients]
    index = anisotropy_index(prior, config)
    return (SUMMARY_SCALE * np.quantile(index, SUMMARY_QUANTILES)).astype(np.float32)


def slice_condition(
    features: np.ndarray,
    z: int,
    context: int,
    scalars: np.ndarray,
    config: FieldConfig | None = None,
) -> np.ndarray:
    """Condition of one slice: features of its context slices, then the scalar maps.

    Parameters
    ----------
    features : ndarray, shape (H, W, Z, F)
        `shell_features` (possibly cropped in plane).
    z : int
        The slice.
    context : int
        ``config.context_slices``.
    scalars : ndarray, shape (N_SCALAR_CHANNELS,)
        `scalar_values`.
    config : FieldConfig, optional
        The model configuration; for ``summary_input`` models the `window_summary` of these
        slices is appended to the scalar maps.

    Returns
    -------
    ndarray, shape (condition_channels, H, W), float32

    """
    idx = context_indices(z, features.shape[2], context)
    if config is not None and config.summary_input:
        scalars = np.concatenate([scalars, window_summary(features, idx, config)])
    h, w = features.shape[:2]
    stack = np.moveaxis(features[:, :, idx], (2, 3), (0, 1)).reshape(-1, h, w)
    consts = np.broadcast_to(np.asarray(scalars, np.float32)[:, None, None], (len(scalars), h, w))
    return np.concatenate([stack, consts], axis=0).astype(np.float32, copy=False)


def evaluation_matrix(bvecs: np.ndarray, config: FieldConfig) -> np.ndarray:
    """Map model-space coefficients to ``S/S0`` at directions.

    Parameters
    ----------
    bvecs : ndarray, shape (M, 3)
        Directions (model frame).
    config : FieldConfig
        The model configuration.

    Returns
    -------
    ndarray, shape (M, C), float64
        ``B(bvecs) / scales``: ``E @ c_model`` is the signal ratio at the directions.

    """
    basis, _ = sh_basis_matrix(np.asarray(bvecs, dtype=np.float64).reshape(-1, 3), config.sh_order)
    return basis / coefficient_scales(config)[None, :]


#: Floor of ``S/S0`` in `log_mean_scale` (a b = 3000 free-water signal is below it).
LOG_MEAN_FLOOR = 1e-3
#: Range of the `log_mean_scale` factor: only brightening is capped. Where prior and prediction
#: disagree on the mean signal by more than 2x, both are near the noise floor (free water at
#: high b). A factor above 2 (up to 85 in training crops) would make a voxel several times
#: brighter than its b = 0 signal, so it is capped. A factor below 1/2 darkens the prediction
#: to the tensor prior's mean signal, which is what the acquired directions measure; clipping
#: it at 1/2 (the range until 2026-12-06) left 5 % of the voxels of the training-site b = 2000
#: scans, all free water, up to 4x too bright, and their MD 0.10 um^2/ms too low (merged MD MAE
#: 1.07-1.27x DTI on the acquired directions; 0.95-1.06x without the lower clip, FA unchanged
#: within 0.003; docs/results.md).
LOG_MEAN_SCALE_RANGE = (0.0, 2.0)


def log_mean_matrix(config: FieldConfig) -> np.ndarray:
    """`evaluation_matrix` of the directions `log_mean_scale` averages over.

    Parameters
    ----------
    config : FieldConfig
        The model configuration.

    Returns
    -------
    ndarray, shape (362, C), float64
        DIPY's default sphere (a 362-direction hemisphere; the signal is antipodally symmetric).

    """
    return _sphere_basis(config.sh_order) / coefficient_scales(config)[None, :]


@functools.lru_cache(maxsize=4)
def _sphere_basis(sh_order: int) -> np.ndarray:
    """SH basis on DIPY's default sphere, computed once per order (read-only)."""
    from dipy.data import default_sphere

    basis, _ = sh_basis_matrix(np.asarray(default_sphere.vertices, dtype=np.float64), sh_order)
    basis.setflags(write=False)
    return basis


def log_mean_scale(
    predicted: np.ndarray, prior: np.ndarray, config: FieldConfig, *, floor: float = LOG_MEAN_FLOOR
) -> np.ndarray:
    """Per-voxel factor that gives a predicted signal the prior's mean log signal.

    The mean of ``log(S/S0)`` over the sphere is ``-b MD`` for a tensor, whatever its shape,
    so multiplying a prediction by this factor keeps its angular shape in the log domain (where
    a tensor fit reads FA) and gives it the mean diffusivity of the prior. The mean is taken
    over DIPY's default sphere (362 directions), not over the targets, so a target's signal
    does not depend on which other targets were asked for.

    Parameters
    ----------
    predicted, prior : ndarray, shape (..., C)
        Model-space coefficients of the prediction and of the prior (`shell_features`).
    config : FieldConfig
        The model configuration.
    floor : float
        ``S/S0`` below this counts as this before the logarithm.

    Returns
    -------
    ndarray, shape (...), float64
        ``exp(mean log prior - mean log predicted)``, at most 2 (`LOG_MEAN_SCALE_RANGE`); 1
        where both are at the floor. Computed in float32 when both inputs are float32 (as at
        inference), else in float64.

    """
    dtype = np.result_type(predicted, prior, np.float32)  # float32 in, float32 arithmetic
    evaluate = log_mean_matrix(config).astype(dtype)
    log_mean = [
        np.log(np.clip(np.asarray(c, dtype=dtype) @ evaluate.T, floor, None)).mean(-1)
        for c in (prior, predicted)
    ]
    return np.clip(np.exp(log_mean[0] - log_mean[1]), *LOG_MEAN_SCALE_RANGE).astype(np.float64)


#: The training crop. A brain's crop shorter than half of it along an axis (a tiny field of
#: view, such as dipy's 10 x 10 small_64D) runs on a window this long centred on the brain,
#: the image mirrored outside its edges (`network_window`, `mirrored_window`): the network
#: was trained on 64 x 64 views of tissue and its group-norm statistics change on tiny ones
#: (training may add such windows: ``small_field`` of `field_data.make_field_example`).
#: Measured on small_64D
#: (32 -> 64, candidate model): FA MAE 0.0515 on the bare 12 x 12 crop, 0.074 centred in
#: zeros, 0.043 mirrored (DTI on the given directions: 0.034). On the 61-voxel-wide simulated
#: brains the mirrored 64 window was 0.0001-0.0009 worse than the crop itself, hence the
#: threshold at half.
MIN_NETWORK_SIZE = 64


def network_window(
    lo: int, hi: int, start: int, stop: int, min_size: int = MIN_NETWORK_SIZE
) -> tuple[int, int]:
    """In-plane extent the network runs on along one axis (may reach outside the image).

    Parameters
    ----------
    lo, hi : int
        The brain mask's bounding box along the axis (``hi`` exclusive).
    start, stop : int
        The crop of `SliceGrid` (bounding box and margin, clamped to the image).
    min_size : int
        Smallest extent.

    Returns
    -------
    tuple of int
        ``(start, stop)``: the crop itself when it is at least half of `min_size`, otherwise
        `min_size` voxels centred on the bounding box (outside the image the condition is
        mirrored, see `MIN_NETWORK_SIZE`).

    """
    if stop - start >= min_size // 2:
        return int(start), int(stop)
    first = (int(lo) + int(hi) - int(min_size)) // 2
    return first, first + int(min_size)


def brain_windows(
    mask: np.ndarray, crops: tuple, min_size: int = MIN_NETWORK_SIZE
) -> tuple[tuple[int, int], tuple[int, int]]:
    """In-plane windows (rows, cols) the network runs on for a brain mask (`network_window`).

    Parameters
    ----------
    mask : ndarray of bool, shape (H, W, Z)
        Brain mask, slices last (not empty).
    crops : tuple of tuple of int
        ``((row_start, row_stop), (col_start, col_stop))``: the in-plane crop the slices are
        cut to (`SliceGrid`; the whole image for a tiny scan).
    min_size : int
        Smallest extent.

    Returns
    -------
    tuple of tuple of int
        ``(rows, cols)``, each ``(start, stop)``; may reach outside the image.

    """
    windows = []
    for axis, crop in zip((0, 1), crops, strict=True):
        present = np.flatnonzero(
            np.asarray(mask).any(axis=tuple(a for a in (0, 1, 2) if a != axis))
        )
        windows.append(network_window(present[0], present[-1] + 1, *crop, min_size=min_size))
    return windows[0], windows[1]


def mirrored_window(array: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """``array[r0:r1, c0:c1]``, mirrored (``numpy.pad`` "symmetric") outside the image.

    Parameters
    ----------
    array : ndarray, shape (H, W, ...)
        The image (its first two axes are in plane).
    rows, cols : tuple of int
        ``(start, stop)`` along each axis; may reach outside the image (`network_window`).

    Returns
    -------
    ndarray, shape (r1 - r0, c1 - c0, ...)

    """
    (r0, r1), (c0, c1) = rows, cols
    pad = [(max(0, -r0), max(0, r1 - array.shape[0])), (max(0, -c0), max(0, c1 - array.shape[1]))]
    pad += [(0, 0)] * (array.ndim - 2)
    padded = np.pad(array, pad, mode="symmetric")
    a, b = r0 + pad[0][0], c0 + pad[1][0]
    return padded[a : a + r1 - r0, b : b + c1 - c0]
