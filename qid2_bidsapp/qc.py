"""Quality control on plain arrays: DTI/FA, error metrics and the hidden-direction self-check."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Fraction of a shell's acquired directions hidden for the self-check.
HIDDEN_FRACTION = 0.1
#: Directions that must remain in a shell after hiding some (a tensor has 6 parameters).
MIN_REMAINING_DIRECTIONS = 6


@dataclass
class DTIResult:
    """Maps from a single-tensor fit.

    Attributes
    ----------
    fa : ndarray, shape (X, Y, Z), float32
        Fractional anisotropy, 0 outside the mask and where the fit is undefined.
    md : ndarray, shape (X, Y, Z), float32
        Mean diffusivity (mm^2/s when b is in s/mm^2), 0 outside the mask.
    evec1 : ndarray, shape (X, Y, Z, 3), float32
        Principal eigenvector, 0 outside the mask.

    """

    fa: np.ndarray
    md: np.ndarray
    evec1: np.ndarray


def resolve_mask(mask: np.ndarray | None, spatial_shape: tuple[int, ...]) -> np.ndarray:
    """Return ``mask`` as a boolean array of ``spatial_shape`` (all True when ``None``).

    Parameters
    ----------
    mask : ndarray, optional
        Voxel mask (any dtype; non-zero is inside).
    spatial_shape : tuple of int
        Shape the mask must have.

    Returns
    -------
    ndarray of bool

    Raises
    ------
    ValueError
        When the mask's shape is not `spatial_shape`.

    """
    if mask is None:
        return np.ones(spatial_shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(spatial_shape):
        raise ValueError(
            f"mask shape {mask.shape} does not match image shape {tuple(spatial_shape)}"
        )
    return mask


_MIN_SIGNAL = 1e-4
_CHUNK_VOXELS = 65536


def _design_matrix(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """Log-linear DTI design matrix (N, 7): Dxx, Dyy, Dzz, Dxy, Dxz, Dyz, log S0."""
    g = np.asarray(bvecs, dtype=np.float64)
    b = np.asarray(bvals, dtype=np.float64)[:, None]
    gx, gy, gz = g[:, 0:1], g[:, 1:2], g[:, 2:3]
    cols = [gx * gx, gy * gy, gz * gz, 2 * gx * gy, 2 * gx * gz, 2 * gy * gz]
    return np.hstack([-b * c for c in cols] + [np.ones_like(b)])


def _wls_tensor(log_signal: np.ndarray, design: np.ndarray, pinv: np.ndarray) -> np.ndarray:
    """Batched weighted least squares (weights = squared OLS-predicted signal), (V, 7)."""
    ols = log_signal @ pinv.T
    predicted = ols @ design.T  # (V, N) log signal
    # weights are defined up to a factor per voxel: scale them to max 1 against underflow
    weights = np.exp(2.0 * (predicted - predicted.max(axis=1, keepdims=True)))
    # XᵀWX and XᵀWy for every voxel as two matrix products (outer products of design rows)
    outer = np.einsum("ni,nj->nij", design, design).reshape(len(design), -1)  # (N, 49)
    normal = (weights @ outer).reshape(-1, 7, 7)
    rhs = (weights * log_signal) @ design
    try:
        return np.linalg.solve(normal, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:  # a degenerate voxel: solve one by one, OLS where singular
        params = ols.copy()
        for v in range(len(params)):
            try:
                params[v] = np.linalg.solve(normal[v], rhs[v])
            except np.linalg.LinAlgError:
                pass
        return params


def _tensor_maps(params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FA, MD and principal eigenvector from (V, 7) tensor parameters."""
    dxx, dyy, dzz, dxy, dxz, dyz = (params[:, k] for k in range(6))
    tensor = np.stack(
        [
            np.stack([dxx, dxy, dxz], -1),
            np.stack([dxy, dyy, dyz], -1),
            np.stack([dxz, dyz, dzz], -1),
        ],
        axis=-2,
    )
    evals, evecs = np.linalg.eigh(tensor)  # ascending
    evals = np.clip(evals, 0.0, None)  # as DIPY: negative eigenvalues are set to 0
    md = evals.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        fa = np.sqrt(1.5 * ((evals - md[:, None]) ** 2).sum(-1) / (evals**2).sum(-1))
    return np.nan_to_num(fa), md, evecs[..., :, 2]


