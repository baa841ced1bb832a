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
    coefficient_scales,
    context_indices,
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

    Returns
    -------
    dict
        ``condition`` (condition_channels, H, W), ``target`` (C, H, W) model-space clean
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
    corner = _window(slab.mask[:, :, z], crop, rng)
    n_coef = config.n_coefficients
    coefs = _take(slab.coefs[:, :, idx, :n_coef], corner, crop).astype(np.float32)
    s0 = _take(slab.s0[:, :, idx], corner, crop)
    mask = _take(slab.mask[:, :, idx], corner, crop)

    n_dirs = _log_uniform_int(*protocol.n_directions, rng)
    bvecs = uniform_shell(n_dirs, seed=int(rng.integers(2**31)))
    basis, _ = sh_basis_matrix(bvecs, config.sh_order)  # (N, C)
    clean = s0[..., None] * np.clip(coefs @ basis.T.astype(np.float32), 0.0, None)
    snr = float(rng.uniform(*protocol.snr))
    sigma = slab.s0_reference / snr
    noisy = rician(clean, sigma, rng)
    n_b0 = int(rng.integers(protocol.n_b0[0], protocol.n_b0[1] + 1))
    b0 = np.mean([rician(s0, sigma, rng) for _ in range(n_b0)], axis=0)

    s0_ref = float(np.median(slab.s0[slab.mask])) if slab.mask.any() else 1.0
    features, _ = shell_features(noisy, b0, mask, bvecs, config, s0_ref=s0_ref)
    centre = int(np.flatnonzero(idx == z)[0]) if context == 0 else context
    condition = slice_condition(features, centre, context, scalar_values(slab.bval, n_dirs, n_b0))
    scales = coefficient_scales(config).astype(np.float32)
    target = np.moveaxis(coefs[:, :, centre] * scales, -1, 0)
    return {
        "condition": condition,
        "target": np.ascontiguousarray(target, dtype=np.float32),
        "mask": mask[:, :, centre].astype(np.float32),
        "bval": float(slab.bval),
        "meta": {
            "slab": slab.name,
            "slice": z,
            "corner": list(corner),
            "n_directions": n_dirs,
            "n_b0": n_b0,
            "snr": snr,
        },
    }


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
