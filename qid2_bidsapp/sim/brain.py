"""Whole-brain (or slab) DWI simulation for any gradient table.

`plan_brain` draws one brain (tissue parameters, placement in the scanner, bias and dispersion
fields) and its output grid; `render_brain` computes its signal for a protocol;
`simulate_brain` does both. The noise-free signal is kept as exact ground truth.

Frames: the output image has an axis-aligned affine with a negative determinant (LAS, like
the drivers), so its FSL b-vectors are directions in the voxel axes; ``bvecs`` given to and
returned by these functions are in that frame, and so are the returned fibre directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..qc import DTIResult, fit_dti
from .anatomy import Anatomy, load_anatomy
from .geometry import Placement, PlaneWaves, resolve_rotation
from .maps import TissueMaps, sample_linear, sample_nearest, tissue_maps
from .signal import TissueParams, tissue_signal, watson_tau

#: b=0 signal of pure white matter with no bias (the scale of the simulated images).
DEFAULT_S0 = 1000.0

#: Largest root-mean-square displacement (mm) accepted for the smooth deformation.
MAX_DEFORMATION = 5.0

_CHUNK = 8192


@dataclass
class BrainPlan:
    """One simulated brain, before any protocol: anatomy, parameters, placement and grid.

    Attributes
    ----------
    seed : int
        The seed everything was drawn from.
    anatomy : Anatomy
        Drivers (`load_anatomy`).
    params : TissueParams
        Tissue parameters.
    maps : TissueMaps
        Tissue maps on the driver grid.
    placement : Placement
        Rotation and deformation (output position -> driver position).
    bias : PlaneWaves
        Log of the multiplicative bias field (in the output frame).
    odi_field : PlaneWaves
        Log of the spatial modulation of the dispersion (in the driver frame).
    voxel_size : ndarray, shape (3,)
        Output voxel size (mm).
    origin : ndarray, shape (3,)
        Position (mm, driver voxel-axis frame) of output voxel (0, 0, 0).
    shape : tuple of int
        Output grid shape.
    affine : ndarray, shape (4, 4)
        Output voxel-to-world (MNI) affine.
    settings : dict
        The arguments of `plan_brain` (for the record).

    """

    seed: int
    anatomy: Anatomy
    params: TissueParams
    maps: TissueMaps
    placement: Placement
    bias: PlaneWaves
    odi_field: PlaneWaves
    voxel_size: np.ndarray
    origin: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    settings: dict = field(default_factory=dict)
    _reach: np.ndarray | None = field(default=None, repr=False)
    _fields: np.ndarray | None = field(default=None, repr=False)

    def region(self, slab=None) -> tuple[tuple[int, int], ...]:
        """Normalise a slab specification to three ``(start, stop)`` voxel ranges.

        Parameters
        ----------
        slab : None or (start, stop) or three (start, stop)
            None: the whole grid; one pair: slices ``start:stop`` along axis 2; three pairs:
            a box.

        Returns
        -------
        tuple of three (int, int)

        """
        if slab is None:
            return tuple((0, n) for n in self.shape)
        arr = np.asarray(slab, dtype=int)
        if arr.shape == (2,):
            arr = np.array([(0, self.shape[0]), (0, self.shape[1]), tuple(arr)])
        if arr.shape != (3, 2):
            raise ValueError(f"slab must be (start, stop) or three such pairs, got {slab!r}")
        for (start, stop), n in zip(arr, self.shape, strict=True):
            if not 0 <= start < stop <= n:
                raise ValueError(f"slab {slab!r} is outside the grid {self.shape}")
        return tuple((int(a), int(b)) for a, b in arr)

    def positions(self, region) -> np.ndarray:
        """Output voxel centres (mm) of a region, shape (n, 3), C order."""
        axes = [np.arange(a, b, dtype=np.float64) for a, b in region]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        return self.origin + grid * self.voxel_size

    def brain_mask(self, slab=None) -> np.ndarray:
        """Brain mask at the output voxel centres (driver mask > 0.5 there).

        Parameters
        ----------
        slab : None or (start, stop) or three (start, stop)
            Part of the grid (see `region`).

        Returns
        -------
        ndarray of bool, the region's shape

        """
        region = self.region(slab)
        coords = self.placement.source_points(self.positions(region)) / self.anatomy.voxel_size
        inside = sample_linear(self.anatomy.mask.astype(np.float32), coords) > 0.5
        return inside.reshape([b - a for a, b in region])

    def slice_counts(self) -> np.ndarray:
        """Approximate brain voxels in each output slice (axis 2), shape (Z,).

        Driver mask voxels are moved by the rigid placement (the smooth warp is ignored) and
        counted per output slice, scaled by the ratio of voxel volumes: cheap enough to place
        training slabs.
        """
        points = np.argwhere(self.anatomy.mask) * self.anatomy.voxel_size
        z = (self.placement.forward_points(points)[:, 2] - self.origin[2]) / self.voxel_size[2]
        counts = np.bincount(
            np.rint(z).astype(int).clip(0, self.shape[2] - 1), minlength=self.shape[2]
        )
        return counts * (self.anatomy.voxel_size**3 / np.prod(self.voxel_size))

    def reach(self) -> np.ndarray:
        """Driver-grid mask of everything that can contribute to an output voxel (dilated)."""
        if self._reach is None:
            steps = int(np.ceil(self.voxel_size.max() / self.anatomy.voxel_size)) + 1
            self._reach = ndimage.binary_dilation(self.anatomy.mask, iterations=steps)
        return self._reach

    def fields(self) -> np.ndarray:
        """Driver-grid WM, GM, CSF fractions and mask, stacked (X, Y, Z, 4) for sampling."""
        if self._fields is None:
            mask = self.anatomy.mask[..., None].astype(np.float32)
            self._fields = np.concatenate([self.maps.fractions, mask], axis=-1)
        return self._fields

    def describe(self) -> dict:
        """Return the brain's settings and drawn parameters (JSON-serialisable)."""
        return {
            "seed": self.seed,
            **self.settings,
            "shape": list(self.shape),
            "voxel_size": self.voxel_size.tolist(),
            "rotation": self.placement.rotation.round(6).tolist(),
            "params": self.params.to_dict(),
            "priors": self.anatomy.prior_source,
        }


