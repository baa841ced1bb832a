"""A small synthetic BIDS dataset made on the fly: the bundled example and the test fixture.

The signal is analytic (sums of tensors: crossing white-matter bundles, grey matter, CSF),
so no file has to be shipped or downloaded. It is deliberately tiny (a few slices) so the
whole app runs on it in seconds on a laptop.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

EXAMPLE_SUBJECTS = {
    # label: (sessions, run entities, shells {b: n_dirs}, oblique)
    "01": ((None,), ("",), {1000: 15}, False),
    "02": (("1",), ("_dir-AP",), {1000: 12, 2000: 12}, True),
}


def hemisphere_directions(n: int, seed: int) -> np.ndarray:
    """Return ``n`` well-spread unit directions on a hemisphere (electrostatic repulsion).

    Parameters
    ----------
    n : int
        Number of directions.
    seed : int
        Seed of the random start.

    Returns
    -------
    ndarray, shape (n, 3)

    """
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng(seed)
    theta = np.arccos(rng.uniform(0, 1, n))
    phi = rng.uniform(0, 2 * np.pi, n)
    hemi = HemiSphere(theta=theta, phi=phi)
    hemi, _ = disperse_charges(hemi, 2000)
    return np.asarray(hemi.vertices, dtype=float)


def _tensor(direction: np.ndarray, evals: tuple[float, float, float]) -> np.ndarray:
    e1 = direction / np.linalg.norm(direction)
    helper = np.array([0.0, 0.0, 1.0]) if abs(e1[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e2 = np.cross(e1, helper)
    e2 /= np.linalg.norm(e2)
    e3 = np.cross(e1, e2)
    basis = np.stack([e1, e2, e3], axis=1)
    return basis @ np.diag(evals) @ basis.T


def phantom_signal(
    shape: tuple[int, int, int], bvals: np.ndarray, bvecs: np.ndarray, s0: float = 1000.0
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free DWI of a small crossing-fibre phantom.

    Parameters
    ----------
    shape : tuple of int
        Grid size (X, Y, Z).
    bvals : ndarray, shape (N,)
        b-values in s/mm^2.
    bvecs : ndarray, shape (N, 3)
        Unit directions in image axes (zeros at b=0).
    s0 : float
        Signal at b=0 in white matter.

    Returns
    -------
    signal : ndarray, shape (X, Y, Z, N), float32
    brain : ndarray of bool, shape (X, Y, Z)

    """
    nx, ny, nz = shape
    x, y, z = np.meshgrid(
        np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), np.linspace(-1, 1, nz), indexing="ij"
    )
    radius = np.sqrt(x**2 + y**2 + (0.5 * z) ** 2)
    brain = radius < 0.85
    wm_x = brain & (np.abs(y) < 0.25)  # bundle along x
    wm_y = brain & (np.abs(x) < 0.25)  # bundle along y
    csf = brain & (radius < 0.15) & ~(wm_x | wm_y)
    d_x = _tensor(np.array([1.0, 0.0, 0.0]), (1.7e-3, 0.3e-3, 0.3e-3))
    d_y = _tensor(np.array([0.0, 1.0, 0.2]), (1.7e-3, 0.3e-3, 0.3e-3))
    g = bvecs * np.sqrt(bvals)[:, None]
    atten_x = np.exp(-np.einsum("ni,ij,nj->n", g, d_x, g))
    atten_y = np.exp(-np.einsum("ni,ij,nj->n", g, d_y, g))
    atten_gm = np.exp(-bvals * 0.8e-3)
    atten_csf = np.exp(-bvals * 3.0e-3)
    frac_x = wm_x.astype(float) * np.where(wm_y, 0.5, 1.0)
    frac_y = wm_y.astype(float) * np.where(wm_x, 0.5, 1.0)
    frac_csf = csf.astype(float)
    frac_gm = brain * (1.0 - frac_x - frac_y - frac_csf)
    signal = (
        frac_x[..., None] * atten_x
        + frac_y[..., None] * atten_y
        + frac_gm[..., None] * atten_gm * 0.9
        + frac_csf[..., None] * atten_csf * 1.6
    )
    return (s0 * signal).astype(np.float32), brain


def _affine(voxel_mm: float, shape: tuple[int, int, int], oblique: bool) -> np.ndarray:
    affine = np.diag([-voxel_mm, voxel_mm, voxel_mm, 1.0])
    if oblique:
        angle = np.deg2rad(12.0)
        rot = np.array(
            [
                [1, 0, 0],
                [0, np.cos(angle), -np.sin(angle)],
                [0, np.sin(angle), np.cos(angle)],
            ]
        )
        affine[:3, :3] = rot @ affine[:3, :3]
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2.0)
    return affine


