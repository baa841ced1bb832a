"""Training examples for the SH-field model, drawn from noise-free coefficient slabs (numpy).

One example is one slice (with its context slices) of a `qid2_bidsapp.sim.slabs.CoefficientSlab`
acquired with a random protocol: N directions of a uniform shell in a random orientation
(N log-uniform in `Protocol.n_directions`, 6-64 by default), 1-6 b=0 volumes, Rician noise at
an SNR drawn from `Protocol.snr` (10-40 by default, against white-matter S0). The network
input is built from the noisy acquisition by `field_features` exactly as at inference; the
target is the slab's noise-free coefficients (model space). Noise-free targets mean the loss
does not reward shrinking anisotropy toward the noise's angular mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..shm import sh_basis_matrix
from ..sim.protocol import uniform_shell
from ..sim.slabs import CoefficientSlab
from .field_config import FieldConfig
from .field_features import (
    brain_windows,
    coefficient_scales,
    context_indices,
    mirrored_window,
    reference_s0,
    scalar_values,
    shell_features,
    slice_condition,
)


@dataclass(frozen=True)
class Protocol:
    """Ranges of the simulated acquisitions (all inclusive).

    Parameters
    ----------
    n_directions : tuple of int
        Directions per shell (drawn log-uniformly).
    snr : tuple of float
        White-matter S0 / sigma.
    n_b0 : tuple of int
        b=0 volumes averaged into S0.
    edge_fraction : float
        Share of examples centred on a slab's first or last slice (context repeated), as at
        the ends of a volume or of a partial-coverage acquisition.

    """

    n_directions: tuple[int, int] = (6, 64)
    snr: tuple[float, float] = (10.0, 40.0)
    n_b0: tuple[int, int] = (1, 6)
    edge_fraction: float = 0.1


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``|S + n1 + i n2|`` with ``n1, n2 ~ N(0, sigma^2)`` (float32).

    Parameters
    ----------
    signal : ndarray
        Noise-free magnitude.
    sigma : float
        Noise standard deviation.
    rng : numpy.random.Generator
        Random source.

    Returns
    -------
    ndarray, float32

    """
    shape = np.shape(signal)
    real = signal + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def _log_uniform_int(low: int, high: int, rng: np.random.Generator) -> int:
    return int(np.clip(np.rint(np.exp(rng.uniform(np.log(low), np.log(high + 0.5)))), low, high))


