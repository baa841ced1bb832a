"""Checks of a DWI run's image data and shells, made before anything is written.

`check_dwi_data` reads the image to the end (a truncated or corrupt ``.nii.gz`` fails here, with
the file named, rather than in a workflow step) and refuses data that cannot give a meaningful
result: non-finite voxels, an all-zero image, constant volumes. `usable_shells` drops shells
with fewer than `MIN_SHELL_DIRECTIONS` distinct directions (antipodally, `DUPLICATE_DEG`
apart): such a shell cannot be fitted, so it is left as acquired, with a warning.

Decisions (docs/outputs.md, "Bad input"): non-finite values are refused rather than masked, because
they usually mean a broken conversion upstream; the message says how many voxels and which
volumes, and how to replace them.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .errors import InputError

#: Fewest distinct directions a shell needs to be up-sampled (a tensor has 6 unknowns).
MIN_SHELL_DIRECTIONS = 6
#: Directions closer than this (degrees, antipodally) count as the same direction.
DUPLICATE_DEG = 5.0


def _volumes_text(volumes: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in volumes[:limit])
    return shown + (f", ... ({len(volumes)} in all)" if len(volumes) > limit else "")


def read_dwi_data(path: str | Path, img) -> np.ndarray:
    """Read a DWI image to the end, turning decompression and read errors into one line.

    Parameters
    ----------
    path : str or Path
        The file (for the message).
    img : nibabel image
        Its loaded header.

    Returns
    -------
    ndarray, float32

    Raises
    ------
    InputError
        When the data cannot be read to the end (truncated, corrupt gzip stream, I/O error).

    """
    try:
        return np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, zlib.error, OSError, ValueError) as err:
        reason = str(err) or type(err).__name__
        raise InputError(
            path,
            f"cannot be read to the end ({reason}): the file is truncated or corrupt; copy or "
            "convert it again",
        ) from None


def check_dwi_data(path: str | Path, data: np.ndarray, bvals: np.ndarray) -> None:
    """Refuse image data that qid2 cannot process meaningfully.

    Parameters
    ----------
    path : str or Path
        The DWI file (named in the message).
    data : ndarray, shape (X, Y, Z, V)
        Its data.
    bvals : ndarray, shape (V,)
        b-values (to name b=0 volumes in messages).

    Raises
    ------
    InputError
        Non-finite voxels (how many, in which volumes), an all-zero image, or constant volumes.

    """
    finite = np.isfinite(data)
    if not finite.all():
        bad_voxels = int(np.count_nonzero(~finite.all(axis=-1)))
        volumes = np.flatnonzero(~finite.reshape(-1, data.shape[-1]).all(axis=0))
        raise InputError(
            path,
            f"has NaN or infinite values in {bad_voxels} voxel(s), in volume(s) "
            f"{_volumes_text(volumes)} (0-based); replace them, e.g. with 0 "
            "(fslmaths in -nan out), and rerun",
        )
    if not np.any(data):
        raise InputError(path, "is all zeros: there is no signal to up-sample")
    flat = data.reshape(-1, data.shape[-1])
    constant = np.flatnonzero(flat.max(axis=0) == flat.min(axis=0))
    if constant.size:
        kinds = "b=0 " if np.all(np.asarray(bvals)[constant] <= 50) else ""
        raise InputError(
            path,
            f"has constant {kinds}volume(s) {_volumes_text(constant)} (0-based; every voxel "
            "the same value): a failed conversion or an empty volume; remove them and their "
            ".bval/.bvec entries",
        )


def distinct_directions(bvecs: np.ndarray, tolerance_deg: float = DUPLICATE_DEG) -> int:
    """Count directions that are at least `tolerance_deg` apart (antipodally).

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        Unit directions.
    tolerance_deg : float
        Directions closer than this are the same.

    Returns
    -------
    int

    """
    vectors = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3)
    limit = np.cos(np.deg2rad(tolerance_deg))
    kept: list[np.ndarray] = []
    for v in vectors:
        if not kept or np.max(np.abs(np.asarray(kept) @ v)) < limit:
            kept.append(v)
    return len(kept)


def usable_shells(table, shells: list[int]) -> tuple[list[int], list[str]]:
    """Drop shells that cannot be up-sampled; say why.

    Parameters
    ----------
    table : GradientTable
        The run's gradients.
    shells : list of int
        Candidate shells (keys of ``table.shells``).

    Returns
    -------
    kept : list of int
    reasons : list of str
        One sentence per dropped shell.

    """
    kept, reasons = [], []
    for shell in shells:
        indices = table.shells[shell]
        n = distinct_directions(table.bvecs[indices])
        if n >= MIN_SHELL_DIRECTIONS:
            kept.append(shell)
            continue
        same = f" ({len(indices)} volumes)" if n < len(indices) else ""
        reasons.append(
            f"the b={shell} shell has {n} distinct direction(s){same}; at least "
            f"{MIN_SHELL_DIRECTIONS} are needed to up-sample it, so it is kept as acquired"
        )
    return kept, reasons