def plan_brain(
    seed: int = 0,
    *,
    voxel_size: float | Sequence[float] = 2.5,
    rotation_deg=0.0,
    deformation: float = 0.0,
    bias_field: float = 0.0,
    params: TissueParams | None = None,
    drivers_dir=None,
    priors: str = "auto",
) -> BrainPlan:
    """Draw one simulated brain and its output grid.

    Parameters
    ----------
    seed : int
        Everything random (parameters, rotation axis, deformation, bias, dispersion field)
        is drawn from it, in a fixed order: the same seed gives the same brain.
    voxel_size : float or sequence of 3 float
        Output voxel size in mm (the drivers are 2.5 mm; 1.25-3 mm is the intended range).
    rotation_deg : float or sequence of 3 float or ndarray (3, 3)
        Head rotation: an angle about a random axis, Euler angles about x, y, z (degrees),
        or a rotation matrix (see `geometry.resolve_rotation`).
    deformation : float
        Root-mean-square displacement (mm) of a smooth random warp (wavelengths 80-160 mm);
        0 for a rigid placement.
    bias_field : float
        Root-mean-square of the log of a smooth multiplicative bias field (e.g. 0.1 for about
        +-10 %); 0 for none.
    params : TissueParams, optional
        Tissue parameters; default: drawn from the seed (`TissueParams.sample`).
    drivers_dir : str or Path, optional
        Driver folder (`anatomy.default_drivers_dir`).
    priors : {"auto", "templateflow", "nilearn"}
        Source of the tissue priors.

    Returns
    -------
    BrainPlan

    """
    vs = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,)).copy()
    if np.any(vs < 0.5) or np.any(vs > 8.0):
        raise ValueError(f"voxel_size must be within 0.5-8 mm, got {voxel_size}")
    if not 0.0 <= deformation <= MAX_DEFORMATION:
        raise ValueError(f"deformation must be within 0-{MAX_DEFORMATION} mm, got {deformation}")
    if bias_field < 0:
        raise ValueError(f"bias_field must be >= 0, got {bias_field}")
    anatomy = load_anatomy(drivers_dir, priors)
    rng = np.random.default_rng([int(seed), 0])
    drawn = TissueParams.sample(rng)
    params = drawn if params is None else params
    rotation = resolve_rotation(rotation_deg, rng)
    warp = PlaneWaves.random(rng, 4, (80.0, 160.0), deformation, channels=3)
    bias = PlaneWaves.random(rng, 4, (150.0, 400.0), bias_field)
    odi_field = PlaneWaves.random(rng, 6, (25.0, 80.0), params.odi_variation)

    points = np.argwhere(anatomy.mask) * anatomy.voxel_size
    centre = 0.5 * (points.min(axis=0) + points.max(axis=0))
    placement = Placement(rotation, centre, warp if deformation > 0 else None)
    moved = placement.forward_points(points)
    margin = vs + anatomy.voxel_size + 3.0 * deformation
    origin = moved.min(axis=0) - margin
    shape = tuple(int(n) for n in np.ceil((moved.max(axis=0) + margin - origin) / vs) + 1)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(vs / anatomy.voxel_size)
    scale[:3, 3] = origin / anatomy.voxel_size
    return BrainPlan(
        seed=int(seed),
        anatomy=anatomy,
        params=params,
        maps=tissue_maps(anatomy, params),
        placement=placement,
        bias=bias,
        odi_field=odi_field,
        voxel_size=vs,
        origin=origin,
        shape=shape,
        affine=anatomy.affine @ scale,
        settings={
            "rotation_deg": np.asarray(rotation_deg).tolist() if rotation_deg is not None else 0,
            "deformation": float(deformation),
            "bias_field": float(bias_field),
        },
    )


