"""The evaluation case (a full acquisition and its input subset) and where cases come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..gradients import B0_THRESHOLD, group_shells
from .split import best_spread_subset, uniform_split

#: Directions a DTI fit needs at least (6 tensor elements).
MIN_INPUT_DIRECTIONS = 6


@dataclass
class EvalCase:
    """A full acquisition, the volumes a method is given, and (for simulations) the truth.

    Attributes
    ----------
    name : str
        Case label in tables (a BIDS run stem, or a simulation id).
    group : str
        Cases summarised together (e.g. ``bids-real``, ``sim-30to90``).
    data : ndarray, shape (X, Y, Z, V), float32
        The full acquisition (noisy for simulations).
    bvals : ndarray, shape (V,)
        Its b-values.
    bvecs : ndarray, shape (V, 3)
        Its directions, FSL image-axis convention (zeros at b=0).
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask: every metric is computed in it.
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine (MRtrix3 and qid2 need it for the direction frame).
    input_indices : ndarray of int
        Volumes given to the methods (all b=0 and a uniform subset of each shell).
    truth : ndarray, shape (X, Y, Z, V), optional
        Noise-free signal of the full acquisition (simulations only).
    slice_axis : int
        Voxel axis of the acquired slices (for qid2).
    source : str
        Where the case came from (file or generator), for the report.

    """

    name: str
    group: str
    data: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    input_indices: np.ndarray
    truth: np.ndarray | None = None
    slice_axis: int = 2
    source: str = ""
    b0_threshold: float = B0_THRESHOLD
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=np.float32)
        self.bvals = np.asarray(self.bvals, dtype=np.float64).reshape(-1)
        self.bvecs = np.asarray(self.bvecs, dtype=np.float64).reshape(-1, 3)
        self.mask = np.asarray(self.mask, dtype=bool)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.input_indices = np.sort(np.asarray(self.input_indices, dtype=np.intp))
        where = self.source or self.name
        n_vol = self.data.shape[3] if self.data.ndim == 4 else -1
        if self.data.ndim != 4 or self.bvals.size != n_vol or self.bvecs.shape[0] != n_vol:
            raise InputError(
                where,
                f"data {self.data.shape}, {self.bvals.size} b-values and {self.bvecs.shape[0]} "
                "directions do not describe one 4D acquisition",
            )
        if self.mask.shape != self.data.shape[:3] or not self.mask.any():
            raise InputError(where, f"the brain mask {self.mask.shape} is empty or misfit")
        if self.truth is not None:
            self.truth = np.asarray(self.truth, dtype=np.float32)
            if self.truth.shape != self.data.shape:
                raise InputError(where, f"truth {self.truth.shape} != data {self.data.shape}")
        if not np.any(self.bvals[self.input_indices] <= self.b0_threshold):
            raise InputError(where, "the input subset has no b=0 volume")
        n_dw = int(np.sum(self.bvals[self.input_indices] > self.b0_threshold))
        if n_dw < MIN_INPUT_DIRECTIONS:
            raise InputError(
                where,
                f"only {n_dw} diffusion-weighted input volumes; DTI needs at least "
                f"{MIN_INPUT_DIRECTIONS}",
            )
        if self.heldout_indices.size == 0:
            raise InputError(where, "no held-out volume to predict")

    @property
    def shell_labels(self) -> np.ndarray:
        """Per-volume shell label of the full acquisition (0 for b=0)."""
        return group_shells(self.bvals, b0_threshold=self.b0_threshold)

    @property
    def heldout_indices(self) -> np.ndarray:
        """Diffusion-weighted volumes not given as input: what the methods predict."""
        is_input = np.zeros(self.bvals.size, dtype=bool)
        is_input[self.input_indices] = True
        return np.flatnonzero(~is_input & (self.bvals > self.b0_threshold)).astype(np.intp)

    def protocol(self) -> str:
        """Describe the split, e.g. ``"b1000: 30->90"``."""
        labels = self.shell_labels
        parts = []
        for shell in np.unique(labels[labels > 0]):
            n_all = int(np.sum(labels == shell))
            n_in = int(np.sum(labels[self.input_indices] == shell))
            parts.append(f"b{shell}: {n_in}->{n_all}")
        return ", ".join(parts)


def restrict_directions(case: EvalCase, n_full: int, n_input: int, *, group: str) -> EvalCase:
    """Make a smaller protocol from a case: a uniform ``n_full`` subset, ``n_input`` of it given.

    Single-shell cases only. The full acquisition becomes the b=0 volumes plus the
    `best_spread_subset` of ``n_full`` directions; the input is the best-spread ``n_input`` of
    those.

    Parameters
    ----------
    case : EvalCase
        A single-shell case with at least ``n_full`` directions.
    n_full, n_input : int
        Directions of the new full acquisition and of its input subset.
    group : str
        Group of the new case.

    Returns
    -------
    EvalCase

    """
    labels = case.shell_labels
    shells = np.unique(labels[labels > 0])
    if shells.size != 1:
        raise ValueError(f"restrict_directions needs a single-shell case, got shells {shells}")
    dw = np.flatnonzero(labels > 0)
    keep_dw = dw[best_spread_subset(case.bvecs[dw], n_full)]
    keep = np.sort(np.concatenate([np.flatnonzero(labels == 0), keep_dw]))
    bvals, bvecs = case.bvals[keep], case.bvecs[keep]
    return EvalCase(
        name=case.name,
        group=group,
        data=case.data[..., keep],
        bvals=bvals,
        bvecs=bvecs,
        mask=case.mask,
        affine=case.affine,
        input_indices=uniform_split(bvals, bvecs, n_input=n_input),
        truth=None if case.truth is None else case.truth[..., keep],
        slice_axis=case.slice_axis,
        source=case.source,
        info=dict(case.info),
    )


# --------------------------------------------------------------------------- BIDS runs


def load_bids_cases(
    bids_dir: Path,
    *,
    fraction: float = 0.5,
    participant_labels: list[str] | None = None,
    group: str | None = None,
) -> list[EvalCase]:
    """One case per DWI run of a BIDS dataset: ``fraction`` of each shell given, the rest held out.

    Runs are found with pybids (`~qid2_bidsapp.bids.collect_dwi_runs`); gradients are read and
    checked as by the app; the mask is the dataset's own (QSIPrep-style derivatives) or
    ``median_otsu`` of the mean b=0 (`~qid2_bidsapp.upsampling.brain_mask`).

    Parameters
    ----------
    bids_dir : Path
        Dataset root (raw BIDS or QSIPrep-style derivatives).
    fraction : float, optional
        Fraction of each shell's directions given as input (`uniform_split`).
    participant_labels : list of str, optional
        Restrict to these subjects.
    group : str, optional
        Group name; default the dataset folder's name.

    Returns
    -------
    list of EvalCase
        In the order of the runs' paths.

    """
    import nibabel as nib

    from ..bids import collect_dwi_runs
    from ..upsampling import brain_mask, load_dwi_header, mean_b0, read_gradients
    from ..workflows.dwi import slice_axis_of

    bids_dir = Path(bids_dir)
    runs = collect_dwi_runs(bids_dir, participant_labels=participant_labels)
    cases = []
    for run in runs:
        img = load_dwi_header(run.dwi)
        table = read_gradients(run.dwi, run.bval, run.bvec, run.bmatrix, img)
        if not table.b0_mask.any():
            raise InputError(run.dwi, "has no b=0 volume; the evaluation needs one")
        data = np.asarray(img.dataobj, dtype=np.float32)
        if run.mask is not None:
            mask = np.asarray(nib.load(str(run.mask)).dataobj) > 0
        else:
            mask = brain_mask(mean_b0(data, table))
        try:
            input_indices = uniform_split(table.bvals, table.bvecs, fraction=fraction)
        except ValueError as err:
            raise InputError(run.dwi, f"cannot be split for evaluation ({err})") from None
        cases.append(
            EvalCase(
                name=run.stem,
                group=group or bids_dir.resolve().name,
                data=data,
                bvals=table.bvals,
                bvecs=table.bvecs,
                mask=mask,
                affine=img.affine,
                input_indices=input_indices,
                slice_axis=slice_axis_of(run.dwi),
                source=str(run.dwi),
            )
        )
    return cases


#: Real single-shell scans that DIPY ships (offline): name -> description.
DIPY_CASES = {
    "small_64D": "DIPY's small_64D: a real 10x10x10 crop, 2 mm, b=1000, 64 directions",
    "small_25": "DIPY's small_25: a real 10x8x2 crop, 2 mm, b=2000, 25 directions",
}


def load_dipy_case(name: str = "small_64D", *, fraction: float = 0.5) -> EvalCase:
    """Load a real scan bundled with DIPY (`DIPY_CASES`), split like a BIDS run.

    Parameters
    ----------
    name : str
        Key of `DIPY_CASES` (``dipy.data.get_fnames`` name; read offline).
    fraction : float, optional
        Fraction of the shell given as input.

    Returns
    -------
    EvalCase
        Group ``dipy``; the mask is every voxel whose mean b=0 exceeds 20 % of its 95th
        percentile (the crop lies inside the brain).

    """
    import nibabel as nib
    from dipy.data import get_fnames

    from ..gradients import GradientTable

    if name not in DIPY_CASES:
        raise InputError(name, f"is not a known DIPY scan; choose from {', '.join(DIPY_CASES)}")
    fimg, fbval, fbvec = get_fnames(name=name)
    img = nib.load(str(fimg))
    data = np.asarray(img.dataobj, dtype=np.float32)
    bvals, bvecs = np.loadtxt(fbval), np.loadtxt(fbvec)
    if bvecs.shape == (3, bvals.size):  # FSL layout (small_64D's file is N x 3)
        bvecs = bvecs.T
    table = GradientTable(bvals, bvecs)
    b0 = data[..., table.b0_mask].mean(axis=-1)
    mask = b0 > 0.2 * np.percentile(b0, 95)
    return EvalCase(
        name=name,
        group="dipy",
        data=data,
        bvals=table.bvals,
        bvecs=table.bvecs,
        mask=mask,
        affine=img.affine,
        input_indices=uniform_split(table.bvals, table.bvecs, fraction=fraction),
        source=DIPY_CASES[name],
    )


# --------------------------------------------------------------------------- synthetic cases


def phantom_case(
    *,
    shape: tuple[int, int, int] = (16, 16, 4),
    n_full: int = 30,
    n_input: int = 15,
    bval: float = 1000.0,
    n_b0: int = 2,
    snr: float = 20.0,
    oblique: bool = False,
    seed: int = 0,
    name: str | None = None,
    group: str = "phantom",
) -> EvalCase:
    """Build a small analytic case: the example's crossing-fibre phantom with Rician noise.

    Directions of the full acquisition are ``n_full`` electrostatically spread ones
    (`~qid2_bidsapp.gradients.select_target_directions`, pure numpy, deterministic for a seed);
    the input is their best-spread ``n_input`` subset; the truth is the noise-free phantom
    (`~qid2_bidsapp.data.example.phantom_signal`).

    Parameters
    ----------
    shape : tuple of int, optional
        Grid size.
    n_full, n_input : int, optional
        Directions of the full acquisition and of the input.
    bval : float, optional
        b-value of the single shell.
    n_b0 : int, optional
        b=0 volumes (first).
    snr : float, optional
        S0 / noise standard deviation in white matter.
    oblique : bool, optional
        Oblique affine (as the example's second subject).
    seed : int, optional
        Seed of directions and noise.
    name, group : str, optional
        Labels.

    Returns
    -------
    EvalCase

    """
    from ..data.example import _affine, phantom_signal
    from ..gradients import select_target_directions

    directions = select_target_directions(np.empty((0, 3)), n_full, seed=seed)
    bvals = np.concatenate([np.zeros(n_b0), np.full(n_full, float(bval))])
    bvecs = np.vstack([np.zeros((n_b0, 3)), directions])
    clean, brain = phantom_signal(shape, bvals, bvecs)
    rng = np.random.default_rng(seed)
    sigma = 1000.0 / snr
    noisy = np.sqrt(
        (clean + rng.normal(0, sigma, clean.shape)) ** 2 + rng.normal(0, sigma, clean.shape) ** 2
    )
    return EvalCase(
        name=name or f"phantom-{seed}",
        group=group,
        data=noisy.astype(np.float32),
        bvals=bvals,
        bvecs=bvecs,
        mask=brain,
        affine=_affine(2.5, shape, oblique),
        input_indices=uniform_split(bvals, bvecs, n_input=n_input),
        truth=clean,
        source=f"qid2_bidsapp.data.example.phantom_signal (seed {seed}, SNR {snr:g})",
    )


#: Simulated protocols: (group, directions given, directions of the full acquisition).
SIM_PROTOCOLS = (("sim-30to90", 30, 90), ("sim-15to45", 15, 45))

#: Seed offset of the evaluation brains (brain k uses seed + SIM_SEED_OFFSET + k), far from the
#: small seeds used to simulate training brains.
SIM_SEED_OFFSET = 10_000
#: b=0 volumes of a simulated acquisition (as one HCP run).
SIM_N_B0 = 6


def simulated_cases(
    n_brains: int,
    *,
    snr: float = 20.0,
    seed: int = 0,
    protocols: tuple = SIM_PROTOCOLS,
    slab=None,
):
    """Yield simulated held-out brains, each in every protocol (30 -> 90 and 15 -> 45).

    Brain ``k`` is ``qid2_bidsapp.sim.simulate_brain`` (whole brain, 2.5 mm, Rician noise at
    ``snr``) with seed ``seed + SIM_SEED_OFFSET + k`` on the protocol
    ``qid2_bidsapp.sim.acquisition({1000: 90}, n_b0=6)``; its noise-free signal is the truth.
    Each protocol keeps a `best_spread_subset` of ``n_full`` of the 90 directions as the full
    acquisition and gives the best-spread ``n_input`` of those (`restrict_directions`).

    Parameters
    ----------
    n_brains : int
        Number of held-out brains.
    snr : float, optional
        Signal-to-noise ratio (white-matter S0 / sigma).
    seed : int, optional
        Base seed.
    protocols : tuple, optional
        ``(group, n_input, n_full)`` triples.
    slab : None or (start, stop) or three (start, stop), optional
        Simulate only this part of each brain's grid (`qid2_bidsapp.sim.render_brain`).

    Yields
    ------
    EvalCase

    Raises
    ------
    EngineUnavailableError
        When the simulator or its driver maps (``../shared/data/phantom``) are missing.

    """
    from ..errors import EngineUnavailableError

    try:
        from ..sim import acquisition, drivers_available, simulate_brain
    except ImportError as err:
        raise EngineUnavailableError(f"--simulated needs qid2_bidsapp.sim ({err})") from None
    if not drivers_available():
        raise EngineUnavailableError(
            "--simulated needs the simulator's driver maps (../shared/data/phantom)"
        )
    full = max(n for _, _, n in protocols)
    for k in range(int(n_brains)):
        brain_seed = seed + SIM_SEED_OFFSET + k
        bvals, bvecs = acquisition({1000: full}, n_b0=SIM_N_B0, seed=brain_seed)
        brain = simulate_brain(bvals, bvecs, seed=brain_seed, snr=snr, slab=slab)
        source = f"qid2_bidsapp.sim.simulate_brain(seed={brain_seed}, snr={snr:g})"
        base = EvalCase(
            name=f"sim-{brain_seed}",
            group="sim",
            data=brain.data,
            bvals=brain.bvals,
            bvecs=brain.bvecs,
            mask=brain.mask,
            affine=brain.affine,
            input_indices=uniform_split(brain.bvals, brain.bvecs, n_input=protocols[0][1]),
            truth=brain.clean,
            source=source,
        )
        del brain
        for group, n_input, n_full in protocols:
            yield restrict_directions(base, n_full, n_input, group=group)
