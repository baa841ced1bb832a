"""Whether a run's up-sampling can be trusted: its noise level and three pass/warn checks.

Every number comes from the run itself (plain functions on arrays, used by the QC interfaces
and the reports):

* **Noise level** (`estimate_noise`): the noise standard deviation σ of the scan, from the
  spread of repeated b=0 volumes when there are at least two (no model involved), else from
  the residual of the tensor fit of the acquired volumes (model misfit counts as noise). Both
  take the *median* over the brain of each voxel's residual sum of squares, divided by the
  median of the χ² distribution with that voxel's degrees of freedom: a few voxels with
  dropouts, motion or a fit that diverges (CSF at high b) cannot move it.
  The self-check's *noise floor* (`noise_floor_nrmse`) is the NRMSE a perfect
  prediction would still have against the measured hidden volumes, whose own noise no method
  can predict: ``σ / RMS(hidden signal)``.
* **Checks** (`trust_checks`), each pass/warn against a stated threshold:

  1. self-check NRMSE at most `FLOOR_RATIO` x the noise floor (the prediction error is within
     noise: a perfect predictor scores 1.0 x, ``sqrt(2)`` x means an error as large as the noise);
  2. self-check NRMSE at most `SH_RATIO` x that of the ``sh`` engine on the same hidden
     directions (the engine is not worse than the classical fit it is meant to beat);
  3. |mean FA change| (merged - acquired-only, in the brain) at most `FA_CHANGE_LIMIT`: a
     classical up-sampler adds no information, so a systematic FA shift is a bias; note that
     on noisy scans the acquired-only FA is itself biased upward by noise, so a small drop can
     come from denoising.

  The verdict is ``pass`` when all checks that could be computed pass, else ``warn``. None of
  the thresholds depends on other subjects, so one run is judged on its own.
"""

from __future__ import annotations

import math

import numpy as np

#: Self-check NRMSE / noise floor up to which the prediction counts as within the noise.
FLOOR_RATIO = 1.5
#: Self-check NRMSE / that of ``sh`` on the same hidden directions allowed.
SH_RATIO = 1.05
#: Largest |mean FA change| (merged - acquired only) in the brain mask.
FA_CHANGE_LIMIT = 0.01
#: S0 / σ from which a scan counts as clean: there the default model (run ftM, 4 mirrors, mean
#: log signal from the prior) was measured 4-9 % better than DTI on the acquired directions
#: (sub-uih, b 930, S0/σ 77; sub-prisma, b 2000, S0/σ 75) and up to 6 % worse on simulated
#: brains at SNR 80 (docs/results.md, 2026-12-06, ftM and late evening); at SNR 40 it still
#: gained 2-10 %.
CLEAN_SCAN_SNR = 60.0
#: Brain extent (voxels) under which, along two axes, the field of view counts as small: the
#: SH-field network then runs on a mirrored window (``MIN_NETWORK_SIZE // 2`` of
#: `qid2_bidsapp.model.field_features`), far from the whole-brain views it was trained on.
SMALL_FIELD_VOXELS = 32


def estimate_noise(
    data: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray,
    *,
    b0_threshold: float = 50.0,
) -> tuple[float, str]:
    """Estimate the noise standard deviation of a DWI scan in the brain mask.

    Every brain voxel gives a residual sum of squares (RSS) with ``dof`` degrees of freedom;
    under Gaussian noise ``RSS / σ²`` follows χ²(dof), so ``σ² = median(RSS) / median(χ²(dof))``.
    The median makes the estimate robust to the voxels where the residual is not noise: motion
    between b=0 volumes, signal dropouts, and log-linear tensor fits that diverge where the
    diffusion-weighted signal is near zero (the mean of the squared residual used before
    2026-12-06 was 350 to 10^52 times too large on 3 of the 10 runs of ``bids-real`` from all
    their volumes, and up to 10^49 times from half their directions).

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
        The acquired volumes.
    bvals : ndarray, shape (V,)
        b-values.
    bvecs : ndarray, shape (V, 3)
        Directions.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
    b0_threshold : float
        b-values at or below it are b=0.

    Returns
    -------
    sigma : float
        Noise standard deviation in signal units (NaN for an empty mask or too few volumes).
    method : str
        ``"b0 repeats"`` (at least two b=0 volumes: the spread across them, no model involved)
        or ``"tensor residual"`` (the residual of a log-linear WLS tensor fit to all volumes,
        7 parameters, in the voxels whose every volume has signal).

    """
    from scipy.stats import chi2

    from .qc import _design_matrix, _wls_tensor

    mask = np.asarray(mask, dtype=bool)
    bvals = np.asarray(bvals, dtype=np.float64)
    if not mask.any():
        return float("nan"), "empty mask"
    voxels = np.asarray(data)[mask].astype(np.float64)
    is_b0 = bvals <= b0_threshold
    if int(is_b0.sum()) >= 2:
        dof = int(is_b0.sum()) - 1
        rss = voxels[:, is_b0].var(axis=1, ddof=1) * dof
        method = "b0 repeats"
    else:
        g = np.where(is_b0[:, None], 0.0, np.asarray(bvecs, dtype=np.float64))
        design = _design_matrix(np.where(is_b0, 0.0, bvals), g)
        dof = len(bvals) - design.shape[1]
        if dof < 1:
            return float("nan"), "too few volumes"
        voxels = voxels[(voxels > 0).all(axis=1)]  # the log of a zero is no measurement
        if not len(voxels):
            return float("nan"), "no signal"
        params = _wls_tensor(np.log(voxels), design, np.linalg.pinv(design))
        # a diverging fit predicts at most e times the voxel's largest signal
        ceiling = np.log(voxels.max(axis=1, keepdims=True)) + 1.0
        residual = voxels - np.exp(np.minimum(params @ design.T, ceiling))
        rss = np.sum(residual**2, axis=1)
        method = "tensor residual"
    return float(np.sqrt(np.median(rss) / chi2.median(dof))), method


