"""Per-brain tissue maps on the driver grid, and sampling them at arbitrary positions.

White matter follows the driver subject (its FA and its fibre peaks, so the fibre field and the
white-matter fraction agree); the tissue priors split the rest between grey matter and CSF.
The MNI priors are not used for white matter because the driver subject is only roughly
aligned with MNI space (the correlation of its FA with the MNI WM prior is about 0.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .anatomy import Anatomy
from .signal import TissueParams


@dataclass
class TissueMaps:
    """Per-brain maps on the driver grid.

    Attributes
    ----------
    fractions : ndarray, shape (X, Y, Z, 3), float32
        WM, GM, CSF volume fractions (0 outside the brain).
    f_intra : ndarray, shape (X, Y, Z), float32
        Intra-axonal fraction of white matter.
    fibre_dirs : ndarray, shape (X, Y, Z, 3, 3), float32
        Unit fibre directions (voxel-axis frame), defined everywhere (nearest fibre voxel).
    fibre_weights : ndarray, shape (X, Y, Z, 3), float32
        Fibre population weights (sum 1).

    """

    fractions: np.ndarray
    f_intra: np.ndarray
    fibre_dirs: np.ndarray
    fibre_weights: np.ndarray


@lru_cache(maxsize=4)
def _filled_peaks(anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of every grid voxel: its own, or those of the nearest voxel that has one."""
    has_peak = anatomy.peak_amps[..., 0] > 0
    _, index = ndimage.distance_transform_edt(~has_peak, return_indices=True)
    nearest = tuple(index)
    return anatomy.peak_dirs[nearest], anatomy.peak_amps[nearest]


def tissue_maps(anatomy: Anatomy, params: TissueParams) -> TissueMaps:
    """Derive the tissue maps of one simulated brain from the drivers.

    Parameters
    ----------
    anatomy : Anatomy
        Drivers and priors (`load_anatomy`).
    params : TissueParams
        The brain's parameters (FA thresholds, peak threshold, intra-axonal fraction).

    Returns
    -------
    TissueMaps
        ``f_wm = clip((FA - fa_low) / (fa_high - fa_low), 0, 1)``; the rest split between GM
        and CSF in the ratio of their priors; fibre weights proportional to the peak
        amplitudes above ``peak_threshold`` times the largest; ``f_intra = f_intra_max *
        clip(A / A90, 0.3, 1)`` with A the summed kept amplitude (fibre density) and A90 its
        90th percentile in white matter.

    """
    mask = anatomy.mask
    dirs, amps = _filled_peaks(anatomy)
    keep = amps >= params.peak_threshold * amps[..., :1]
    kept = np.where(keep, amps, 0.0)
    total = kept.sum(axis=-1)
    weights = kept / np.maximum(total, 1e-12)[..., None]

    span = max(params.fa_high - params.fa_low, 1e-3)
    f_wm = np.clip((anatomy.fa - params.fa_low) / span, 0.0, 1.0) * mask
    wm_prior, gm_prior, csf_prior = np.moveaxis(anatomy.priors, -1, 0)
    gm_share = (gm_prior + 0.01) / (gm_prior + csf_prior + 0.02)
    rest = (1.0 - f_wm) * mask
    fractions = np.stack([f_wm, rest * gm_share, rest * (1.0 - gm_share)], axis=-1)

    white = mask & (f_wm > 0.5)
    reference = np.percentile(total[white], 90) if white.any() else max(total.max(), 1e-6)
    f_intra = params.f_intra_max * np.clip(total / max(reference, 1e-6), 0.3, 1.0)
    return TissueMaps(
        fractions=fractions.astype(np.float32),
        f_intra=f_intra.astype(np.float32),
        fibre_dirs=dirs.astype(np.float32),
        fibre_weights=weights.astype(np.float32),
    )


def sample_linear(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Trilinear samples of a (X, Y, Z[, C]) volume at voxel coordinates (n, 3); 0 outside."""
    coords_t = np.asarray(coords, dtype=np.float64).T
    if volume.ndim == 3:
        return ndimage.map_coordinates(volume, coords_t, order=1, cval=0.0, prefilter=False)
    return np.stack(
        [
            ndimage.map_coordinates(volume[..., c], coords_t, order=1, cval=0.0, prefilter=False)
            for c in range(volume.shape[-1])
        ],
        axis=-1,
    )


def sample_nearest(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Nearest-voxel samples of a (X, Y, Z, ...) volume at voxel coordinates (n, 3), clamped."""
    index = np.rint(coords).astype(np.intp)
    for axis in range(3):
        np.clip(index[:, axis], 0, volume.shape[axis] - 1, out=index[:, axis])
    return volume[index[:, 0], index[:, 1], index[:, 2]]
