"""Training volumes from the simulator, as a `qid2_bidsapp.model.data.VolumeSource`."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..model.data import Volume
from .brain import plan_brain, render_brain
from .protocol import uniform_shell

#: A slab is placed where every slice has at least this fraction of the fullest slice's brain.
SLAB_MIN_FRACTION = 0.5


def _pair(value, name: str, cast=float) -> tuple:
    values = np.broadcast_to(np.asarray(value, dtype=np.float64), (2,))
    low, high = (cast(v) for v in values)
    if low > high:
        raise ValueError(f"{name}: range must be (low, high), got {value!r}")
    return low, high


class SimulatedSource:
    """Slabs of random simulated brains with random protocols, noise-free signal included.

    Every volume is one brain (its own seed: tissue parameters, rotation about a random axis,
    smooth deformation, bias field) with one protocol (1-2 shells of uniform directions and
    1-3 b = 0 volumes), simulated only on a slab of ``n_slices`` slices (and at most
    ``inplane`` voxels across) at a random brain position, with Rician noise. Hiding all but
    10-45 directions is left to the example builder (`make_example` ``min_keep``/``max_keep``).

    Parameters
    ----------
    n_volumes : int
        Volumes to generate.
    seed : int
        Seed (the volumes depend on nothing else).
    voxel_size : tuple of float
        Range of the isotropic voxel size (mm).
    n_slices : int
        Slices per slab.
    inplane : int
        Largest in-plane size of a slab (a random window of the brain when the grid is larger).
    bvals : tuple of float
        Range of the b-values (s/mm^2).
    n_directions : tuple of int
        Range of the directions per shell.
    n_shells : tuple of int
        Range of the number of shells (two shells are at least 400 s/mm^2 apart).
    n_b0 : tuple of int
        Range of the number of b = 0 volumes.
    snr : tuple of float
        Range of S0 / sigma in white matter.
    rotation_deg : float
        Largest head rotation (about a random axis).
    deformation : tuple of float
        Range of the RMS displacement of the smooth warp (mm).
    bias_field : tuple of float
        Range of the RMS of the log bias field.
    supersample : int, optional
        Sub-voxel sampling (`render_brain`); default by voxel size.
    drivers_dir : str, optional
        Driver folder (default `qid2_bidsapp.sim.anatomy.default_drivers_dir`).
    priors : {"auto", "templateflow", "nilearn"}
        Tissue priors.

    """

    def __init__(
        self,
        n_volumes: int = 8,
        *,
        seed: int = 0,
        voxel_size: tuple[float, float] = (1.25, 3.0),
        n_slices: int = 4,
        inplane: int = 96,
        bvals: tuple[float, float] = (700.0, 3000.0),
        n_directions: tuple[int, int] = (60, 120),
        n_shells: tuple[int, int] = (1, 2),
        n_b0: tuple[int, int] = (1, 3),
        snr: tuple[float, float] = (10.0, 40.0),
        rotation_deg: float = 15.0,
        deformation: tuple[float, float] = (0.0, 2.0),
        bias_field: tuple[float, float] = (0.0, 0.2),
        supersample: int | None = None,
        drivers_dir: str | None = None,
        priors: str = "auto",
    ):
        self.n_volumes = int(n_volumes)
        self.seed = int(seed)
        self.voxel_size = _pair(voxel_size, "voxel_size")
        self.n_slices = int(n_slices)
        self.inplane = int(inplane)
        self.bvals = _pair(bvals, "bvals")
        self.n_directions = _pair(n_directions, "n_directions", int)
        self.n_shells = _pair(n_shells, "n_shells", int)
        self.n_b0 = _pair(n_b0, "n_b0", int)
        self.snr = _pair(snr, "snr")
        self.rotation_deg = float(rotation_deg)
        self.deformation = _pair(deformation, "deformation")
        self.bias_field = _pair(bias_field, "bias_field")
        self.supersample = supersample
        self.drivers_dir = drivers_dir
        self.priors = priors
        if self.n_slices < 1 or self.inplane < 8:
            raise ValueError(f"need n_slices >= 1 and inplane >= 8, got {n_slices}, {inplane}")
        if self.n_shells[0] < 1 or self.n_directions[0] < 1 or self.n_b0[0] < 1:
            raise ValueError("n_shells, n_directions and n_b0 must be at least 1")
        self._made: list[dict] = []

    def _protocol(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n_shells = int(rng.integers(self.n_shells[0], self.n_shells[1] + 1))
        n_b0 = int(rng.integers(self.n_b0[0], self.n_b0[1] + 1))
        shells: list[float] = []
        for _ in range(100):
            if len(shells) == n_shells:
                break
            b = round(float(rng.uniform(*self.bvals)), -1)
            if all(abs(b - other) >= 400.0 for other in shells):
                shells.append(b)
        bvals, bvecs = [np.zeros(n_b0)], [np.zeros((n_b0, 3))]
        for b in sorted(shells):
            n = int(rng.integers(self.n_directions[0], self.n_directions[1] + 1))
            bvecs.append(uniform_shell(n, seed=int(rng.integers(2**31))))
            bvals.append(np.full(n, b))
        return np.concatenate(bvals), np.vstack(bvecs)

    def _slab(self, plan, rng: np.random.Generator) -> tuple:
        counts = plan.slice_counts()
        n = min(self.n_slices, len(counts))
        windows = np.lib.stride_tricks.sliding_window_view(counts, n).min(axis=1)
        good = np.flatnonzero(windows >= SLAB_MIN_FRACTION * counts.max())
        z0 = int(rng.choice(good)) if good.size else int(np.argmax(windows))
        region = [(0, plan.shape[0]), (0, plan.shape[1]), (z0, z0 + n)]
        if max(plan.shape[:2]) > self.inplane:
            brain = np.argwhere(plan.brain_mask(slab=(z0, z0 + n)))
            centre = brain[rng.integers(len(brain))] if len(brain) else np.array(plan.shape) // 2
            for axis in (0, 1):
                size = min(self.inplane, plan.shape[axis])
                start = int(np.clip(centre[axis] - size // 2, 0, plan.shape[axis] - size))
                region[axis] = (start, start + size)
        return tuple(region)

    def volumes(self) -> Iterable[Volume]:
        """Generate the volumes.

        Yields
        ------
        Volume
            A slab with ``clean`` set to the noise-free signal; the affine is the slab's.

        """
        for k in range(self.n_volumes):
            rng = np.random.default_rng([self.seed, k])
            bvals, bvecs = self._protocol(rng)
            brain_seed = int(rng.integers(2**31))
            voxel_size = round(float(rng.uniform(*self.voxel_size)), 3)
            plan = plan_brain(
                brain_seed,
                voxel_size=voxel_size,
                rotation_deg=float(rng.uniform(0.0, self.rotation_deg)),
                deformation=float(rng.uniform(*self.deformation)),
                bias_field=float(rng.uniform(*self.bias_field)),
                drivers_dir=self.drivers_dir,
                priors=self.priors,
            )
            region = self._slab(plan, rng)
            snr = float(rng.uniform(*self.snr))
            brain = render_brain(
                plan, bvals, bvecs, snr=snr, slab=region, supersample=self.supersample
            )
            name = f"sim-{self.seed}-{k}"
            self._made.append({"name": name, **brain.describe()})
            yield Volume(
                brain.data,
                brain.bvals,
                brain.bvecs,
                brain.mask,
                brain.affine,
                name=name,
                clean=brain.clean,
            )

    def describe(self) -> dict:
        """Return the generator's settings and the brains made so far."""
        return {
            "kind": "simulated",
            "generator": "qid2_bidsapp.sim (multi-compartment, real-data fibre peaks)",
            "n_volumes": self.n_volumes,
            "seed": self.seed,
            "voxel_size": list(self.voxel_size),
            "n_slices": self.n_slices,
            "inplane": self.inplane,
            "bvals": list(self.bvals),
            "n_directions": list(self.n_directions),
            "n_shells": list(self.n_shells),
            "n_b0": list(self.n_b0),
            "snr": list(self.snr),
            "rotation_deg": self.rotation_deg,
            "deformation": list(self.deformation),
            "bias_field": list(self.bias_field),
            "priors": self.priors,
            "volumes": list(self._made),
        }