@dataclass
class SimulatedBrain:
    """A simulated DWI series with its ground truth.

    Attributes
    ----------
    data : ndarray, shape (X, Y, Z, N), float32
        Noisy (Rician) signal; equals `clean` when simulated without noise.
    clean : ndarray, shape (X, Y, Z, N), float32
        Noise-free signal (exact ground truth).
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine (negative determinant: FSL b-vectors = voxel axes).
    bvals : ndarray, shape (N,)
        b-values.
    bvecs : ndarray, shape (N, 3)
        Gradient directions (voxel axes; zeros at b = 0).
    sigma : float
        Noise standard deviation (0 without noise); SNR = S0 of white matter / sigma.
    fractions : ndarray, shape (X, Y, Z, 3), float32
        WM, GM, CSF volume fractions (averaged over each voxel).
    fibre_dirs : ndarray, shape (X, Y, Z, 3, 3), float32
        Fibre directions (voxel axes) at each voxel centre.
    fibre_weights : ndarray, shape (X, Y, Z, 3), float32
        Their population weights (0 outside the mask).
    f_intra : ndarray, shape (X, Y, Z), float32
        Intra-axonal fraction of white matter at each voxel centre.
    odi : ndarray, shape (X, Y, Z), float32
        Orientation dispersion index at each voxel centre (`signal.watson_tau` gives tau).
    plan : BrainPlan
        The brain (parameters, rotation, grid).
    region : tuple of (int, int)
        Where this array lies in the brain's full grid.

    """

    data: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    sigma: float
    fractions: np.ndarray
    fibre_dirs: np.ndarray
    fibre_weights: np.ndarray
    f_intra: np.ndarray
    odi: np.ndarray
    plan: BrainPlan
    region: tuple
    _dti: DTIResult | None = field(default=None, repr=False)

    def truth_dti(self) -> DTIResult:
        """DTI fit (WLS, `qid2_bidsapp.qc.fit_dti`) of the noise-free signal in the mask."""
        if self._dti is None:
            self._dti = fit_dti(self.clean, self.bvals, self.bvecs, self.mask)
        return self._dti

    @property
    def fa_truth(self) -> np.ndarray:
        """FA of the noise-free signal (`truth_dti`), 0 outside the mask."""
        return self.truth_dti().fa

    def describe(self) -> dict:
        """Return the brain's settings and the protocol (JSON-serialisable)."""
        shells = {
            str(int(b)): int(n)
            for b, n in zip(*np.unique(self.bvals, return_counts=True), strict=True)
        }
        return {
            **self.plan.describe(),
            "region": [list(r) for r in self.region],
            "sigma": float(self.sigma),
            "volumes": shells,
        }


def _offsets(voxel_size: np.ndarray, n: int) -> np.ndarray:
    steps = (np.arange(n) + 0.5) / n - 0.5
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid * voxel_size


