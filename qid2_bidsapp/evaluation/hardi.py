"""HARDI metrics: DIPY constrained spherical deconvolution on a test acquisition vs a reference.

HARDI users are the ones who need more directions, so the evaluation also asks what the
up-sampled data give to CSD (Tournier et al. 2007, DIPY's ``ConstrainedSphericalDeconvModel``):

* **ACC** — angular correlation coefficient of the fODF SH coefficients of orders >= 2
  (Anderson 2005), test against reference, per voxel (the shorter series zero-padded);
* **peak angular error** — angle (degrees, antipodal) between the largest fODF peaks.

Both in white matter (reference FA > `WM_FA`), on at most `MAX_VOXELS` voxels (every k-th),
with ONE response function, estimated from the reference acquisition and used for every fit,
so that the metric compares signals, not response estimates.
"""

from __future__ import annotations

import numpy as np

from ..shm import sh_order_for

#: White matter for the HARDI metrics: reference FA above this.
WM_FA = 0.3
#: Largest number of voxels fitted (an evenly strided subset beyond it).
MAX_VOXELS = 6000
#: Lowest CSD order: fewer directions are deconvolved super-resolved at this order (the
#: non-negativity constraint makes it well posed; at order 4 with exactly 15 directions DIPY's
#: CSD is unstable: ACC -0.5 on the phantom where order 6 gives 0.99).
MIN_CSD_ORDER = 6


def _gtab(bvals, bvecs, b0_threshold):
    from dipy.core.gradients import gradient_table

    return gradient_table(
        np.asarray(bvals, float), bvecs=np.asarray(bvecs, float), b0_threshold=b0_threshold
    )


def csd_order(n_directions: int) -> int:
    """CSD order for a shell: the SH order its direction count allows, at least 6, at most 8."""
    return max(MIN_CSD_ORDER, sh_order_for(int(n_directions)))


def _fit_odf(voxels: np.ndarray, gtab, response, order: int) -> np.ndarray:
    from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel

    model = ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=order)
    return np.asarray(model.fit(voxels).shm_coeff, dtype=np.float64)


def _pad(coefs: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((coefs.shape[0], n))
    out[:, : coefs.shape[1]] = coefs
    return out


def angular_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ACC of two sets of SH coefficient vectors (orders >= 2; zero-padded to one length).

    Parameters
    ----------
    a, b : ndarray, shape (V, Ca), (V, Cb)
        ``descoteaux07`` coefficients (order 0 first).

    Returns
    -------
    ndarray, shape (V,)
        In [-1, 1]; NaN where either fODF is isotropic.

    """
    n = max(a.shape[1], b.shape[1])
    a, b = _pad(a, n)[:, 1:], _pad(b, n)[:, 1:]
    norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (a * b).sum(axis=1) / norm, np.nan)


def peak_directions(coefs: np.ndarray, sphere=None) -> np.ndarray:
    """Direction of the largest fODF amplitude of each voxel (on DIPY's default sphere).

    Parameters
    ----------
    coefs : ndarray, shape (V, C)
        fODF coefficients.
    sphere : dipy Sphere, optional
        Directions searched (default: ``dipy.data.default_sphere``, 362 points).

    Returns
    -------
    ndarray, shape (V, 3)

    """
    from dipy.data import default_sphere
    from dipy.reconst.shm import order_from_ncoef, sh_to_sf

    sphere = default_sphere if sphere is None else sphere
    amplitudes = sh_to_sf(
        coefs, sphere, sh_order_max=order_from_ncoef(coefs.shape[1]), basis_type="descoteaux07"
    )
    return sphere.vertices[np.argmax(amplitudes, axis=1)]


def hardi_metrics(
    test: np.ndarray,
    test_bvals: np.ndarray,
    test_bvecs: np.ndarray,
    reference: np.ndarray,
    ref_bvals: np.ndarray,
    ref_bvecs: np.ndarray,
    wm_mask: np.ndarray,
    *,
    b0_threshold: float = 50.0,
    reference_odf: np.ndarray | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """CSD of a test acquisition against a reference, in white matter.

    Parameters
    ----------
    test : ndarray, shape (X, Y, Z, Vt)
        The acquisition under test (e.g. acquired + synthesised, or the input subset).
    test_bvals, test_bvecs : ndarray
        Its gradients.
    reference : ndarray, shape (X, Y, Z, Vr)
        The reference acquisition (full scan, or the noise-free truth).
    ref_bvals, ref_bvecs : ndarray
        Its gradients.
    wm_mask : ndarray of bool, shape (X, Y, Z)
        Voxels scored (e.g. reference FA > `WM_FA` in the brain).
    b0_threshold : float
        b-values at or below it are b=0.
    reference_odf : ndarray, optional
        The reference fODF coefficients of these voxels (from an earlier call), to reuse.

    Returns
    -------
    metrics : dict
        ``csd_acc`` (median ACC), ``csd_peak_deg`` (median main-peak angle), ``csd_voxels``.
    reference_odf : ndarray
        The reference fODF coefficients (pass back to score other tests on the same voxels).

    """
    from dipy.reconst.csdeconv import auto_response_ssst

    index = np.flatnonzero(np.asarray(wm_mask, bool).reshape(-1))
    if index.size == 0:
        nan = float("nan")
        return {"csd_acc": nan, "csd_peak_deg": nan, "csd_voxels": 0}, np.zeros((0, 1))
    index = index[:: max(1, int(np.ceil(index.size / MAX_VOXELS)))]
    spatial = np.prod(reference.shape[:3])
    ref_gtab = _gtab(ref_bvals, ref_bvecs, b0_threshold)
    test_gtab = _gtab(test_bvals, test_bvecs, b0_threshold)
    response, _ = auto_response_ssst(ref_gtab, reference, roi_radii=10, fa_thr=0.7)
    if reference_odf is None:
        ref_vox = reference.reshape(spatial, -1)[index].astype(np.float64)
        n_ref = int(np.sum(np.asarray(ref_bvals) > b0_threshold))
        reference_odf = _fit_odf(ref_vox, ref_gtab, response, csd_order(n_ref))
    test_vox = test.reshape(spatial, -1)[index].astype(np.float64)
    n_test = int(np.sum(np.asarray(test_bvals) > b0_threshold))
    test_odf = _fit_odf(test_vox, test_gtab, response, csd_order(n_test))
    acc = angular_correlation(test_odf, reference_odf)
    cos = np.abs(np.sum(peak_directions(test_odf) * peak_directions(reference_odf), axis=1))
    angle = np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))
    return {
        "csd_acc": float(np.nanmedian(acc)),
        "csd_peak_deg": float(np.median(angle)),
        "csd_voxels": int(index.size),
    }, reference_odf
