"""One DWI run, on arrays: read and check it, plan target directions, up-sample, merge."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError
from .gradients import (
    GradientTable,
    check_gradient_agreement,
    largest_angular_gap_deg,
    load_target_bvecs,
    read_fsl_gradients,
    read_mrtrix_gradients,
    select_target_directions,
)


def load_dwi_header(path: Path) -> nib.Nifti1Image:
    """Open a DWI NIfTI (header only) and check it is 4D.

    Parameters
    ----------
    path : Path
        The NIfTI.

    Returns
    -------
    nibabel.Nifti1Image

    """
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise InputError(path, f"cannot be read as NIfTI ({exc})") from None
    if img.ndim != 4:
        raise InputError(path, f"is not a 4D image (shape {img.shape})")
    return img


def read_gradients(
    dwi: Path,
    bval: Path | None,
    bvec: Path | None,
    bmatrix: Path | None,
    img: nib.Nifti1Image,
    **kwargs,
) -> GradientTable:
    """Read the gradient table of a run from FSL files and/or an MRtrix3 ``.b`` file.

    When both are present they must agree (FSL files are used).

    Parameters
    ----------
    dwi : Path
        The DWI (named in errors).
    bval, bvec, bmatrix : Path or None
        Gradient files.
    img : nibabel image
        The DWI header (volume count, affine).
    **kwargs
        Passed to the readers (``b0_threshold``, ``shell_tolerance``).

    Returns
    -------
    GradientTable

    """
    n_volumes = img.shape[3]
    if bval is not None and bvec is not None:
        table = read_fsl_gradients(bval, bvec, n_volumes, **kwargs)
        if bmatrix is not None:
            other = read_mrtrix_gradients(bmatrix, img.affine, n_volumes, **kwargs)
            check_gradient_agreement(table, other, bmatrix)
        return table
    if bmatrix is not None:
        return read_mrtrix_gradients(bmatrix, img.affine, n_volumes, **kwargs)
    missing = "bval" if bval is None else "bvec"
    raise InputError(dwi, f"no .{missing} file (and no MRtrix .b file) found for this DWI")


def match_shells(
    table: GradientTable, requested: list[float] | None, tolerance: float
) -> list[int]:
    """Return the shells of a run to up-sample.

    Parameters
    ----------
    table : GradientTable
        The run's gradients.
    requested : list of float or None
        ``--shells`` values; None means every diffusion-weighted shell.
    tolerance : float
        Largest b-value difference (s/mm^2) accepted as the same shell.

    Returns
    -------
    list of int
        Shell labels (keys of ``table.shells``); may be empty.

    """
    shells = sorted(table.shells)
    if not requested:
        return shells
    return [s for s in shells if any(abs(s - b) <= tolerance for b in requested)]


@dataclass
class ShellPlan:
    """Directions of one shell before and after up-sampling."""

    bval: int
    acquired_indices: np.ndarray
    targets: np.ndarray
    gap_acquired_deg: float
    gap_merged_deg: float

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "bval": self.bval,
            "acquired_indices": self.acquired_indices.tolist(),
            "targets": self.targets.tolist(),
            "gap_acquired_deg": self.gap_acquired_deg,
            "gap_merged_deg": self.gap_merged_deg,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ShellPlan:
        """Inverse of :meth:`to_dict`."""
        return cls(
            bval=int(data["bval"]),
            acquired_indices=np.asarray(data["acquired_indices"], dtype=int),
            targets=np.asarray(data["targets"], dtype=float).reshape(-1, 3),
            gap_acquired_deg=float(data["gap_acquired_deg"]),
            gap_merged_deg=float(data["gap_merged_deg"]),
        )


def plan_targets(
    table: GradientTable,
    shells: list[int],
    *,
    n_targets: int | None = None,
    target_bvecs: Path | None = None,
    seed: int = 0,
) -> list[ShellPlan]:
    """Choose the new directions of each shell.

    Parameters
    ----------
    table : GradientTable
        The run's gradients.
    shells : list of int
        Shells to up-sample.
    n_targets : int, optional
        New directions per shell (default: twice the acquired count).
    target_bvecs : Path, optional
        File of directions to use instead (same for every shell).
    seed : int
        Seed of the electrostatic-repulsion start.

    Returns
    -------
    list of ShellPlan

    """
    plans = []
    user_targets = load_target_bvecs(target_bvecs) if target_bvecs is not None else None
    for k, shell in enumerate(shells):
        indices = np.asarray(table.shells[shell], dtype=int)
        acquired = table.bvecs[indices]
        if user_targets is not None:
            targets = user_targets
        else:
            count = n_targets if n_targets is not None else 2 * len(indices)
            targets = select_target_directions(acquired, count, seed=seed + k)
        plans.append(
            ShellPlan(
                bval=int(shell),
                acquired_indices=indices,
                targets=targets,
                gap_acquired_deg=largest_angular_gap_deg(acquired),
                gap_merged_deg=largest_angular_gap_deg(np.vstack([acquired, targets])),
            )
        )
    return plans


def mean_b0(data: np.ndarray, table: GradientTable) -> np.ndarray:
    """Mean of the b=0 volumes.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
        DWI volumes.
    table : GradientTable
        Their gradients.

    Returns
    -------
    ndarray, shape (X, Y, Z), float32

    """
    return data[..., table.b0_mask].mean(axis=-1).astype(np.float32)


def brain_mask(b0: np.ndarray) -> np.ndarray:
    """Brain mask of a mean b=0 image with DIPY's ``median_otsu``.

    Parameters
    ----------
    b0 : ndarray, shape (X, Y, Z)
        Mean b=0 image.

    Returns
    -------
    ndarray of bool

    """
    from dipy.segment.mask import median_otsu

    with warnings.catch_warnings():  # skimage's "looks like an RGB image" on 3-4 slice volumes
        warnings.filterwarnings("ignore", "threshold_otsu is expected", UserWarning)
        _, mask = median_otsu(b0, median_radius=2, numpass=1)
    if not mask.any():  # tiny or unusual images: fall back to a threshold
        mask = b0 > 0.1 * np.percentile(b0[b0 > 0], 98) if (b0 > 0).any() else b0 >= 0
    return mask


def upsample_shells(
    data: np.ndarray,
    table: GradientTable,
    plans: list[ShellPlan],
    engine,
    mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, float]]:
    """Synthesise every planned direction with an engine.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
        Acquired DWI.
    table : GradientTable
        Its gradients.
    plans : list of ShellPlan
        Shells and targets.
    engine : Upsampler
        The up-sampling engine.
    mask : ndarray of bool or None
        Passed to the engine.

    Returns
    -------
    synth : ndarray, shape (X, Y, Z, M), float32
    bvals : ndarray, shape (M,)
    bvecs : ndarray, shape (M, 3)
    runtimes : dict
        Seconds per shell.

    """
    b0 = mean_b0(data, table)
    configure = getattr(engine, "set_acquisition", None)
    if callable(configure):  # engines conditioned on the S0 noise (qid2 SH-field models)
        sigma = None
        if getattr(engine, "needs_noise", False):
            from .trust import estimate_noise

            noise_mask = mask if mask is not None else brain_mask(b0)
            sigma, _ = estimate_noise(data, table.bvals, table.bvecs, noise_mask)
        configure(n_b0=int(np.count_nonzero(table.b0_mask)), noise_sigma=sigma)
    volumes, bvals, bvecs, runtimes = [], [], [], {}
    for plan in plans:
        start = time.perf_counter()
        shell_data = data[..., plan.acquired_indices].astype(np.float32)
        predicted = engine.predict(
            shell_data, b0, table.bvecs[plan.acquired_indices], plan.targets, plan.bval, mask
        )
        runtimes[plan.bval] = time.perf_counter() - start
        volumes.append(np.asarray(predicted, dtype=np.float32))
        bvals.append(
            np.full(len(plan.targets), float(np.median(table.bvals[plan.acquired_indices])))
        )
        bvecs.append(plan.targets)
    if not volumes:
        return (
            np.zeros(data.shape[:3] + (0,), np.float32),
            np.zeros(0),
            np.zeros((0, 3)),
            runtimes,
        )
    return np.concatenate(volumes, axis=-1), np.concatenate(bvals), np.vstack(bvecs), runtimes


def merge_volumes(
    data: np.ndarray,
    table: GradientTable,
    synth: np.ndarray,
    synth_bvals: np.ndarray,
    synth_bvecs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Acquired volumes in their order, then the synthesised ones.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
        Acquired volumes.
    table : GradientTable
        Their gradients.
    synth : ndarray, shape (X, Y, Z, M)
        Synthesised volumes.
    synth_bvals : ndarray, shape (M,)
        Their b-values.
    synth_bvecs : ndarray, shape (M, 3)
        Their directions.

    Returns
    -------
    merged : ndarray, shape (X, Y, Z, N + M), float32
    bvals : ndarray, shape (N + M,)
    bvecs : ndarray, shape (N + M, 3)

    """
    merged = np.concatenate([data.astype(np.float32), synth.astype(np.float32)], axis=-1)
    return merged, np.concatenate([table.bvals, synth_bvals]), np.vstack([table.bvecs, synth_bvecs])
