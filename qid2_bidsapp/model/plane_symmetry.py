"""Mirror symmetries of a slice for averaging the SH-field model's predictions.

Reversing the rows or the columns of a slice, or the order of its neighbouring (context)
slices, maps a diffusion MRI slice to another plausible one, provided the diffusion directions
are mirrored with it. The network is not exactly equivariant to these maps (it was not trained
with them and is a plain U-Net), so its errors differ between a slice and its mirror image:
running it on mirrored copies of each slice and mapping the predictions back averages part of
its error away, as test-time augmentation does in image segmentation. Every directional input
and the output are spherical-harmonic coefficients, so mirroring the directions is a fixed
signed permutation of the coefficients (`sh_symmetry_matrix`); nothing is refitted.

`SYMMETRIES` lists the mirrors in the order they are used: 1 (the slice as it is), 2 (+ rows
reversed), 4 (the four in-plane mirrors) or 8 (the same with the context slices reversed).
Measured (docs/results.md): 4 in-plane mirrors of one one-step sample cost what two two-step
samples did and lower the FA error by 1-5 % on held-out real scans; transposed copies (axes
swapped) and the slice-order mirrors add little more.
"""

from __future__ import annotations

import numpy as np

from ..shm import sh_basis_matrix
from .field_config import SYMMETRY_COUNTS, FieldConfig, check_symmetry_count

__all__ = [
    "SYMMETRIES",
    "SYMMETRY_COUNTS",
    "check_symmetry_count",
    "condition_matrix",
    "direction_matrix",
    "map_plane",
    "mirror_example",
    "sh_symmetry_matrix",
]

#: (reverse the rows, reverse the columns, reverse the context slices), in the order used.
SYMMETRIES: tuple[tuple[bool, bool, bool], ...] = (
    (False, False, False),
    (True, False, False),
    (False, True, False),
    (True, True, False),
    (False, False, True),
    (True, False, True),
    (False, True, True),
    (True, True, True),
)
#: Directions used to fit the coefficient maps (their exact value does not matter).
_FIT_DIRECTIONS = 200


def direction_matrix(index: int) -> np.ndarray:
    """Return the map of directions (model frame: rows, columns, slice axis) of a symmetry.

    Parameters
    ----------
    index : int
        Position in `SYMMETRIES`.

    Returns
    -------
    ndarray, shape (3, 3)
        Diagonal ``T``: ``T @ g`` is the direction, in the mirrored slice, of direction ``g``
        (rows reversed negate the first component, columns the second, context slices the
        third).

    """
    return np.diag([-1.0 if flip else 1.0 for flip in SYMMETRIES[index]])


def sh_symmetry_matrix(transform: np.ndarray, order: int) -> np.ndarray:
    """Return the map of SH coefficients (``descoteaux07``) under a map of directions.

    Parameters
    ----------
    transform : ndarray, shape (3, 3)
        Orthogonal map ``T`` of directions.
    order : int
        Even maximal SH order.

    Returns
    -------
    ndarray, shape (C, C)
        ``R`` such that the function ``g -> f(T^-1 g)`` has coefficients ``R @ c`` when ``f``
        has ``c``. It is block-diagonal in the order, so it commutes with any per-order
        scaling (the model space of `field_features.coefficient_scales`).

    """
    from ..sim.protocol import uniform_shell

    directions = uniform_shell(_FIT_DIRECTIONS, seed=0)
    basis, _ = sh_basis_matrix(directions, order)
    mapped, _ = sh_basis_matrix(directions @ np.linalg.inv(transform).T, order)
    r, *_ = np.linalg.lstsq(basis, mapped, rcond=None)
    return r


def condition_matrix(config: FieldConfig, index: int) -> np.ndarray:
    """Return the map of the condition's channels (`field_features.slice_condition`).

    Parameters
    ----------
    config : FieldConfig
        The model configuration.
    index : int
        Position in `SYMMETRIES`.

    Returns
    -------
    ndarray, shape (condition_channels, condition_channels)
        Block-diagonal: `sh_symmetry_matrix` on every block of coefficients of every context
        slice, the identity on S0, the mask and the scalar maps (which do not depend on
        directions).

    """
    t = direction_matrix(index)
    full = sh_symmetry_matrix(t, config.sh_order)
    first = sh_symmetry_matrix(t, 2) if config.prior == "sh" else full
    out = np.eye(config.condition_channels)
    per_slice = config.features_per_slice
    n_context = 2 * config.context_slices + 1
    if SYMMETRIES[index][2]:  # reversed context: slice j's features come from 2c - j
        stacked = n_context * per_slice
        order = np.arange(config.condition_channels)
        order[:stacked] = order[:stacked].reshape(n_context, per_slice)[::-1].ravel()
        out = out[order]
    for j in range(n_context):
        at = j * per_slice
        for block in (first, full):
            n = block.shape[0]
            out[at : at + n] = block @ out[at : at + n]
            at += n
    return out


def map_plane(array, index: int):
    """Reverse the in-plane axes (the last two) of an array or tensor as a symmetry does.

    Every symmetry is its own inverse, so this also maps a prediction back.

    Parameters
    ----------
    array : ndarray or torch.Tensor, shape (..., H, W)
        Images with the slice plane last.
    index : int
        Position in `SYMMETRIES`.

    Returns
    -------
    Same type and shape as `array`.

    """
    axes = [a for a, on in zip((-2, -1), SYMMETRIES[index][:2], strict=True) if on]
    if not axes:
        return array
    return np.flip(array, axes) if isinstance(array, np.ndarray) else array.flip(axes)


def mirror_example(example: dict, index: int, config: FieldConfig) -> dict:
    """Mirror one training example (`field_data.make_field_example` or `make_real_example`).

    The slice, its context and every directional quantity are mirrored together, so the
    example stays a valid one: a simulated example's target coefficients and a real example's
    evaluation rows (the hidden directions) are mapped with the condition.

    Parameters
    ----------
    example : dict
        ``condition`` (Cc, H, W), ``mask`` (H, W), and ``target`` (C, H, W) for simulated
        examples or ``real_target`` (n, H, W) and ``real_eval`` (n, C) for real ones; other
        keys are kept as they are.
    index : int
        Position in `SYMMETRIES`.
    config : FieldConfig
        The model configuration.

    Returns
    -------
    dict
        A new example (``meta`` gains ``"mirror": index``).

    """
    out = dict(example)
    out["condition"] = np.ascontiguousarray(
        map_plane(
            np.einsum("dc,chw->dhw", condition_matrix(config, index), example["condition"]), index
        ),  # fmt: skip
        dtype=np.float32,
    )
    out["mask"] = np.ascontiguousarray(map_plane(example["mask"], index))
    r = sh_symmetry_matrix(direction_matrix(index), config.sh_order)
    if "target" in example:
        mirrored = np.einsum("dc,chw->dhw", r, example["target"])
        out["target"] = np.ascontiguousarray(map_plane(mirrored, index), dtype=np.float32)
    if "real_target" in example:  # the hidden signals move with the slice; E c = (E R^-1)(R c)
        out["real_target"] = np.ascontiguousarray(map_plane(example["real_target"], index))
        out["real_eval"] = (example["real_eval"] @ np.linalg.inv(r)).astype(np.float32)
    out["meta"] = {**example.get("meta", {}), "mirror": int(index)}
    return out