def _odi(plan: BrainPlan, p: np.ndarray) -> np.ndarray:
    """Orientation dispersion index at driver positions p (mm)."""
    return np.clip(plan.params.odi * np.exp(plan.odi_field(p)[:, 0]), 0.005, 0.9)


def _voxel_signal(plan: BrainPlan, q0: np.ndarray, bvals, bvecs, offsets) -> tuple:
    """Mean signal, fractions and mask over the sub-voxel offsets of voxel centres q0."""
    maps, drv = plan.maps, plan.anatomy.voxel_size
    fields = plan.fields()
    signal = np.zeros((len(q0), len(bvals)), np.float32)
    sampled = np.zeros((len(q0), 4), np.float32)
    for off in offsets:
        q = q0 + off
        p = plan.placement.source_points(q)
        coords = p / drv
        values = sample_linear(fields, coords)
        dirs = plan.placement.push_directions(q, sample_nearest(maps.fibre_dirs, coords))
        tau = watson_tau(_odi(plan, p))
        signal += tissue_signal(
            bvals,
            bvecs,
            dirs,
            sample_nearest(maps.fibre_weights, coords),
            sample_nearest(maps.f_intra, coords),
            values[:, :3],
            tau,
            plan.params,
        )
        sampled += values
    return signal / len(offsets), sampled / len(offsets)


