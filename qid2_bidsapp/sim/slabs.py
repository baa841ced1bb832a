"""Noise-free training slabs for the SH-field model: the whole angular signal as SH coefficients.

A *coefficient slab* is a few consecutive slices of a random simulated brain, stored not as
images per direction but as the spherical-harmonic coefficients (order 8, ``descoteaux07``) of
its noise-free ``S/S0`` on one shell, fitted to a dense uniform set of directions, plus the
noise-free b = 0 image and the brain mask. Any acquisition of that shell (any number and set
of directions) can then be drawn from it in microseconds: ``S0 * (B(g) @ c)`` plus Rician
noise (`qid2_bidsapp.model.field_data`), so one slab serves thousands of training protocols.

Brains vary in voxel size (1.25-3 mm in plane, slices up to 1.5x thicker), head rotation,
smooth deformation, bias field, tissue parameters and b-value (700-3000 s/mm^2); slabs sit
anywhere the brain covers at least `MIN_COVERAGE` of its fullest slice (so partial coverage and
the top and bottom of the brain occur). Training brain seeds are drawn at or above
`TRAIN_SEED_FLOOR`, far from the held-out evaluation brains (seeds 10000 + k).

Plain numpy; `write_slab` / `read_slab` store one slab as an ``.npz`` file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..shm import n_sh_coefficients, sh_fit_matrix
from .brain import DEFAULT_S0, plan_brain, render_brain
from .protocol import uniform_shell

#: SH order the noise-free signal is fitted with (so that orders <= 6 are not aliased) ...
FIT_SH_ORDER = 8
#: ... and the order stored (order-8 terms of the simulated signal are below 1e-4 of S0).
SLAB_SH_ORDER = 6
#: Dense directions the noise-free signal is fitted on.
DENSE_DIRECTIONS = 150
#: Training brains use seeds at or above this (held-out brains use 10000 + k).
TRAIN_SEED_FLOOR = 1_000_000
#: A slab may sit where the brain covers at least this fraction of its fullest slice.
MIN_COVERAGE = 0.15


@dataclass
class CoefficientSlab:
    """Noise-free SH coefficients of one shell on a few slices of a simulated brain.

    Attributes
    ----------
    coefs : ndarray, shape (X, Y, S, C), float16
        SH coefficients (order `SLAB_SH_ORDER`, C = 28) of the noise-free ``S/S0`` (voxel-axis
        frame, slice axis last).
    s0 : ndarray, shape (X, Y, S), float32
        Noise-free b = 0 signal (tissue contrast and bias field included).
    mask : ndarray of bool, shape (X, Y, S)
        Brain mask.
    bval : float
        b-value of the shell (s/mm^2).
    s0_reference : float
        b = 0 signal of white matter before the bias field: SNR is defined against it.
    voxel_size : ndarray, shape (3,)
        Voxel size (mm).
    name : str
        Where it came from (seed and index).

    """

    coefs: np.ndarray
    s0: np.ndarray
    mask: np.ndarray
    bval: float
    s0_reference: float
    voxel_size: np.ndarray
    name: str


def make_slab(
    index: int,
    *,
    seed: int = 0,
    n_slices: int = 6,
    inplane: int = 80,
    bvals: tuple[float, float] = (700.0, 3000.0),
    inplane_voxel: tuple[float, float] = (1.25, 3.0),
    thickness_ratio: tuple[float, float] = (1.0, 1.5),
    rotation_deg: float = 20.0,
    deformation: tuple[float, float] = (0.0, 2.0),
    bias_field: tuple[float, float] = (0.0, 0.25),
) -> CoefficientSlab:
    """Simulate coefficient slab number `index` of a seeded series.

    Parameters
    ----------
    index : int
        Slab number; with `seed` it fixes everything (``default_rng([seed, index])``).
    seed : int
        Series seed.
    n_slices : int
        Slices of the slab (fewer when the brain is thinner).
    inplane : int
        Largest in-plane size (a window around a random brain voxel when the grid is larger).
    bvals : tuple of float
        Range of the b-value.
    inplane_voxel : tuple of float
        Range of the in-plane voxel size (mm).
    thickness_ratio : tuple of float
        Range of slice thickness / in-plane voxel size (thickness capped at 4.5 mm).
    rotation_deg : float
        Largest head rotation about a random axis.
    deformation : tuple of float
        Range of the RMS smooth-warp displacement (mm).
    bias_field : tuple of float
        Range of the RMS of the log bias field.

    Returns
    -------
    CoefficientSlab

    """
    rng = np.random.default_rng([int(seed), int(index)])
    brain_seed = int(rng.integers(TRAIN_SEED_FLOOR, 2**31))
    size = float(rng.uniform(*inplane_voxel))
    thickness = min(4.5, size * float(rng.uniform(*thickness_ratio)))
    voxel = np.round([size, size, thickness], 3)
    plan = plan_brain(
        brain_seed,
        voxel_size=voxel,
        rotation_deg=float(rng.uniform(0.0, rotation_deg)),
        deformation=float(rng.uniform(*deformation)),
        bias_field=float(rng.uniform(*bias_field)),
    )
    bval = round(float(rng.uniform(*bvals)), -1)
    dense = uniform_shell(DENSE_DIRECTIONS, seed=int(rng.integers(2**31)))
    table_b = np.concatenate([[0.0], np.full(len(dense), bval)])
    table_g = np.vstack([np.zeros((1, 3)), dense])
    region = _region(plan, n_slices, inplane, rng)
    brain = render_brain(plan, table_b, table_g, snr=None, slab=region)
    s0 = brain.clean[..., 0].astype(np.float32)
    ratio = np.where(s0[..., None] > 0, brain.clean[..., 1:] / np.maximum(s0[..., None], 1e-6), 0)
    fit = sh_fit_matrix(dense, FIT_SH_ORDER, 0.0)[: n_sh_coefficients(SLAB_SH_ORDER)]
    coefs = (ratio.astype(np.float64) @ fit.T).astype(np.float16)
    return CoefficientSlab(
        coefs=coefs,
        s0=s0,
        mask=brain.mask.copy(),
        bval=bval,
        s0_reference=float(DEFAULT_S0),
        voxel_size=voxel.astype(np.float64),
        name=f"slab-{seed}-{index} (brain seed {brain_seed})",
    )


def _region(plan, n_slices: int, inplane: int, rng: np.random.Generator) -> tuple:
    counts = plan.slice_counts()
    n = min(int(n_slices), len(counts))
    windows = np.lib.stride_tricks.sliding_window_view(counts, n).max(axis=1)
    good = np.flatnonzero(windows >= MIN_COVERAGE * counts.max())
    z0 = int(rng.choice(good)) if good.size else int(np.argmax(windows))
    region = [(0, plan.shape[0]), (0, plan.shape[1]), (z0, z0 + n)]
    if max(plan.shape[:2]) > inplane:
        brain = np.argwhere(plan.brain_mask(slab=(z0, z0 + n)))
        centre = brain[rng.integers(len(brain))] if len(brain) else np.array(plan.shape) // 2
        for axis in (0, 1):
            size = min(inplane, plan.shape[axis])
            start = int(np.clip(centre[axis] - size // 2, 0, plan.shape[axis] - size))
            region[axis] = (start, start + size)
    return tuple(region)


def write_slab(slab: CoefficientSlab, path: str | os.PathLike) -> Path:
    """Write a slab as ``.npz`` (atomically: a temporary name, then a rename).

    Parameters
    ----------
    slab : CoefficientSlab
        The slab.
    path : str or PathLike
        Destination (``.npz``).

    Returns
    -------
    Path

    """
    path = Path(path)
    tmp = path.with_name(path.stem + ".part.npz")
    np.savez(
        tmp,
        coefs=slab.coefs,
        s0=slab.s0,
        mask=slab.mask,
        bval=slab.bval,
        s0_reference=slab.s0_reference,
        voxel_size=slab.voxel_size,
        name=slab.name,
    )
    os.replace(tmp, path)
    return path


def read_slab(path: str | os.PathLike) -> CoefficientSlab:
    """Read a slab written by `write_slab`.

    Parameters
    ----------
    path : str or PathLike
        The ``.npz`` file.

    Returns
    -------
    CoefficientSlab

    """
    with np.load(path) as data:
        return CoefficientSlab(
            coefs=data["coefs"],
            s0=data["s0"],
            mask=data["mask"].astype(bool),
            bval=float(data["bval"]),
            s0_reference=float(data["s0_reference"]),
            voxel_size=data["voxel_size"],
            name=str(data["name"]),
        )


def generate_slabs(
    folder: str | os.PathLike, start: int, stop: int, *, seed: int = 0, **options
) -> int:
    """Write slabs ``start .. stop - 1`` of a series into a folder, skipping existing ones.

    Resumable: a slab is written atomically (`write_slab`), so an interrupted run leaves
    only whole files and the next run continues where it stopped.

    Parameters
    ----------
    folder : str or PathLike
        Destination (created); files are named ``slab-<seed>-<index>.npz``.
    start, stop : int
        Slab numbers.
    seed : int
        Series seed.
    **options
        Passed to `make_slab`.

    Returns
    -------
    int
        Slabs written by this call.

    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(int(start), int(stop)):
        path = folder / f"slab-{seed}-{index:06d}.npz"
        if path.exists():
            continue
        write_slab(make_slab(index, seed=seed, **options), path)
        written += 1
    return written


if __name__ == "__main__":  # python -m qid2_bidsapp.sim.slabs FOLDER START STOP [SEED]
    import sys

    args = sys.argv[1:]
    generate_slabs(args[0], int(args[1]), int(args[2]), seed=int(args[3]) if len(args) > 3 else 0)