def noise_floor_nrmse(sigma: float, hidden: np.ndarray, mask: np.ndarray) -> float:
    """NRMSE a perfect prediction of the hidden volumes would have: ``σ / RMS(hidden)``.

    Parameters
    ----------
    sigma : float
        Noise standard deviation (`estimate_noise`).
    hidden : ndarray, shape (X, Y, Z, K)
        The measured hidden volumes.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.

    Returns
    -------
    float
        NaN when it cannot be computed.

    """
    values = np.asarray(hidden)[np.asarray(mask, dtype=bool)].astype(np.float64)
    rms = float(np.sqrt(np.mean(values**2))) if values.size else 0.0
    if not (rms > 0 and math.isfinite(sigma)):
        return float("nan")
    return float(sigma / rms)


def _number(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value


def trust_checks(
    *,
    hidden_nrmse: float,
    noise_floor: float,
    sh_nrmse: float,
    fa_change: float,
) -> tuple[str, list[dict]]:
    """Judge one up-sampled shell from numbers its run measured.

    Parameters
    ----------
    hidden_nrmse : float
        Self-check NRMSE of the engine.
    noise_floor : float
        `noise_floor_nrmse` of the same hidden volumes.
    sh_nrmse : float
        Self-check NRMSE of the ``sh`` engine on the same hidden directions.
    fa_change : float
        Mean of (merged FA - acquired-only FA) in the brain mask (signed).

    Returns
    -------
    verdict : {"pass", "warn", "n/a"}
        ``n/a`` when no check could be computed.
    checks : list of dict
        ``name``, ``value``, ``threshold`` (text), ``status`` (pass, warn or n/a),
        ``meaning`` (one sentence).

    """
    nrmse, floor, sh, change = (
        _number(v) for v in (hidden_nrmse, noise_floor, sh_nrmse, fa_change)
    )
    checks = []

    def add(name, value, ok, threshold, meaning):
        status = "n/a" if not math.isfinite(value) else ("pass" if ok else "warn")
        checks.append(
            {"name": name, "value": value, "threshold": threshold, "status": status,
             "meaning": meaning}
        )  # fmt: skip

    ratio = nrmse / floor if floor > 0 else float("nan")
    add(
        "self-check / noise floor",
        ratio,
        ratio <= FLOOR_RATIO,
        f"<= {FLOOR_RATIO:g}",
        "error on hidden acquired directions relative to what their own noise allows "
        "(1.0 = a perfect prediction)",
    )
    ratio_sh = nrmse / sh if sh > 0 else float("nan")
    add(
        "self-check / sh",
        ratio_sh,
        ratio_sh <= SH_RATIO,
        f"<= {SH_RATIO:g}",
        "error on the same hidden directions relative to the classical SH fit",
    )
    add(
        "FA change (merged - acquired)",
        change,
        abs(change) <= FA_CHANGE_LIMIT,
        f"|.| <= {FA_CHANGE_LIMIT:g}",
        "mean FA shift in the brain that merging the synthesised volumes causes",
    )
    statuses = [c["status"] for c in checks if c["status"] != "n/a"]
    if not statuses:
        return "n/a", checks
    return ("pass" if all(s == "pass" for s in statuses) else "warn"), checks


def warned(checks: list[dict]) -> list[str]:
    """Return the names of the checks that warned (for a TSV column)."""
    return [c["name"] for c in checks if c["status"] == "warn"]


def small_field_of_view(mask: np.ndarray) -> tuple[int, int, int] | None:
    """Return the brain's bounding box when it is small along at least two axes.

    A scan this small (dipy's 10 x 10 x 10 ``small_64D`` crop, a thin-slab acquisition
    cropped in plane) gives the diffusion engine next to no spatial context, whatever axis it
    slices along.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.

    Returns
    -------
    tuple of int or None
        The bounding-box extents (voxels) when at least two are under `SMALL_FIELD_VOXELS`,
        otherwise None (also for an empty mask).

    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    extents = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        extents.append(int(present[-1] - present[0] + 1))
    if sum(e < SMALL_FIELD_VOXELS for e in extents) >= 2:
        return tuple(extents)
    return None