def _window(mask2d: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a crop x crop window around a random brain voxel (may overhang)."""
    points = np.argwhere(mask2d)
    centre = points[rng.integers(len(points))] if len(points) else np.array(mask2d.shape) // 2
    corner = []
    for axis in (0, 1):
        n = mask2d.shape[axis]
        start = int(centre[axis]) - crop // 2 + int(rng.integers(-crop // 4, crop // 4 + 1))
        corner.append(int(np.clip(start, min(0, n - crop), max(0, n - crop))))
    return corner[0], corner[1]


def _take(array: np.ndarray, corner: tuple[int, int], crop: int) -> np.ndarray:
    """Crop the first two axes at `corner`, padding with zeros where the window overhangs."""
    out = np.zeros((crop, crop, *array.shape[2:]), dtype=array.dtype)
    r0, c0 = corner
    rs, cs = max(0, r0), max(0, c0)
    re, ce = min(array.shape[0], r0 + crop), min(array.shape[1], c0 + crop)
    out[rs - r0 : re - r0, cs - c0 : ce - c0] = array[rs:re, cs:ce]
    return out


def make_field_example(
    slab: CoefficientSlab,
    rng: np.random.Generator,
    config: FieldConfig,
    *,
    crop: int = 64,
    protocol: Protocol | None = None,
    target: str = "clean",
    small_field: int | None = None,
) -> dict:
    """Build one training example: a random acquisition of one slice of a slab.

    Parameters
    ----------
    slab : CoefficientSlab
        Noise-free coefficients (order >= ``config.sh_order``).
    rng : numpy.random.Generator
        Drives every choice: the same state gives the same example.
    config : FieldConfig
        The model configuration.
    crop : int
        In-plane size (a multiple of ``config.spatial_multiple``).
    protocol : Protocol, optional
        Acquisition ranges (default `Protocol()`).
    target : {"clean", "rician-mean"}
        ``clean``: the noise-free coefficients; ``rician-mean``: those of the expected
        magnitude ``E[M]`` of the noise-free signal under the example's Rician noise
        (`rician_mean`), what an acquired volume measures on average: volumes synthesised
        this way agree with the acquired ones they are merged with, noise floor included.
    small_field : int, optional
        Simulate a tiny field of view (under ``crop // 2``, as dipy's small_64D): the
        acquisition covers only a ``small_field`` square, and the example is the `crop`-wide
        window the app runs the network on for such a scan (`field_features.network_window`,
        the features mirrored outside the square), with the mask (the loss) only inside it.

    Returns
    -------
    dict
        ``condition`` (condition_channels, H, W), ``target`` (C, H, W) model-space
        coefficients, ``mask`` (H, W) float 0/1, ``bval`` float, and ``meta`` (plain data).

    """
    protocol = protocol or Protocol()
    n_slices = slab.coefs.shape[2]
    context = config.context_slices
    if rng.uniform() < protocol.edge_fraction or n_slices <= 2 * context:
        z = int(rng.choice([0, n_slices - 1]))
    else:
        z = int(rng.integers(context, n_slices - context))
    idx = context_indices(z, n_slices, context)
    size = crop if small_field is None else int(small_field)
    if small_field is not None and not 0 < size < crop // 2:
        raise ValueError(f"small_field must be in 1..{crop // 2 - 1}, got {small_field}")
    corner = _window(slab.mask[:, :, z], size, rng)
    n_coef = config.n_coefficients
    coefs = _take(slab.coefs[:, :, idx, :n_coef], corner, size).astype(np.float32)
    s0 = _take(slab.s0[:, :, idx], corner, size)
    mask = _take(slab.mask[:, :, idx], corner, size)

    n_dirs = _log_uniform_int(*protocol.n_directions, rng)
    bvecs = uniform_shell(n_dirs, seed=int(rng.integers(2**31)))
    basis, _ = sh_basis_matrix(bvecs, config.sh_order)  # (N, C)
    clean = s0[..., None] * np.clip(coefs @ basis.T.astype(np.float32), 0.0, None)
    snr = float(rng.uniform(*protocol.snr))
    sigma = slab.s0_reference / snr
    noisy = rician(clean, sigma, rng)
    n_b0 = int(rng.integers(protocol.n_b0[0], protocol.n_b0[1] + 1))
    b0_volumes = np.stack([rician(s0, sigma, rng) for _ in range(n_b0)], axis=-1)
    b0 = b0_volumes.mean(axis=-1)

    if small_field is None:
        s0_ref = float(np.median(slab.s0[slab.mask])) if slab.mask.any() else 1.0
    else:  # the scan is the square: its reference S0 is taken there, as the app does
        s0_ref = reference_s0(b0, mask)
    features, _ = shell_features(
        noisy, b0, mask, bvecs, config, s0_ref=s0_ref, bval=slab.bval, n_b0=n_b0
    )
    centre = int(np.flatnonzero(idx == z)[0]) if context == 0 else context
    noise_rel = None
    if config.noise_input:  # estimated from the example as the app estimates it from a scan
        from ..trust import estimate_noise

        data = np.concatenate([b0_volumes, noisy], axis=-1)
        table_b = np.r_[np.zeros(n_b0), np.full(n_dirs, slab.bval)]
        table_g = np.vstack([np.zeros((n_b0, 3)), bvecs])
        estimated, _ = estimate_noise(data, table_b, table_g, mask if mask.any() else None)
        noise_rel = estimated / s0_ref
    scalars = scalar_values(slab.bval, n_dirs, n_b0, noise_rel)
    centre_coefs = coefs[:, :, centre]
    if target == "rician-mean":
        centre_coefs = rician_mean_coefficients(centre_coefs, s0[:, :, centre], sigma, config)
    elif target != "clean":
        raise ValueError(f"target must be 'clean' or 'rician-mean', got {target!r}")
    centre_mask = mask[:, :, centre].astype(np.float32)
    if small_field is not None:  # the window the app runs the network on for this scan
        brain = mask if mask.any() else np.ones_like(mask)  # none: centre on the square
        rows, cols = brain_windows(brain, ((0, size), (0, size)), min_size=crop)
        features = mirrored_window(features, rows, cols)
        centre_coefs = mirrored_window(centre_coefs, rows, cols)
        inside = np.zeros((crop, crop), np.float32)
        inside[-rows[0] : -rows[0] + size, -cols[0] : -cols[0] + size] = centre_mask
        centre_mask = inside
    condition = slice_condition(features, centre, context, scalars, config)
    scales = coefficient_scales(config).astype(np.float32)
    target = np.moveaxis(centre_coefs * scales, -1, 0)
    return {
        "condition": condition,
        "target": np.ascontiguousarray(target, dtype=np.float32),
        "mask": centre_mask,
        "bval": float(slab.bval),
        "meta": {
            "slab": slab.name,
            "slice": z,
            "corner": list(corner),
            "n_directions": n_dirs,
            "n_b0": n_b0,
            "snr": snr,
            "field": size,
        },
    }


def rician_mean(signal: np.ndarray, sigma: float) -> np.ndarray:
    """Return the expected magnitude ``E[|S + n1 + i n2|]``, ``n1, n2 ~ N(0, sigma^2)``.

    ``sigma sqrt(pi/2) L_1/2(-S^2 / 2 sigma^2)`` (Laguerre polynomial, through exponentially
    scaled Bessel functions so that it does not overflow); ``S`` for ``sigma = 0``.

    Parameters
    ----------
    signal : ndarray
        Noise-free magnitude (>= 0).
    sigma : float
        Noise standard deviation.

    Returns
    -------
    ndarray, float64

    """
    from scipy.special import i0e, i1e

    signal = np.asarray(signal, dtype=np.float64)
    if sigma <= 0:
        return signal
    x = signal**2 / (2.0 * sigma**2)
    return sigma * np.sqrt(np.pi / 2.0) * ((1 + x) * i0e(x / 2) + x * i1e(x / 2))


def rician_mean_coefficients(
    coefs: np.ndarray, s0: np.ndarray, sigma: float, config: FieldConfig
) -> np.ndarray:
    """SH coefficients of ``E[M]/S0`` for noise-free coefficients of ``S/S0`` (raw, not scaled).

    Parameters
    ----------
    coefs : ndarray, shape (..., C)
        Noise-free coefficients of ``S/S0``.
    s0 : ndarray, shape (...)
        Noise-free S0.
    sigma : float
        Noise standard deviation (signal units).
    config : FieldConfig
        The model configuration (order).

    Returns
    -------
    ndarray, shape (..., C), float32

    """
    from ..shm import sh_fit_matrix
    from .field_features import _dense_directions

    dense = _dense_directions()
    basis, _ = sh_basis_matrix(dense, config.sh_order)
    s0 = np.asarray(s0, dtype=np.float64)[..., None]
    signal = s0 * np.clip(np.asarray(coefs, dtype=np.float64) @ basis.T, 0.0, None)
    ratio = np.where(s0 > 0, rician_mean(signal, sigma) / np.maximum(s0, 1e-12), 0.0)
    return (ratio @ sh_fit_matrix(dense, config.sh_order, 0.0).T).astype(np.float32)


def stack_field_examples(examples: list[dict]) -> dict:
    """Stack examples along a new first axis (``meta`` becomes a list).

    Parameters
    ----------
    examples : list of dict
        Outputs of `make_field_example`.

    Returns
    -------
    dict

    """
    out = {k: np.stack([e[k] for e in examples]) for k in ("condition", "target", "mask")}
    out["bval"] = np.asarray([e["bval"] for e in examples], dtype=np.float32)
    out["meta"] = [e["meta"] for e in examples]
    return out


# --------------------------------------------------------------------------- real scans


@dataclass
class RealShell:
    """One shell of a real scan, in the model frame, for self-supervised examples.

    Attributes
    ----------
    data : ndarray, shape (X, Y, Z, N), float32
        The shell's acquired volumes, slice axis last.
    bvecs : ndarray, shape (N, 3)
        Their directions in the model frame.
    b0 : ndarray, shape (X, Y, Z)
        Mean b=0 image.
    n_b0 : int
        b=0 volumes averaged.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
    bval : float
        The shell's b-value.
    sigma : float
        Noise standard deviation of the scan (`qid2_bidsapp.trust.estimate_noise`).
    name : str
        Run and shell.

    """

    data: np.ndarray
    bvecs: np.ndarray
    b0: np.ndarray
    n_b0: int
    mask: np.ndarray
    bval: float
    sigma: float
    name: str

    @property
    def s0_ref(self) -> float:
        """Median b=0 signal in the mask (`field_features.reference_s0`)."""
        from .field_features import reference_s0

        return reference_s0(self.b0, self.mask)


def real_shells(volumes, *, slice_axis: int = 2, min_directions: int = 12) -> list[RealShell]:
    """Cut real scans (`model.data.Volume`) into shells usable for self-supervised examples.

    Parameters
    ----------
    volumes : iterable of Volume
        E.g. ``BidsSource(...).volumes()``.
    slice_axis : int
        Voxel axis of the slices.
    min_directions : int
        Shells with fewer directions are skipped (6 inputs and some hidden ones are needed).

    Returns
    -------
    list of RealShell

    """
    from ..gradients import GradientTable
    from ..trust import estimate_noise
    from .data import _axis_order, model_frame_bvecs

    out = []
    order = _axis_order(slice_axis)
    for volume in volumes:
        table = GradientTable(volume.bvals, volume.bvecs)
        data = np.transpose(np.asarray(volume.data, dtype=np.float32), [*order, 3])
        mask = np.transpose(np.asarray(volume.mask, dtype=bool), order)
        b0 = data[..., table.b0_mask].mean(axis=-1)
        sigma, _ = estimate_noise(data, table.bvals, table.bvecs, mask)
        frame = model_frame_bvecs(table.bvecs, volume.affine, slice_axis)
        for shell, indices in table.shells.items():
            if len(indices) < min_directions:
                continue
            out.append(
                RealShell(
                    data=np.ascontiguousarray(data[..., indices]),
                    bvecs=frame[indices],
                    b0=b0,
                    n_b0=int(table.b0_mask.sum()),
                    mask=mask,
                    bval=float(np.median(table.bvals[indices])),
                    sigma=float(sigma),
                    name=f"{volume.name} b={shell}",
                )
            )
    return out


#: Hidden directions of a real example are padded to this count (weights 0 beyond).
MAX_HIDDEN = 48


def make_real_example(
    shell: RealShell,
    rng: np.random.Generator,
    config: FieldConfig,
    *,
    crop: int = 64,
    min_hidden: int = 3,
    correct_rician: bool = True,
) -> dict:
    """Build a self-supervised example: some acquired directions in, the others as targets.

    The input is a well-spread subset of K acquired directions (greedy farthest point from a
    random start, K from 6 to N - `min_hidden`); the targets are the measured ``S/S0`` of the
    other directions at the centre slice, with the Rician bias removed to first order
    (``sqrt(max(M^2 - 2 sigma^2, 0))``, sigma of the scan). Inputs are built by `shell_features`
    as at inference.

    Parameters
    ----------
    shell : RealShell
        The shell.
    rng : numpy.random.Generator
        Random source.
    config : FieldConfig
        The model configuration.
    crop : int
        In-plane size.
    min_hidden : int
        Fewest hidden directions.
    correct_rician : bool
        Remove the Rician bias from the measured targets (models trained to predict the
        noise-free signal); False keeps the measured magnitudes (models trained to predict
        ``E[M]``, the ``rician-mean`` target).

    Returns
    -------
    dict
        ``condition``; ``real_target`` (MAX_HIDDEN, H, W) measured ratios; ``real_eval``
        (MAX_HIDDEN, C) model-space coefficients to those directions; ``real_weight``
        (MAX_HIDDEN,) 1 for used rows; ``mask`` (H, W); ``bval``; ``meta``.

    """
    from ..sim.protocol import uniform_subset
    from .field_features import evaluation_matrix

    n = shell.data.shape[-1]
    k = int(rng.integers(6, max(7, n - min_hidden + 1)))
    inputs = uniform_subset(shell.bvecs, k, start=int(rng.integers(n)))
    hidden = np.setdiff1d(np.arange(n), inputs)[:MAX_HIDDEN]
    n_slices = shell.data.shape[2]
    context = config.context_slices
    counts = shell.mask.sum(axis=(0, 1))
    z = int(rng.choice(np.flatnonzero(counts >= max(1, 0.3 * counts.max()))))
    idx = context_indices(z, n_slices, context)
    corner = _window(shell.mask[:, :, z], crop, rng)
    signal = _take(shell.data[:, :, idx][..., inputs], corner, crop)
    b0 = _take(shell.b0[:, :, idx], corner, crop)
    mask = _take(shell.mask[:, :, idx], corner, crop)
    s0_ref = shell.s0_ref
    features, _ = shell_features(
        signal, b0, mask, shell.bvecs[inputs], config, s0_ref=s0_ref, bval=shell.bval,
        n_b0=shell.n_b0,
    )  # fmt: skip
    centre = context
    noise_rel = shell.sigma / s0_ref if config.noise_input else None
    condition = slice_condition(
        features, centre, context, scalar_values(shell.bval, k, shell.n_b0, noise_rel), config
    )
    measured = _take(shell.data[:, :, z][..., hidden], corner, crop)
    corrected = measured
    if correct_rician:
        corrected = np.sqrt(np.maximum(measured**2 - 2.0 * shell.sigma**2, 0.0))
    base = b0[:, :, centre, None]
    ratio = np.where(base > 0, corrected / np.maximum(base, 1e-6), 0.0)
    ratio = np.clip(ratio, 0.0, config.signal_clip)
    target = np.zeros((MAX_HIDDEN, crop, crop), np.float32)
    target[: len(hidden)] = np.moveaxis(ratio, -1, 0)
    evaluate = np.zeros((MAX_HIDDEN, config.n_coefficients), np.float32)
    evaluate[: len(hidden)] = evaluation_matrix(shell.bvecs[hidden], config)
    weight = np.zeros(MAX_HIDDEN, np.float32)
    weight[: len(hidden)] = 1.0
    valid = mask[:, :, centre] & (base[..., 0] > 0)
    return {
        "condition": condition,
        "real_target": target,
        "real_eval": evaluate,
        "real_weight": weight,
        "mask": valid.astype(np.float32),
        "bval": float(shell.bval),
        "meta": {
            "shell": shell.name,
            "slice": z,
            "corner": list(corner),
            "n_inputs": k,
            "n_hidden": len(hidden),
        },
    }


def stack_real_examples(examples: list[dict]) -> dict:
    """Stack `make_real_example` outputs along a new first axis."""
    keys = ("condition", "real_target", "real_eval", "real_weight", "mask")
    out = {k: np.stack([e[k] for e in examples]) for k in keys}
    out["bval"] = np.asarray([e["bval"] for e in examples], dtype=np.float32)
    out["meta"] = [e["meta"] for e in examples]
    return out