def add_rician_noise(
    signal: np.ndarray, sigma: float, rng: np.random.Generator, zero: np.ndarray | None = None
) -> np.ndarray:
    """Return ``sqrt((S + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, sigma^2)``, as float32.

    Parameters
    ----------
    signal : ndarray, shape (..., N)
        Noise-free magnitude signal.
    sigma : float
        Noise standard deviation of each channel.
    rng : numpy.random.Generator
        Random source.
    zero : ndarray of bool, shape signal.shape[:-1], optional
        Where the signal is known to be 0: there the magnitude is drawn directly from its
        Rayleigh distribution (one uniform draw instead of two normal ones).

    Returns
    -------
    ndarray, float32

    """
    signal = np.asarray(signal, dtype=np.float32)
    out = np.empty_like(signal)
    keep = np.ones(signal.shape[:-1], bool) if zero is None else ~np.asarray(zero, bool)
    live = signal[keep]
    real = rng.standard_normal(live.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += live
    imag = rng.standard_normal(live.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    out[keep] = np.sqrt(real * real + imag * imag)
    if zero is not None:
        u = rng.random((int((~keep).sum()), signal.shape[-1]), dtype=np.float32)
        out[~keep] = np.float32(sigma) * np.sqrt(-2.0 * np.log1p(-u))
    return out


def render_brain(
    plan: BrainPlan,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    snr: float | None = 20.0,
    slab=None,
    supersample: int | None = None,
    s0: float = DEFAULT_S0,
) -> SimulatedBrain:
    """Compute the DWI signal of a planned brain for a protocol.

    Parameters
    ----------
    plan : BrainPlan
        The brain (`plan_brain`).
    bvals : ndarray, shape (N,)
        b-values (s/mm^2); 0 for b = 0 volumes.
    bvecs : ndarray, shape (N, 3)
        Gradient directions in the output voxel axes (normalised here; ignored at b = 0).
    snr : float or None
        S0 of white matter / sigma of the Rician noise; None: no noise.
    slab : None or (start, stop) or three (start, stop)
        Only this part of the grid (see `BrainPlan.region`); a slab of a brain equals the same
        slab of the whole brain except for the noise draw.
    supersample : int, optional
        Sub-voxel samples per axis averaged per voxel (partial volume); default 1 for voxels up
        to the driver resolution (2.5 mm), 2 above.
    s0 : float
        b = 0 signal of white matter (the image scale).

    Returns
    -------
    SimulatedBrain

    """
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    bvecs = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3)
    if len(bvals) != len(bvecs):
        raise ValueError(f"{len(bvals)} b-values but {len(bvecs)} b-vectors")
    if np.any(bvals < 0):
        raise ValueError("b-values must be >= 0")
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    if np.any((norms[:, 0] < 1e-6) & (bvals > 0)):
        raise ValueError("a diffusion-weighted volume has a zero b-vector")
    unit = np.where(norms > 1e-6, bvecs / np.maximum(norms, 1e-12), 0.0)
    if snr is not None and not snr > 0:
        raise ValueError(f"snr must be > 0 or None, got {snr}")
    if supersample is None:
        supersample = 1 if plan.voxel_size.max() <= plan.anatomy.voxel_size else 2
    region = plan.region(slab)
    shape = tuple(b - a for a, b in region)
    q_all = plan.positions(region)
    coords = plan.placement.source_points(q_all) / plan.anatomy.voxel_size
    active = sample_nearest(plan.reach(), coords)
    active &= np.all((coords > -1) & (coords < np.array(plan.anatomy.shape)), axis=1)
    index = np.flatnonzero(active)

    n_vox = int(np.prod(shape))
    clean = np.zeros((n_vox, len(bvals)), np.float32)
    sampled = np.zeros((n_vox, 4), np.float32)
    fibre_dirs = np.zeros((n_vox, 3, 3), np.float32)
    fibre_weights = np.zeros((n_vox, 3), np.float32)
    f_intra = np.zeros(n_vox, np.float32)
    odi = np.zeros(n_vox, np.float32)
    offsets = _offsets(plan.voxel_size, int(supersample))
    for start in range(0, len(index), _CHUNK):
        rows = index[start : start + _CHUNK]
        q0 = q_all[rows]
        clean[rows], sampled[rows] = _voxel_signal(plan, q0, bvals, unit, offsets)
        c0 = coords[rows]
        fibre_dirs[rows] = plan.placement.push_directions(
            q0, sample_nearest(plan.maps.fibre_dirs, c0)
        )
        fibre_weights[rows] = sample_nearest(plan.maps.fibre_weights, c0)
        f_intra[rows] = sample_nearest(plan.maps.f_intra, c0)
        odi[rows] = _odi(plan, c0 * plan.anatomy.voxel_size)
    clean *= s0 * np.exp(plan.bias(q_all)).astype(np.float32)
    clean = clean.reshape(*shape, len(bvals))
    if snr is None:
        sigma, data = 0.0, clean.copy()
    else:
        sigma = float(s0 / snr)
        rng = np.random.default_rng([plan.seed, 1, *[a for a, _ in region], len(bvals)])
        data = add_rician_noise(clean, sigma, rng, zero=~active.reshape(shape))
    affine = plan.affine.copy()
    affine[:3, 3] = plan.affine[:3, :3] @ [a for a, _ in region] + plan.affine[:3, 3]
    inside = sampled[:, 3] >= 0.5
    fibre_weights *= inside[:, None]
    return SimulatedBrain(
        data=data,
        clean=clean,
        mask=inside.reshape(shape),
        affine=affine,
        bvals=bvals,
        bvecs=unit,
        sigma=sigma,
        fractions=sampled[:, :3].reshape(*shape, 3),
        fibre_dirs=fibre_dirs.reshape(*shape, 3, 3),
        fibre_weights=fibre_weights.reshape(*shape, 3),
        f_intra=f_intra.reshape(shape),
        odi=odi.reshape(shape),
        plan=plan,
        region=region,
    )


def simulate_brain(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    seed: int = 0,
    voxel_size: float | Sequence[float] = 2.5,
    rotation_deg=0.0,
    deformation: float = 0.0,
    snr: float | None = 20.0,
    bias_field: float = 0.0,
    slab=None,
    params: TissueParams | None = None,
    supersample: int | None = None,
    s0: float = DEFAULT_S0,
    drivers_dir=None,
    priors: str = "auto",
) -> SimulatedBrain:
    """Simulate a realistic whole-brain (or slab) DWI series for any gradient table.

    ``render_brain(plan_brain(seed, ...), bvals, bvecs, ...)``; see those two functions for
    the parameters. Deterministic for a seed.

    Parameters
    ----------
    bvals, bvecs : ndarray
        The protocol ((N,), (N, 3), directions in the output voxel axes).
    seed : int
        Seed of the brain and of the noise.
    voxel_size, rotation_deg, deformation, bias_field, params, drivers_dir, priors
        See `plan_brain`.
    snr, slab, supersample, s0
        See `render_brain`.

    Returns
    -------
    SimulatedBrain

    """
    plan = plan_brain(
        seed,
        voxel_size=voxel_size,
        rotation_deg=rotation_deg,
        deformation=deformation,
        bias_field=bias_field,
        params=params,
        drivers_dir=drivers_dir,
        priors=priors,
    )
    return render_brain(plan, bvals, bvecs, snr=snr, slab=slab, supersample=supersample, s0=s0)