def _fit_dti_voxels(
    voxels: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, b0_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit WLS DTI to a (V, N) array of voxel signals; return FA (V,), MD (V,), evec1 (V, 3).

    The estimator of DIPY's ``TensorModel(fit_method="WLS")`` (OLS, then one weighted fit with
    the squared predicted signal as weights), solved for all voxels at once through the 7x7
    normal equations: tens of times faster than a per-voxel pseudo-inverse. Signals are
    clamped below at the smallest positive signal of the data, as DIPY's default
    ``min_signal`` does, so FA and MD do not depend on the units of the signal.
    """
    n_vox = voxels.shape[0]
    fa = np.zeros(n_vox, np.float32)
    md = np.zeros(n_vox, np.float32)
    evec1 = np.zeros((n_vox, 3), np.float32)
    bvecs = np.where((np.asarray(bvals) <= b0_threshold)[:, None], 0.0, bvecs)
    bvals = np.where(np.asarray(bvals) <= b0_threshold, 0.0, bvals)
    design = _design_matrix(bvals, bvecs)
    pinv = np.linalg.pinv(design)
    positive = voxels[voxels > 0]
    min_signal = float(positive.min()) if positive.size else _MIN_SIGNAL
    for start in range(0, n_vox, _CHUNK_VOXELS):
        chunk = slice(start, start + _CHUNK_VOXELS)
        log_signal = np.log(np.maximum(voxels[chunk].astype(np.float64), min_signal))
        params = _wls_tensor(log_signal, design, pinv)
        fa[chunk], md[chunk], evec1[chunk] = _tensor_maps(params)
    return np.clip(fa, 0.0, 1.0), md, evec1


def fit_dti(
    data: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    b0_threshold: float = 50.0,
) -> DTIResult:
    """Fit a single-tensor model (WLS, the estimator of DIPY's TensorModel) in the mask.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
        DWI volumes (any b-values, including b=0).
    bvals : ndarray, shape (V,)
        b-values in s/mm^2.
    bvecs : ndarray, shape (V, 3)
        Unit gradient directions (any values for b=0 volumes).
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to fit; ``None`` fits every voxel.
    b0_threshold : float, optional
        b-values at or below this count as b=0.

    Returns
    -------
    DTIResult
        FA, MD and principal eigenvector, 0 outside the mask; NaN replaced by 0.

    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be 4D (X, Y, Z, V), got shape {data.shape}")
    spatial = data.shape[:3]
    mask = resolve_mask(mask, spatial)
    fa_v, md_v, evec_v = _fit_dti_voxels(data[mask].astype(np.float64), bvals, bvecs, b0_threshold)
    fa = np.zeros(spatial, np.float32)
    md = np.zeros(spatial, np.float32)
    evec1 = np.zeros((*spatial, 3), np.float32)
    fa[mask], md[mask], evec1[mask] = fa_v, md_v, evec_v
    return DTIResult(fa=fa, md=md, evec1=evec1)


def colour_fa(fa: np.ndarray, evec1: np.ndarray) -> np.ndarray:
    """Directionally encoded colour FA.

    Parameters
    ----------
    fa : ndarray, shape (X, Y, Z)
        Fractional anisotropy.
    evec1 : ndarray, shape (X, Y, Z, 3)
        Principal eigenvector.

    Returns
    -------
    ndarray, shape (X, Y, Z, 3), float32
        ``|evec1| * fa`` (red = x, green = y, blue = z), clipped to [0, 1]; NaN becomes 0.

    """
    rgb = np.abs(np.asarray(evec1, dtype=np.float32)) * np.asarray(fa, np.float32)[..., None]
    return np.clip(np.nan_to_num(rgb, nan=0.0), 0.0, 1.0)


def _masked_values(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Return the values of ``a`` in the mask as float64, (V,) or (V, K)."""
    a = np.asarray(a)
    if mask is None:
        return a.astype(np.float64)
    return a[resolve_mask(mask, a.shape[: np.ndim(mask)])].astype(np.float64)


def masked_nrmse(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised root-mean-square error ``‖pred − truth‖ / ‖truth‖`` in the mask.

    Parameters
    ----------
    pred, truth : ndarray, shape (X, Y, Z) or (X, Y, Z, K)
        Prediction and reference (every volume counts).
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to compare; ``None`` compares every voxel.

    Returns
    -------
    float
        The NRMSE; NaN when the mask is empty or ``truth`` is zero in it.

    """
    if np.shape(pred) != np.shape(truth):
        raise ValueError(f"shape mismatch: {np.shape(pred)} vs {np.shape(truth)}")
    p, t = _masked_values(pred, mask), _masked_values(truth, mask)
    denominator = np.linalg.norm(t)
    if t.size == 0 or denominator == 0:
        return float("nan")
    return float(np.linalg.norm(p - t) / denominator)


def masked_mae(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute difference in the mask.

    Parameters
    ----------
    a, b : ndarray, shape (X, Y, Z) or (X, Y, Z, K)
        Images to compare (every volume counts).
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to compare; ``None`` compares every voxel.

    Returns
    -------
    float
        ``mean(|a − b|)`` over the mask; NaN when the mask is empty.

    """
    if np.shape(a) != np.shape(b):
        raise ValueError(f"shape mismatch: {np.shape(a)} vs {np.shape(b)}")
    diff = np.abs(_masked_values(a, mask) - _masked_values(b, mask))
    return float(diff.mean()) if diff.size else float("nan")


def _antipodal_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return ``|a · b|`` for unit row vectors, clipped to [0, 1] (larger = closer)."""
    return np.clip(np.abs(a @ b.T), 0.0, 1.0)


def choose_hidden_directions(bvecs: np.ndarray, n_hidden: int, seed: int = 0) -> np.ndarray:
    """Pick a spread-out, deterministic subset of directions to hide.

    Greedy farthest-point sampling by antipodally symmetric angle: the first direction is
    drawn with ``numpy.random.default_rng(seed)``; each next one is the direction farthest
    from all chosen so far (ties broken by lowest index).

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        Unit directions of one shell.
    n_hidden : int
        Number of directions to pick, ``0 <= n_hidden <= N``.
    seed : int, optional
        Seed of the starting direction.

    Returns
    -------
    ndarray of int, shape (n_hidden,)
        Sorted indices into ``bvecs``.

    """
    b = np.asarray(bvecs, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 3:
        raise ValueError(f"bvecs must have shape (N, 3), got {b.shape}")
    n = b.shape[0]
    if int(n_hidden) != n_hidden or not 0 <= n_hidden <= n:
        raise ValueError(f"n_hidden must be an integer between 0 and {n}, got {n_hidden}")
    if n_hidden == 0:
        return np.zeros(0, dtype=np.intp)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    chosen = [int(np.random.default_rng(seed).integers(n))]
    closeness = _antipodal_cos(b, b[chosen[0]][None, :])[:, 0]  # max |cos| to chosen set
    for _ in range(int(n_hidden) - 1):
        closeness[chosen] = np.inf
        nxt = int(np.argmin(closeness))
        chosen.append(nxt)
        closeness = np.maximum(closeness, _antipodal_cos(b, b[nxt][None, :])[:, 0])
    return np.sort(np.asarray(chosen, dtype=np.intp))


def default_n_hidden(n_directions: int) -> int:
    """Return how many of a shell's directions to hide for the self-check.

    Parameters
    ----------
    n_directions : int
        Acquired directions of the shell.

    Returns
    -------
    int
        About 10 % of the shell, at least 1, leaving at least 6 directions; 0 when the shell
        has fewer than 7 directions.

    """
    n_directions = int(n_directions)
    if n_directions < MIN_REMAINING_DIRECTIONS + 1:
        return 0
    n_hidden = max(1, int(round(HIDDEN_FRACTION * n_directions)))
    return min(n_hidden, n_directions - MIN_REMAINING_DIRECTIONS)


def _mean_b0(data: np.ndarray, bvals: np.ndarray, b0_threshold: float) -> np.ndarray:
    """Mean of the b=0 volumes of ``data`` as float32."""
    is_b0 = np.asarray(bvals) <= b0_threshold
    if not np.any(is_b0):
        raise ValueError(f"no b=0 volume (b <= {b0_threshold}) in the data")
    return data[..., is_b0].mean(axis=-1, dtype=np.float64).astype(np.float32)


def _nan_check(n_hidden: int) -> dict:
    """Self-check result when nothing can be hidden."""
    nan = float("nan")
    return {
        "hidden_n": int(n_hidden),
        "hidden_nrmse": nan,
        "hidden_fa_mae": nan,
        "hidden_nrmse_sh": nan,
        "hidden_nrmse_floor": nan,
    }


def hidden_direction_check(
    data: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    shell_indices: np.ndarray,
    engine,
    mask: np.ndarray | None,
    *,
    n_hidden: int | None = None,
    seed: int = 0,
    fa_reference: np.ndarray | None = None,
    b0_threshold: float = 50.0,
    noise_sigma: float | None = None,
) -> dict:
    """Self-check of an engine on one shell: hide acquired directions and predict them.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
        All acquired volumes (every shell and the b=0 volumes).
    bvals : ndarray, shape (V,)
        b-values in s/mm^2.
    bvecs : ndarray, shape (V, 3)
        Unit gradient directions.
    shell_indices : array of int
        Volume indices of the shell under test.
    engine : Upsampler
        Engine whose ``predict`` synthesises the hidden directions from the rest of the shell.
    mask : ndarray of bool, shape (X, Y, Z) or None
        Brain mask (``None``: every voxel).
    n_hidden : int, optional
        Directions to hide; default :func:`default_n_hidden` of the shell size.
    seed : int, optional
        Seed of :func:`choose_hidden_directions`.
    fa_reference : ndarray, shape (X, Y, Z), optional
        FA of DTI on all volumes of ``data``; computed when ``None``.
    b0_threshold : float, optional
        b-values at or below this count as b=0.
    noise_sigma : float, optional
        Noise standard deviation of the scan (`trust.estimate_noise`), for the noise floor.

    Returns
    -------
    dict
        ``hidden_n`` (int), ``hidden_nrmse`` (NRMSE of the predicted hidden volumes in the
        mask), ``hidden_fa_mae`` (mean absolute FA difference in the mask between DTI on
        all volumes and DTI with the hidden volumes replaced by their predictions),
        ``hidden_nrmse_sh`` (the same NRMSE of the ``sh`` engine at its defaults: the
        classical baseline) and ``hidden_nrmse_floor`` (what a perfect prediction would score:
        `trust.noise_floor_nrmse`; NaN without `noise_sigma`); the metrics are NaN when
        ``hidden_n`` is 0.

    """
    data = np.asarray(data)
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    shell = np.asarray(shell_indices, dtype=np.intp).reshape(-1)
    if n_hidden is None:
        n_hidden = default_n_hidden(shell.size)
    if n_hidden == 0:
        return _nan_check(0)
    if shell.size - n_hidden < 1:
        raise ValueError(f"cannot hide {n_hidden} of {shell.size} directions")
    mask = resolve_mask(mask, data.shape[:3])

    local_hidden = choose_hidden_directions(bvecs[shell], n_hidden, seed)
    hidden = shell[local_hidden]
    kept = np.delete(shell, local_hidden)
    configure = getattr(engine, "set_acquisition", None)
    if callable(configure):  # engines conditioned on the S0 noise (qid2 SH-field models)
        sigma = noise_sigma
        if sigma is None and getattr(engine, "needs_noise", False):
            from .trust import estimate_noise

            # the noise of the volumes the engine is given (hidden ones excluded)
            given = np.r_[np.flatnonzero(bvals <= b0_threshold), kept]
            sigma, _ = estimate_noise(data[..., given], bvals[given], bvecs[given], mask)
        configure(n_b0=int(np.count_nonzero(bvals <= b0_threshold)), noise_sigma=sigma)
    prediction = engine.predict(
        data[..., kept].astype(np.float32),
        _mean_b0(data, bvals, b0_threshold),
        bvecs[kept],
        bvecs[hidden],
        float(np.median(bvals[shell])),
        mask,
    )
    nrmse = masked_nrmse(prediction, data[..., hidden], mask)
    if getattr(engine, "name", None) == "sh":
        nrmse_sh = nrmse
    else:
        from .engines.sh import SHUpsampler

        baseline = SHUpsampler().predict(
            data[..., kept].astype(np.float32), None, bvecs[kept], bvecs[hidden], 0.0, mask
        )
        nrmse_sh = masked_nrmse(baseline, data[..., hidden], mask)
    floor = float("nan")
    if noise_sigma is not None:
        from .trust import noise_floor_nrmse

        floor = noise_floor_nrmse(noise_sigma, data[..., hidden], mask)

    if fa_reference is None:
        fa_reference = fit_dti(data, bvals, bvecs, mask, b0_threshold=b0_threshold).fa
    voxels = data[mask].astype(np.float64)
    voxels[:, hidden] = prediction[mask]
    fa_replaced, _, _ = _fit_dti_voxels(voxels, bvals, bvecs, b0_threshold)
    fa_mae = masked_mae(fa_replaced, np.asarray(fa_reference)[mask], None)
    return {
        "hidden_n": int(n_hidden),
        "hidden_nrmse": nrmse,
        "hidden_fa_mae": fa_mae,
        "hidden_nrmse_sh": nrmse_sh,
        "hidden_nrmse_floor": floor,
    }