def make_example_run(
    dwi_path: Path,
    shells: dict[int, int],
    *,
    shape: tuple[int, int, int] = (24, 24, 4),
    voxel_mm: float = 2.5,
    n_b0: int = 2,
    snr: float = 40.0,
    oblique: bool = False,
    seed: int = 0,
) -> Path:
    """Write one synthetic DWI run (NIfTI, .bval, .bvec, .json) with Rician noise.

    Parameters
    ----------
    dwi_path : Path
        Target ``*_dwi.nii.gz`` path; sibling files share its stem.
    shells : dict
        ``{b-value: number of directions}``.
    shape : tuple of int
        Grid size.
    voxel_mm : float
        Isotropic voxel size.
    n_b0 : int
        Number of b=0 volumes (first, and in the middle of the series).
    snr : float
        S0 / noise standard deviation in white matter.
    oblique : bool
        Use an oblique affine (exercises the MRtrix .b conversion).
    seed : int
        Seed for directions and noise.

    Returns
    -------
    Path
        The NIfTI written.

    """
    rng = np.random.default_rng(seed)
    bvals = [0.0]
    bvecs = [np.zeros(3)]
    for k, (bval, n_dirs) in enumerate(sorted(shells.items())):
        dirs = hemisphere_directions(n_dirs, seed + 17 * k)
        bvals += [float(bval)] * n_dirs
        bvecs += list(dirs)
    for extra in range(1, n_b0):
        at = (len(bvals) * extra) // n_b0
        bvals.insert(at, 0.0)
        bvecs.insert(at, np.zeros(3))
    bvals = np.array(bvals)
    bvecs = np.array(bvecs)
    clean, _ = phantom_signal(shape, bvals, bvecs)
    sigma = 1000.0 / snr
    noisy = np.sqrt(
        (clean + rng.normal(0, sigma, clean.shape)) ** 2 + rng.normal(0, sigma, clean.shape) ** 2
    )
    dwi_path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(noisy.astype(np.float32), _affine(voxel_mm, shape, oblique))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, dwi_path)
    stem = str(dwi_path)[: -len(".nii.gz")]
    np.savetxt(stem + ".bval", bvals[None, :], fmt="%d")
    np.savetxt(stem + ".bvec", bvecs.T, fmt="%.6f")
    sidecar = {
        "PhaseEncodingDirection": "j-",
        "TotalReadoutTime": 0.05,
        "RepetitionTime": 8.0,
        "EchoTime": 0.08,
        "MagneticFieldStrength": 3,
        "Manufacturer": "qid2 synthetic phantom",
    }
    Path(stem + ".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return dwi_path


def example_subjects(n_subjects: int | None = None) -> dict[str, tuple]:
    """Return the example's participants: the two bundled ones, then more like ``01``.

    Parameters
    ----------
    n_subjects : int, optional
        How many (default: the two bundled ones). Beyond two, each extra participant has one
        single-shell run like ``sub-01`` (15 directions at b=1000), with its own noise.

    Returns
    -------
    dict
        ``{label: (sessions, run entities, shells, oblique)}``.

    """
    n = len(EXAMPLE_SUBJECTS) if n_subjects is None else n_subjects
    if n < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n}")
    subjects = dict(list(EXAMPLE_SUBJECTS.items())[:n])
    for index in range(len(subjects) + 1, n + 1):
        subjects[f"{index:02d}"] = EXAMPLE_SUBJECTS["01"]
    return subjects


def make_example_dataset(root: Path, *, seed: int = 0, n_subjects: int | None = None) -> Path:
    """Write the bundled example BIDS dataset (2 subjects, 2 runs, one of them multi-shell).

    Parameters
    ----------
    root : Path
        Folder to create (must not exist or be empty).
    seed : int
        Seed for directions and noise.
    n_subjects : int, optional
        Number of participants (default 2, the bundled example); see :func:`example_subjects`.

    Returns
    -------
    Path
        ``root``.

    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    description = {
        "Name": "qid2 example: synthetic crossing-fibre phantom",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["qid2 developers", "synthetic data"],
        "GeneratedBy": [{"Name": "qid2 example generator"}],
    }
    (root / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    (root / "README").write_text(
        "Synthetic diffusion MRI phantom made by qid2 (qid2_bidsapp.data.example) for the\n"
        "bundled example and the tests: crossing white-matter bundles, grey matter and CSF,\n"
        "Rician noise. Not real data.\n"
    )
    rows = ["participant_id"]
    subjects = example_subjects(n_subjects)
    for k, (label, (sessions, runs, shells, oblique)) in enumerate(subjects.items()):
        rows.append(f"sub-{label}")
        for ses in sessions:
            folder = root / f"sub-{label}" / (f"ses-{ses}" if ses else "") / "dwi"
            prefix = f"sub-{label}" + (f"_ses-{ses}" if ses else "")
            for run in runs:
                make_example_run(
                    folder / f"{prefix}{run}_dwi.nii.gz",
                    shells,
                    oblique=oblique,
                    seed=seed + 101 * k,
                )
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root
