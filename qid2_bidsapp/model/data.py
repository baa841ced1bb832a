"""Training examples for the QID² network, as numpy arrays (no torch here).

One example is built from one 4D DWI volume, self-supervised: a target direction is chosen among
the ACQUIRED directions of a shell and hidden together with a random number of other acquired
directions; the network sees the R kept directions nearest to the target (reference slices),
the SH prior at the target computed from all kept directions, and the direction tokens, and
learns to produce the hidden (measured) target slice.

Frames and conventions
----------------------
* **Model frame.** Directions given to the model (tokens) are in the *voxel frame of the
  slice*: axes ``(a, b, s)`` where ``s`` is the slice axis and ``a < b`` the two in-plane
  voxel axes. For the usual slice axis 2 this is the voxel frame ``(i, j, k)``, which equals the
  FSL image-axis frame for images with a negative affine determinant (radiological storage, what
  dcm2niix writes); FSL flips x for a positive determinant. `model_frame_bvecs` does the
  conversion; inference must use the same function. The SH prior and the choice of references
  do not depend on the frame (both are invariant to rotations and reflections).
* **SH prior.** `sh_prior_for_target` (also used by the inference engine): regularised SH fit of
  the kept directions, order `sh_order_for(K)`, λ = the model's ``prior_lambda`` (default
  `SH_PRIOR_LAMBDA`), evaluated at the target.
  It is applied to the raw signal and normalised afterwards (it is linear, so this equals the
  fit of ``S/S0`` up to the clip of `normalise_signal`).
* **Model inputs.** `model_inputs` normalises target, references and prior by the mean b=0
  image with `conditioning.normalise_signal` (no masking: the background is what
  `normalise_signal` makes of it) and maps them to model space.

Sources are anything with a ``volumes()`` method yielding `Volume` objects (`VolumeSource`):
`BidsSource` (real scans found with pybids; any site can fine-tune on its own data) and
`PhantomSource` (the analytic phantom of `qid2_bidsapp.data.example`, a cheap stand-in until a
realistic simulator plugs in through the same protocol, optionally with a noise-free ``clean``
signal to use as the target).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from scipy import ndimage

from ..errors import InputError, Qid2Error
from ..gradients import GradientTable, select_target_directions
from ..shm import sh_order_for, sh_prediction_matrix
from .conditioning import (
    direction_tokens,
    normalise_signal,
    select_references,
    to_model_space,
)

#: Laplace–Beltrami weight of the SH prior by default (the ``sh`` engine's default).
SH_PRIOR_LAMBDA = 0.006

#: Fewest kept (input) directions in a training example.
DEFAULT_MIN_KEEP = 6

#: Default training crop (H = W).
DEFAULT_CROP = 64

#: A slice is usable when it has at least this many brain voxels ...
MIN_BRAIN_VOXELS = 64
#: ... and at least this fraction of the brain voxels of the fullest slice.
MIN_BRAIN_FRACTION = 0.3


# --------------------------------------------------------------------------- shared with inference


def model_frame_bvecs(bvecs: np.ndarray, affine: np.ndarray, slice_axis: int = 2) -> np.ndarray:
    """Convert FSL image-axis b-vectors to the model frame of a slice axis.

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        Directions in FSL convention (image axes, x flipped when ``det(affine) > 0``).
    affine : ndarray, shape (4, 4)
        The image's voxel-to-world affine (only the sign of its determinant is used).
    slice_axis : int
        Voxel axis the 2D slices are taken along (0, 1 or 2).

    Returns
    -------
    ndarray, shape (N, 3)
        Directions in voxel axes ``(a, b, slice_axis)``, ``a < b`` the in-plane axes.

    """
    vectors = np.array(bvecs, dtype=np.float64).reshape(-1, 3)
    if np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) > 0:
        vectors[:, 0] *= -1.0
    return vectors[:, _axis_order(slice_axis)]


def _axis_order(slice_axis: int) -> list[int]:
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
    return [a for a in range(3) if a != slice_axis] + [slice_axis]


def sh_prior_matrix(
    bvecs_kept: np.ndarray, targets: np.ndarray, lam: float = SH_PRIOR_LAMBDA
) -> np.ndarray:
    """Matrix of the SH prior: kept directions to target directions.

    Parameters
    ----------
    bvecs_kept : ndarray, shape (K, 3)
        Directions of the input (kept or acquired) volumes.
    targets : ndarray, shape (M, 3)
        Target directions.
    lam : float
        Laplace–Beltrami weight (the model's ``prior_lambda``).

    Returns
    -------
    ndarray, shape (M, K)
        ``sh_prediction_matrix(bvecs_kept, targets, sh_order_for(K), lam)``.

    """
    bvecs_kept = np.asarray(bvecs_kept, dtype=np.float64).reshape(-1, 3)
    targets = np.asarray(targets, dtype=np.float64).reshape(-1, 3)
    order = sh_order_for(len(bvecs_kept))
    return sh_prediction_matrix(bvecs_kept, targets, order, lam)


def sh_prior_for_target(
    signal_kept: np.ndarray,
    bvecs_kept: np.ndarray,
    target: np.ndarray,
    lam: float = SH_PRIOR_LAMBDA,
) -> np.ndarray:
    """SH prior of one target direction: the same computation in training and inference.

    Parameters
    ----------
    signal_kept : ndarray, shape (..., K)
        Signal of the K input directions (raw, or divided by S0: the fit is linear).
    bvecs_kept : ndarray, shape (K, 3)
        Their directions.
    target : ndarray, shape (3,)
        The target direction.
    lam : float
        Laplace–Beltrami weight (the model's ``prior_lambda``).

    Returns
    -------
    ndarray, shape (...), float32
        The regularised SH fit evaluated at the target (not clipped).

    """
    signal_kept = np.asarray(signal_kept)
    weights = sh_prior_matrix(bvecs_kept, np.asarray(target).reshape(1, 3), lam)[0]
    if signal_kept.shape[-1] != weights.size:
        raise ValueError(
            f"signal_kept has {signal_kept.shape[-1]} volumes, bvecs_kept {weights.size}"
        )
    return (signal_kept.astype(np.float64) @ weights).astype(np.float32)


def model_inputs(refs: np.ndarray, prior: np.ndarray, b0: np.ndarray, clip: float) -> np.ndarray:
    """Model-space condition from raw reference slices, raw prior and b=0.

    Parameters
    ----------
    refs : ndarray, shape (R, H, W)
        Reference slices (raw signal), nearest first.
    prior : ndarray, shape (H, W)
        SH prior slice (raw signal, `sh_prior_for_target`).
    b0 : ndarray, shape (H, W)
        Mean b=0 slice.
    clip : float
        ``ModelConfig.signal_clip``.

    Returns
    -------
    ndarray, shape (R + 1, H, W), float32
        ``to_model_space(normalise_signal(., b0, clip))`` of the references, then the prior.

    """
    stack = np.concatenate([np.asarray(refs), np.asarray(prior)[None]], axis=0)
    return to_model_space(normalise_signal(stack, b0[None], clip), clip).astype(np.float32)


# --------------------------------------------------------------------------- volumes and sources


@dataclass
class Volume:
    """One DWI series in memory, as a source yields it.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
        Measured signal (raw scale).
    bvals : ndarray, shape (N,)
        b-values.
    bvecs : ndarray, shape (N, 3)
        FSL image-axis directions (zeros at b=0).
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine (its determinant sign sets the FSL x flip).
    name : str
        Where it comes from (for logs and the model card).
    clean : ndarray, shape (X, Y, Z, N), optional
        Noise-free signal (simulators); used as the target when the example builder is asked to.

    """

    data: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    mask: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.diag([-1.0, 1.0, 1.0, 1.0]))
    name: str = "volume"
    clean: np.ndarray | None = None


@runtime_checkable
class VolumeSource(Protocol):
    """Anything that yields training volumes (a BIDS dataset, a phantom, a simulator)."""

    def volumes(self) -> Iterable[Volume]:
        """Yield the source's volumes (called once; they are kept in memory)."""
        ...

    def describe(self) -> dict:
        """Return a JSON-serialisable description (training record, model card)."""
        ...


class PreparedVolume:
    """A `Volume` re-oriented to the model frame, with what example building needs.

    Parameters
    ----------
    volume : Volume
        The source volume.
    slice_axis : int
        Voxel axis of the slices.
    min_keep : int
        Shells need at least ``min_keep + 1`` directions to be used.
    b0_threshold : float
        b-values at or below it are b=0.

    Raises
    ------
    Qid2Error
        When the volume has no b=0 volume, no usable shell or no usable slice.

    """

    def __init__(
        self,
        volume: Volume,
        *,
        slice_axis: int = 2,
        min_keep: int = DEFAULT_MIN_KEEP,
        b0_threshold: float = 50.0,
    ):
        order = _axis_order(slice_axis)
        self.name = volume.name
        self.data = np.transpose(np.asarray(volume.data, dtype=np.float32), [*order, 3])
        self.clean = None
        if volume.clean is not None:
            self.clean = np.transpose(np.asarray(volume.clean, dtype=np.float32), [*order, 3])
        self.mask = np.transpose(np.asarray(volume.mask, dtype=bool), order)
        table = GradientTable(volume.bvals, volume.bvecs, b0_threshold=b0_threshold)
        self.bvecs = model_frame_bvecs(table.bvecs, volume.affine, slice_axis)
        if not table.b0_mask.any():
            raise Qid2Error(f"{volume.name}: no b=0 volume to normalise by")
        self.b0 = self.data[..., table.b0_mask].mean(axis=-1)
        self.n_b0 = int(table.b0_mask.sum())
        self.shells = {b: idx for b, idx in table.shells.items() if len(idx) > min_keep}
        if not self.shells:
            raise Qid2Error(
                f"{volume.name}: no shell with more than {min_keep} directions to hide from"
            )
        counts = self.mask.sum(axis=(0, 1))
        good = counts >= max(MIN_BRAIN_VOXELS, MIN_BRAIN_FRACTION * counts.max())
        self.slices = np.flatnonzero(good)
        if self.slices.size == 0:
            raise Qid2Error(f"{volume.name}: no slice with {MIN_BRAIN_VOXELS}+ brain voxels")

    def describe(self) -> dict:
        """Return shape, shells and direction counts (JSON-serialisable)."""
        return {
            "name": self.name,
            "shape": list(self.data.shape),
            "shells": {str(b): len(idx) for b, idx in self.shells.items()},
            "n_b0": self.n_b0,
        }


class BidsSource:
    """DWI runs of a BIDS dataset (raw or QSIPrep-style), for self-supervised training.

    Parameters
    ----------
    path : str or Path
        Dataset root.
    participant_label : list of str, optional
        Only these subjects.
    exclude_participant_label : list of str, optional
        Leave these subjects out (e.g. to validate on them).
    input_type : {"auto", "raw", "qsiprep"}
        Passed to `collect_dwi_runs`.
    bids_filters : dict, optional
        Extra pybids filters ``{"dwi": {...}}``.

    """

    def __init__(
        self,
        path: str | Path,
        *,
        participant_label: Sequence[str] | None = None,
        exclude_participant_label: Sequence[str] | None = None,
        input_type: str = "auto",
        bids_filters: dict | None = None,
    ):
        self.path = Path(path)
        self.participant_label = list(participant_label or [])
        self.exclude = [s.removeprefix("sub-") for s in exclude_participant_label or []]
        self.input_type = input_type
        self.bids_filters = bids_filters
        self._runs: list[str] = []

    def _collect(self) -> list:
        from ..bids import collect_dwi_runs

        if not (self.path / "dataset_description.json").is_file():
            raise InputError(self.path, "is not a BIDS dataset (no dataset_description.json)")
        runs = collect_dwi_runs(
            self.path,
            input_type=self.input_type,
            participant_labels=self.participant_label or None,
            bids_filters=self.bids_filters,
        )
        runs = [r for r in runs if r.subject not in self.exclude]
        if not runs:
            raise InputError(self.path, "no DWI run left after excluding participants")
        return runs

    def volumes(self) -> Iterable[Volume]:
        """Load every selected run (data, gradients, mask from the input or ``median_otsu``).

        Yields
        ------
        Volume

        """
        import nibabel as nib

        from ..upsampling import brain_mask, load_dwi_header, mean_b0, read_gradients

        for run in self._collect():
            img = load_dwi_header(run.dwi)
            table = read_gradients(run.dwi, run.bval, run.bvec, run.bmatrix, img)
            data = np.asarray(img.get_fdata(dtype=np.float32))
            if run.mask is not None:
                mask = np.asarray(nib.load(str(run.mask)).dataobj) > 0
            else:
                mask = brain_mask(mean_b0(data, table))
            self._runs.append(run.relpath)
            yield Volume(data, table.bvals, table.bvecs, mask, img.affine, name=run.relpath)

    def describe(self) -> dict:
        """Return the dataset path, the selection and the runs loaded so far."""
        return {
            "kind": "bids",
            "path": str(self.path),
            "participant_label": self.participant_label,
            "exclude_participant_label": self.exclude,
            "runs": list(self._runs),
        }


class PhantomSource:
    """Random crossing-fibre phantoms (`phantom_signal`) with random protocols and Rician noise.

    Every volume draws its grid size, b-values (one or two shells), direction count, number of
    b=0 volumes and SNR from the given ranges; directions are spread by electrostatic repulsion.

    Parameters
    ----------
    n_volumes : int
        Volumes to generate.
    seed : int
        Seed (the volumes depend on nothing else).
    size : tuple of int
        Range of the in-plane grid size (X = Y).
    n_slices : int
        Slices (Z) per volume.
    bvals : tuple of float
        Range of the b-values (s/mm²).
    n_directions : tuple of int
        Range of the directions per shell.
    n_shells : tuple of int
        Range of the number of shells.
    n_b0 : tuple of int
        Range of the number of b=0 volumes.
    snr : tuple of float
        Range of S0 / sigma in white matter.

    """

    def __init__(
        self,
        n_volumes: int = 8,
        *,
        seed: int = 0,
        size: tuple[int, int] = (48, 72),
        n_slices: int = 4,
        bvals: tuple[float, float] = (500.0, 3000.0),
        n_directions: tuple[int, int] = (10, 64),
        n_shells: tuple[int, int] = (1, 2),
        n_b0: tuple[int, int] = (1, 3),
        snr: tuple[float, float] = (15.0, 60.0),
    ):
        self.n_volumes = int(n_volumes)
        self.seed = int(seed)
        self.size = tuple(int(v) for v in size)
        self.n_slices = int(n_slices)
        self.bvals = tuple(float(v) for v in bvals)
        self.n_directions = tuple(int(v) for v in n_directions)
        self.n_shells = tuple(int(v) for v in n_shells)
        self.n_b0 = tuple(int(v) for v in n_b0)
        self.snr = tuple(float(v) for v in snr)

    def _protocol(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n_shells = int(rng.integers(self.n_shells[0], self.n_shells[1] + 1))
        bvals = [np.zeros(int(rng.integers(self.n_b0[0], self.n_b0[1] + 1)))]
        bvecs = [np.zeros((len(bvals[0]), 3))]
        shell_bs = np.sort(rng.uniform(*self.bvals, size=n_shells))
        for b in shell_bs:
            n = int(rng.integers(self.n_directions[0], self.n_directions[1] + 1))
            seed = int(rng.integers(2**31))
            bvecs.append(select_target_directions(np.empty((0, 3)), n, seed=seed, n_iter=200))
            bvals.append(np.full(n, round(float(b), -1)))
        return np.concatenate(bvals), np.vstack(bvecs)

    def volumes(self) -> Iterable[Volume]:
        """Generate the volumes.

        Yields
        ------
        Volume
            With ``clean`` set to the noise-free signal.

        """
        from ..data.example import phantom_signal

        rng = np.random.default_rng(self.seed)
        for k in range(self.n_volumes):
            bvals, bvecs = self._protocol(rng)
            size = int(rng.integers(self.size[0], self.size[1] + 1))
            clean, brain = phantom_signal((size, size, self.n_slices), bvals, bvecs)
            sigma = 1000.0 / rng.uniform(*self.snr)
            noisy = add_rician_noise(clean, sigma, rng)
            yield Volume(
                noisy,
                bvals,
                bvecs,
                brain,
                np.diag([-2.0, 2.0, 2.0, 1.0]),
                name=f"phantom-{self.seed}-{k}",
                clean=clean,
            )

    def describe(self) -> dict:
        """Return the generator's settings."""
        return {
            "kind": "phantom",
            "generator": "qid2_bidsapp.data.example.phantom_signal (analytic crossing bundles)",
            "n_volumes": self.n_volumes,
            "seed": self.seed,
            "size": list(self.size),
            "n_slices": self.n_slices,
            "bvals": list(self.bvals),
            "n_directions": list(self.n_directions),
            "n_shells": list(self.n_shells),
            "n_b0": list(self.n_b0),
            "snr": list(self.snr),
        }


def prepare_volumes(
    sources: Sequence[VolumeSource], *, slice_axis: int = 2, min_keep: int = DEFAULT_MIN_KEEP
) -> list[list[PreparedVolume]]:
    """Load every source once and prepare its volumes.

    Parameters
    ----------
    sources : sequence of VolumeSource
        The sources.
    slice_axis : int
        Voxel axis of the slices.
    min_keep : int
        Fewest kept directions (shells with fewer than ``min_keep + 1`` are skipped).

    Returns
    -------
    list of list of PreparedVolume
        One list per source.

    Raises
    ------
    Qid2Error
        When a source yields no usable volume.

    """
    prepared = []
    for source in sources:
        volumes = [
            PreparedVolume(v, slice_axis=slice_axis, min_keep=min_keep) for v in source.volumes()
        ]
        if not volumes:
            raise Qid2Error(f"training source {source.describe()} yielded no volume")
        prepared.append(volumes)
    return prepared


# --------------------------------------------------------------------------- augmentation


@dataclass
class Augmentation:
    """Random augmentation of a training example (all ranges inclusive).

    Parameters
    ----------
    rotation_deg : float
        In-plane rotation drawn from ``[-rotation_deg, rotation_deg]``; image and directions
        rotate together.
    scale : tuple of float
        Isotropic in-plane zoom range.
    intensity : tuple of float
        Range of a factor applied to the diffusion-weighted signal but not to b=0 (an S0
        mis-estimate: ``S/S0`` of inputs and target scale together).
    noise_prob : float
        Probability of adding Rician noise to the inputs (kept volumes and b=0, not the target).
    noise_snr : tuple of float
        Range of the added noise's SNR, relative to the median b=0 in the slice's brain.

    """

    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    intensity: tuple[float, float] = (0.95, 1.05)
    noise_prob: float = 0.0
    noise_snr: tuple[float, float] = (20.0, 80.0)

    @classmethod
    def none(cls) -> Augmentation:
        """Return an augmentation that changes nothing (validation)."""
        return cls(0.0, (1.0, 1.0), (1.0, 1.0), 0.0)


def rotate_in_plane(vectors: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate model-frame directions about the slice axis, as `resample_slices` rotates images.

    Parameters
    ----------
    vectors : ndarray, shape (N, 3)
        Directions in the model frame ``(a, b, slice)``.
    angle_deg : float
        Angle from the first in-plane axis toward the second.

    Returns
    -------
    ndarray, shape (N, 3)

    """
    theta = np.deg2rad(angle_deg)
    c, s = np.cos(theta), np.sin(theta)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return np.asarray(vectors, dtype=np.float64) @ rotation.T


def resample_slices(
    images: np.ndarray,
    centre: Sequence[float],
    out_shape: tuple[int, int],
    *,
    angle_deg: float = 0.0,
    scale: float = 1.0,
    order: int = 1,
) -> np.ndarray:
    """Rotate, zoom and crop 2D images in one resampling (zeros outside).

    A point ``p`` of the input lands at ``c_out + scale * R(angle) (p - centre)``, where
    ``c_out`` is the centre of the output and ``R`` rotates the first axis toward the second.
    With ``angle_deg = 0``, ``scale = 1`` this is an exact crop of the window starting at
    ``centre - (out_shape - 1) / 2`` (use a half-integer `centre` for even sizes).

    Parameters
    ----------
    images : ndarray, shape (X, Y, C)
        Input images (channels last).
    centre : sequence of float
        Input point that goes to the output centre.
    out_shape : tuple of int
        (H, W).
    angle_deg : float
        Rotation angle in degrees.
    scale : float
        Zoom factor (> 1 enlarges).
    order : int
        Spline order (1: linear, no overshoot).

    Returns
    -------
    ndarray, shape (H, W, C), float32

    """
    theta = np.deg2rad(angle_deg)
    c, s = np.cos(theta), np.sin(theta)
    inverse = np.array([[c, s], [-s, c]]) / scale  # (scale R)^-1
    c_out = (np.asarray(out_shape, dtype=np.float64) - 1.0) / 2.0
    offset = np.asarray(centre, dtype=np.float64) - inverse @ c_out
    out = np.empty((*out_shape, images.shape[2]), dtype=np.float32)
    for k in range(images.shape[2]):
        out[..., k] = ndimage.affine_transform(
            images[..., k], inverse, offset=offset, output_shape=out_shape, order=order, cval=0.0
        )
    return out


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Return ``sqrt((S + n1)^2 + n2^2)`` with ``n1, n2 ~ N(0, sigma^2)``.

    Parameters
    ----------
    signal : ndarray
        Signal (any shape).
    sigma : float
        Noise standard deviation.
    rng : numpy.random.Generator
        Random source.

    Returns
    -------
    ndarray, float32

    """
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


# --------------------------------------------------------------------------- one example


def hide_directions(
    n: int, rng: np.random.Generator, min_keep: int, max_keep: int | None = None
) -> tuple[int, np.ndarray]:
    """Choose a target among n acquired directions and the ones kept as inputs.

    Parameters
    ----------
    n : int
        Acquired directions of the shell (``n > min_keep``).
    rng : numpy.random.Generator
        Random source.
    min_keep, max_keep : int
        Range of the kept count K (``max_keep`` capped at ``n - 1``).

    Returns
    -------
    target : int
        Index of the target.
    kept : ndarray of int, shape (K,)
        Sorted indices of the kept directions (the target and ``n - 1 - K`` others are hidden).

    """
    top = n - 1 if max_keep is None else min(n - 1, max_keep)
    if top < min_keep:
        raise ValueError(f"need more than {min_keep} directions, got {n}")
    k = int(rng.integers(min_keep, top + 1))
    order = rng.permutation(n)
    return int(order[0]), np.sort(order[1 : k + 1])


def _crop_centre(mask2d: np.ndarray, out_shape: tuple[int, int], rng) -> np.ndarray:
    """Half-way between the brain centroid and a random brain voxel (None: the centroid)."""
    points = np.argwhere(mask2d)
    centre = points.mean(axis=0)
    if rng is not None:
        centre = 0.5 * (centre + points[rng.integers(len(points))])
    half = (np.asarray(out_shape) - 1) / 2.0
    return np.floor(centre - half) + half  # the window starts on a voxel


def make_example(
    volume: PreparedVolume,
    rng: np.random.Generator,
    *,
    n_references: int,
    clip: float,
    crop: int = DEFAULT_CROP,
    min_keep: int = DEFAULT_MIN_KEEP,
    max_keep: int | None = None,
    augmentation: Augmentation | None = None,
    clean_target: bool = False,
    angle_deg: float | None = None,
    prior_lambda: float = SH_PRIOR_LAMBDA,
) -> dict:
    """Build one self-supervised training example from a prepared volume.

    Parameters
    ----------
    volume : PreparedVolume
        The source volume (model frame).
    rng : numpy.random.Generator
        Drives every choice: the same generator state gives the same example.
    n_references : int
        R.
    clip : float
        ``ModelConfig.signal_clip``.
    crop : int
        Output size H = W.
    min_keep, max_keep : int
        Range of the number of kept (input) directions.
    augmentation : Augmentation, optional
        None: no augmentation and a centred crop (validation).
    clean_target : bool
        Take the target from ``volume.clean`` when the source provides it.
    angle_deg : float, optional
        Force the rotation angle (tests); otherwise drawn from `augmentation`.
    prior_lambda : float
        λ of the SH prior (the model's ``prior_lambda``).

    Returns
    -------
    dict
        ``target`` (1, H, W), ``condition`` (R + 1, H, W): references then prior, ``tokens``
        (R + 1, TOKEN_FEATURES), ``mask`` (1, H, W), all float32 in model space (mask 0/1);
        ``meta``: plain data (volume, shell, slice, kept count, volume indices of the target,
        kept and reference directions, model-frame directions, crop centre, augmentation).

    """
    aug = augmentation
    shell = int(rng.choice(sorted(volume.shells)))
    indices = volume.shells[shell]
    target_i, kept_i = hide_directions(len(indices), rng, min_keep, max_keep)
    z = int(rng.choice(volume.slices))
    shape = (crop, crop)
    centre = _crop_centre(volume.mask[:, :, z], shape, rng if aug else None)
    angle = 0.0 if aug is None else rng.uniform(-aug.rotation_deg, aug.rotation_deg)
    angle = angle if angle_deg is None else float(angle_deg)
    scale = 1.0 if aug is None else rng.uniform(*aug.scale)

    truth_data = volume.clean if clean_target and volume.clean is not None else volume.data
    columns = indices[kept_i]
    stack = np.concatenate(
        [
            volume.data[:, :, z][..., columns],
            truth_data[:, :, z, indices[target_i], None],
            volume.b0[:, :, z, None],
            volume.mask[:, :, z, None].astype(np.float32),
        ],
        axis=-1,
    )
    out = resample_slices(stack, centre, shape, angle_deg=angle, scale=scale)
    kept, target, b0, mask = out[..., :-3], out[..., -3], out[..., -2], out[..., -1] > 0.5
    bvecs_kept = rotate_in_plane(volume.bvecs[columns], angle)
    bvec_target = rotate_in_plane(volume.bvecs[indices[target_i]][None], angle)[0]

    if aug is not None:
        factor = rng.uniform(*aug.intensity)
        kept, target = kept * factor, target * factor
        if rng.uniform() < aug.noise_prob:
            kept, b0 = _extra_noise(kept, b0, mask, aug, volume.n_b0, rng)

    prior = sh_prior_for_target(kept, bvecs_kept, bvec_target, prior_lambda)
    refs = select_references(bvec_target, bvecs_kept, n_references)
    condition = model_inputs(np.moveaxis(kept[..., refs], -1, 0), prior, b0, clip)
    target_model = to_model_space(normalise_signal(target, b0, clip), clip)
    return {
        "target": target_model[None].astype(np.float32),
        "condition": condition,
        "tokens": direction_tokens(bvec_target, bvecs_kept[refs], float(shell)),
        "mask": mask[None].astype(np.float32),
        "meta": {
            "volume": volume.name,
            "bval": shell,
            "slice": z,
            "n_kept": len(columns),
            "target_index": int(indices[target_i]),
            "kept_indices": columns.tolist(),
            "ref_indices": columns[refs].tolist(),
            "centre": centre.tolist(),
            "target_bvec": bvec_target.tolist(),
            "ref_bvecs": bvecs_kept[refs].tolist(),
            "angle_deg": float(angle),
            "scale": float(scale),
        },
    }


def _extra_noise(kept, b0, mask, aug: Augmentation, n_b0: int, rng):
    level = float(np.median(b0[mask])) if mask.any() else float(b0.max())
    sigma = level / rng.uniform(*aug.noise_snr)
    kept = add_rician_noise(kept, sigma, rng)
    b0 = add_rician_noise(b0, sigma / np.sqrt(max(n_b0, 1)), rng)
    return kept, b0


# --------------------------------------------------------------------------- sampling sources


class ExampleSampler:
    """Draw examples from several sources with weights, reproducibly.

    Parameters
    ----------
    volumes : list of list of PreparedVolume
        One list per source (`prepare_volumes`).
    weights : sequence of float
        Relative probability of each source.
    rng : numpy.random.Generator
        Random source (its state is the sampler's state).
    **example_args
        Passed to `make_example`.

    """

    def __init__(
        self,
        volumes: list[list[PreparedVolume]],
        weights: Sequence[float],
        rng: np.random.Generator,
        **example_args,
    ):
        weights = np.asarray(weights, dtype=np.float64)
        if len(weights) != len(volumes) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"need one non-negative weight per source, got {weights.tolist()}")
        self.volumes = volumes
        self.probabilities = weights / weights.sum()
        self.rng = rng
        self.example_args = example_args

    def draw(self) -> dict:
        """Return one example (see `make_example`)."""
        source = int(self.rng.choice(len(self.volumes), p=self.probabilities))
        volume = self.volumes[source][int(self.rng.integers(len(self.volumes[source])))]
        return make_example(volume, self.rng, **self.example_args)

    def batch(self, size: int) -> dict:
        """Return `size` examples stacked (see `stack_examples`)."""
        return stack_examples([self.draw() for _ in range(size)])


def stack_examples(examples: Sequence[dict]) -> dict:
    """Stack examples along a new first axis (``meta`` becomes a list).

    Parameters
    ----------
    examples : sequence of dict
        Outputs of `make_example`.

    Returns
    -------
    dict
        ``target``, ``condition``, ``tokens``, ``mask`` as (B, ...) arrays; ``meta`` list.

    """
    stacked = {k: np.stack([e[k] for e in examples]) for k in ("target", "condition", "tokens")}
    stacked["mask"] = np.stack([e["mask"] for e in examples])
    stacked["meta"] = [e["meta"] for e in examples]
    return stacked
