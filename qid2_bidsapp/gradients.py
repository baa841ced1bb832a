"""Gradient tables: reading, validating, converting and choosing directions.

All functions work on plain numpy arrays. A `GradientTable` holds b-values and b-vectors in FSL
image-axis convention; volume indices (also in error messages) are 0-based. Every validation
problem raises `~qid2_bidsapp.errors.GradientError` naming the offending file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GradientError

_LOGGER = logging.getLogger("qid2")

PathLike = str | os.PathLike

B0_THRESHOLD = 50.0
SHELL_TOLERANCE = 100.0
NORM_TOLERANCE = 0.1


def antipodal_angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Antipodally symmetric angles between two sets of directions.

    Parameters
    ----------
    a : ndarray, shape (M, 3)
        Unit directions.
    b : ndarray, shape (N, 3)
        Unit directions.

    Returns
    -------
    ndarray, shape (M, N)
        ``degrees(arccos(clip(|a . b|, 0, 1)))``; ``d`` and ``-d`` are the same direction.

    """
    a = np.asarray(a, dtype=float).reshape(-1, 3)
    b = np.asarray(b, dtype=float).reshape(-1, 3)
    return np.degrees(np.arccos(np.clip(np.abs(a @ b.T), 0.0, 1.0)))


def nearest_directions(
    targets: np.ndarray, references: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each target, the k closest references by antipodally symmetric angle.

    The angle is ``arccos(|t . r|)``, so a reference ``r`` and ``-r`` are equivalent.

    Parameters
    ----------
    targets : ndarray, shape (M, 3)
        Unit target directions.
    references : ndarray, shape (N, 3)
        Unit reference directions.
    k : int
        Number of neighbours, ``1 <= k <= N``.

    Returns
    -------
    indices : ndarray of int, shape (M, k)
        Indices into `references`, sorted by increasing angle (ties by index).
    angles_deg : ndarray of float, shape (M, k)
        The corresponding angles in degrees.

    """
    angles = antipodal_angles_deg(targets, references)
    n_ref = angles.shape[1]
    if not 1 <= k <= n_ref:
        raise ValueError(f"k must be between 1 and {n_ref} (the number of references), got {k}")
    indices = np.argsort(angles, axis=1, kind="stable")[:, :k]
    return indices.astype(np.intp), np.take_along_axis(angles, indices, axis=1)


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True, eq=False)
class GradientTable:
    """A validated diffusion gradient table in FSL image-axis convention.

    Parameters
    ----------
    bvals : ndarray, shape (N,)
        b-values (s/mm²), float64.
    bvecs : ndarray, shape (N, 3)
        Directions in FSL image-axis convention: unit vectors for diffusion-weighted volumes,
        zeros for b=0 volumes.
    b0_threshold : float
        Volumes with ``b <= b0_threshold`` are b=0 volumes.
    shell_tolerance : float
        Largest gap between sorted b-values inside one shell (see `group_shells`).

    Notes
    -----
    The arrays are stored as read-only float64 copies; volume indices everywhere are 0-based.

    """

    bvals: np.ndarray
    bvecs: np.ndarray
    b0_threshold: float = B0_THRESHOLD
    shell_tolerance: float = SHELL_TOLERANCE

    def __post_init__(self) -> None:
        bvals = np.array(self.bvals, dtype=np.float64).reshape(-1)
        bvecs = np.array(self.bvecs, dtype=np.float64)
        if bvecs.shape != (bvals.size, 3):
            raise ValueError(f"bvecs must have shape ({bvals.size}, 3), got {bvecs.shape}")
        for name, value in (("bvals", bvals), ("bvecs", bvecs)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @property
    def n_volumes(self) -> int:
        """Number of volumes."""
        return int(self.bvals.size)

    @property
    def b0_mask(self) -> np.ndarray:
        """Boolean mask of the b=0 volumes (``bvals <= b0_threshold``)."""
        return self.bvals <= self.b0_threshold

    def shell_of(self) -> np.ndarray:
        """Per-volume shell label (rounded b-value, int), 0 for b=0 volumes."""
        return group_shells(
            self.bvals, b0_threshold=self.b0_threshold, tolerance=self.shell_tolerance
        )

    @property
    def shells(self) -> dict[int, np.ndarray]:
        """Map each shell's rounded b-value to the indices of its volumes (b=0 excluded)."""
        labels = self.shell_of()
        return {int(b): np.flatnonzero(labels == b) for b in np.unique(labels[labels > 0])}


def group_shells(
    bvals: np.ndarray,
    *,
    b0_threshold: float = B0_THRESHOLD,
    tolerance: float = SHELL_TOLERANCE,
) -> np.ndarray:
    """Cluster b-values into shells.

    Non-b=0 values are sorted; a new shell starts wherever the gap to the previous value exceeds
    `tolerance`. So 995, 1000 and 1005 form one shell, 1000 and 2000 two.

    Parameters
    ----------
    bvals : ndarray, shape (N,)
        b-values.
    b0_threshold : float
        Values ``<= b0_threshold`` are b=0 volumes (label 0).
    tolerance : float
        Largest gap between consecutive sorted b-values within one shell.

    Returns
    -------
    ndarray of int64, shape (N,)
        Per-volume shell label: the median of the shell's b-values rounded to the nearest
        integer, 0 for b=0 volumes.

    """
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1)
    labels = np.zeros(bvals.size, dtype=np.int64)
    dw = np.flatnonzero(bvals > b0_threshold)
    if dw.size == 0:
        return labels
    order = dw[np.argsort(bvals[dw], kind="stable")]
    cluster_ids = np.concatenate([[0], np.cumsum(np.diff(bvals[order]) > tolerance)])
    for cluster in np.unique(cluster_ids):
        members = order[cluster_ids == cluster]
        labels[members] = int(np.floor(np.median(bvals[members]) + 0.5))
    return labels


# --------------------------------------------------------------------------- reading


def _read_matrix(path: PathLike) -> np.ndarray:
    """Read a whitespace-separated numeric text file as a 2-D float array ('#' starts a comment)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise GradientError(path, f"cannot be read ({reason})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split("#", 1)[0].replace(",", " ").split()
        if not tokens:
            continue
        try:
            rows.append([float(token) for token in tokens])
        except ValueError:
            raise GradientError(path, f"is not numeric (line {lineno}: {line.strip()!r})") from None
    if not rows:
        raise GradientError(path, "is empty")
    if len({len(row) for row in rows}) > 1:
        raise GradientError(path, "has rows of different lengths")
    return np.array(rows, dtype=np.float64)


def _check_count(path: PathLike, count: int, what: str, n_volumes: int | None) -> None:
    if n_volumes is not None and count != n_volumes:
        raise GradientError(path, f"has {count} {what} but the image has {n_volumes} volumes")


def _check_finite(path: PathLike, values: np.ndarray) -> None:
    """Raise on NaN/inf; `values` has one row per volume."""
    bad = ~np.isfinite(values.reshape(values.shape[0], -1))
    if bad.any():
        volume, column = np.argwhere(bad)[0]
        value = values.reshape(values.shape[0], -1)[volume, column]
        name = "NaN" if np.isnan(value) else f"{value:g}"
        raise GradientError(path, f"contains a non-finite value ({name}) at volume {volume}")


def _check_bvals(path: PathLike, bvals: np.ndarray) -> None:
    _check_finite(path, bvals)
    negative = np.flatnonzero(bvals < 0)
    if negative.size:
        i = negative[0]
        raise GradientError(path, f"has a negative b-value ({bvals[i]:g}) at volume {i}")


def _build_table(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    bval_path: PathLike,
    bvec_path: PathLike,
    b0_threshold: float,
    shell_tolerance: float,
    norm_tolerance: float,
    out_of_step_hint: str,
) -> GradientTable:
    """Check b=0 volumes and vector norms (counts, finiteness and signs already checked)."""
    b0 = bvals <= b0_threshold
    if not b0.any():
        raise GradientError(bval_path, f"has no b=0 volume (b <= {b0_threshold:g})")
    norms = np.linalg.norm(bvecs, axis=1)
    stray = np.flatnonzero((bvals == 0) & (norms > 0.1))
    if stray.size:
        i = stray[0]
        vector = ", ".join(f"{v:.3f}" for v in bvecs[i])
        raise GradientError(
            bvec_path,
            f"b=0 volume {i} has a non-zero b-vector ({vector}): {out_of_step_hint}",
        )
    off_unit = np.flatnonzero(~b0 & (np.abs(norms - 1.0) > norm_tolerance))
    if off_unit.size:
        i = off_unit[0]
        raise GradientError(
            bvec_path,
            f"diffusion-weighted volume {i} (b={bvals[i]:g}) has a b-vector of norm "
            f"{norms[i]:.3f}, not a unit vector (tolerance {norm_tolerance:g})",
        )
    unit = np.where(b0[:, None], 0.0, bvecs / np.where(b0, 1.0, norms)[:, None])
    return GradientTable(bvals, unit, b0_threshold, shell_tolerance)


def read_fsl_gradients(
    bval_path: PathLike,
    bvec_path: PathLike,
    n_volumes: int | None = None,
    *,
    b0_threshold: float = B0_THRESHOLD,
    shell_tolerance: float = SHELL_TOLERANCE,
    norm_tolerance: float = NORM_TOLERANCE,
) -> GradientTable:
    """Read and validate an FSL ``.bval``/``.bvec`` pair.

    Parameters
    ----------
    bval_path, bvec_path : str or PathLike
        The ``.bval`` file (one row, or one column, of b-values) and the ``.bvec`` file
        (3 rows, one column per volume, image-axis convention).
    n_volumes : int, optional
        The number of volumes of the image (its 4th dimension), checked when given.
    b0_threshold : float
        Volumes with ``b <= b0_threshold`` are b=0 volumes; their vectors are set to zero.
    shell_tolerance : float
        See `group_shells`.
    norm_tolerance : float
        Diffusion-weighted vectors with ``|norm - 1| <= norm_tolerance`` are normalised
        silently; larger deviations are an error.

    Returns
    -------
    GradientTable

    Raises
    ------
    GradientError
        For an unreadable or non-numeric file, a wrong shape (a transposed ``.bvec`` is read,
        with a warning in the log, when its row count matches the b-values), a count that
        differs from the other file or from `n_volumes`, NaN or inf, negative b-values, no b=0
        volume, a non-zero vector at ``b == 0``, or a diffusion-weighted vector that is not a
        unit vector.

    """
    bvals = _read_matrix(bval_path)
    if min(bvals.shape) != 1:
        raise GradientError(
            bval_path,
            f"should hold one row of b-values, found {bvals.shape[0]} rows × "
            f"{bvals.shape[1]} columns",
        )
    bvals = bvals.reshape(-1)
    bvecs = _read_matrix(bvec_path)
    if bvecs.shape[0] != 3:
        if bvecs.shape[1] == 3 and bvecs.shape[0] == bvals.size:
            # N rows x 3 columns, N = the b-value count: unambiguous (DIPY and MRtrix read it)
            _LOGGER.warning(
                "%s: transposed (%d rows x 3 columns; FSL .bvec files have 3 rows): read as "
                "one row per volume",
                bvec_path,
                bvecs.shape[0],
            )
            bvecs = bvecs.T
        elif bvecs.shape[1] == 3:
            raise GradientError(
                bvec_path,
                f"appears transposed: {bvecs.shape[0]} rows × 3 columns, but "
                f"{Path(bval_path).name} has {bvals.size} b-values; FSL .bvec files have 3 "
                "rows, one column per volume",
            )
        else:
            raise GradientError(
                bvec_path, f"should have 3 rows (x, y, z), found {bvecs.shape[0]} rows"
            )
    bvecs = bvecs.T
    _check_count(bval_path, bvals.size, "b-values", n_volumes)
    _check_count(bvec_path, len(bvecs), "columns (one per volume)", n_volumes)
    if len(bvecs) != bvals.size:
        raise GradientError(
            bvec_path,
            f"has {len(bvecs)} columns but {Path(bval_path).name} has {bvals.size} b-values",
        )
    _check_bvals(bval_path, bvals)
    _check_finite(bvec_path, bvecs)
    return _build_table(
        bvals,
        bvecs,
        bval_path=bval_path,
        bvec_path=bvec_path,
        b0_threshold=b0_threshold,
        shell_tolerance=shell_tolerance,
        norm_tolerance=norm_tolerance,
        out_of_step_hint="are .bval and .bvec out of step?",
    )


def read_mrtrix_gradients(
    b_path: PathLike,
    affine: np.ndarray,
    n_volumes: int | None = None,
    *,
    b0_threshold: float = B0_THRESHOLD,
    shell_tolerance: float = SHELL_TOLERANCE,
    norm_tolerance: float = NORM_TOLERANCE,
) -> GradientTable:
    """Read and validate an MRtrix3 ``.b`` file and convert it to FSL convention.

    Parameters
    ----------
    b_path : str or PathLike
        The ``.b`` file: one row per volume, ``gx gy gz b`` in scanner (world, RAS) coordinates.
    affine : ndarray, shape (4, 4)
        The image's voxel-to-world affine (see `mrtrix_to_fsl`).
    n_volumes : int, optional
        The number of volumes of the image, checked when given.
    b0_threshold, shell_tolerance, norm_tolerance : float
        As in `read_fsl_gradients`.

    Returns
    -------
    GradientTable
        In FSL image-axis convention.

    Raises
    ------
    GradientError
        For the same problems as `read_fsl_gradients` (a ``.b`` file must have 4 columns).

    """
    table = _read_matrix(b_path)
    if table.shape[1] != 4:
        if table.shape[0] == 4:
            raise GradientError(
                b_path,
                f"appears transposed: 4 rows × {table.shape[1]} columns; MRtrix .b files have "
                "one row (gx gy gz b) per volume",
            )
        raise GradientError(
            b_path, f"should have 4 columns (gx gy gz b), found {table.shape[1]} columns"
        )
    _check_count(b_path, len(table), "rows (one per volume)", n_volumes)
    _check_finite(b_path, table)
    _check_bvals(b_path, table[:, 3])
    bvals, bvecs = mrtrix_to_fsl(table, affine)
    return _build_table(
        bvals,
        bvecs,
        bval_path=b_path,
        bvec_path=b_path,
        b0_threshold=b0_threshold,
        shell_tolerance=shell_tolerance,
        norm_tolerance=norm_tolerance,
        out_of_step_hint="are the b-values and directions out of step?",
    )


# --------------------------------------------------------------------------- conversion


def _voxel_axes(affine: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return the orthogonal factor of the affine's linear part and whether det > 0.

    The linear part is normalised by the voxel sizes (column norms) and its orthogonal polar
    factor (nearest orthogonal matrix, determinant ±1) is taken, which removes any shear.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    scaled = linear / np.linalg.norm(linear, axis=0)
    u, _, vt = np.linalg.svd(scaled)
    return u @ vt, bool(np.linalg.det(linear) > 0)


def mrtrix_to_fsl(b_table: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Convert an MRtrix3 gradient table (world coordinates) to FSL bvals/bvecs.

    Parameters
    ----------
    b_table : ndarray, shape (N, 4)
        Rows ``gx gy gz b`` in scanner (world, RAS) coordinates.
    affine : ndarray, shape (4, 4)
        The image's voxel-to-world affine.

    Returns
    -------
    bvals : ndarray, shape (N,)
    bvecs : ndarray, shape (N, 3)
        Directions along the image axes, with x flipped when ``det(affine[:3, :3]) > 0``
        (FSL's convention, as in MRtrix3's ``-export_grad_fsl``).

    """
    b_table = np.asarray(b_table, dtype=np.float64).reshape(-1, 4)
    rotation, flip_x = _voxel_axes(affine)
    bvecs = b_table[:, :3] @ rotation  # rotation.T @ g for each row
    if flip_x:
        bvecs[:, 0] *= -1.0
    return b_table[:, 3].copy(), bvecs


def fsl_to_mrtrix(bvals: np.ndarray, bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Convert FSL bvals/bvecs to an MRtrix3 gradient table; the inverse of `mrtrix_to_fsl`.

    Parameters
    ----------
    bvals : ndarray, shape (N,)
        b-values.
    bvecs : ndarray, shape (N, 3)
        Directions in FSL image-axis convention.
    affine : ndarray, shape (4, 4)
        The image's voxel-to-world affine.

    Returns
    -------
    ndarray, shape (N, 4)
        Rows ``gx gy gz b`` in scanner (world, RAS) coordinates.

    """
    vectors = np.array(bvecs, dtype=np.float64).reshape(-1, 3)
    rotation, flip_x = _voxel_axes(affine)
    if flip_x:
        vectors[:, 0] *= -1.0
    bvals = np.asarray(bvals, dtype=np.float64).reshape(-1, 1)
    return np.hstack([vectors @ rotation.T, bvals])


# --------------------------------------------------------------------------- writing


def _format_number(value: float) -> str:
    value = float(value)
    if value.is_integer():
        return str(int(value))
    return np.format_float_positional(value, trim="-")


def _clean_zeros(values: np.ndarray) -> np.ndarray:
    """Replace values that would print as ``-0.000000`` by 0."""
    return np.where(np.abs(values) < 5e-7, 0.0, values)


def write_fsl_gradients(table: GradientTable, bval_path: PathLike, bvec_path: PathLike) -> None:
    """Write a table as FSL files: one row of b-values and 3 rows of vectors (``%.6f``).

    Parameters
    ----------
    table : GradientTable
        The table to write.
    bval_path, bvec_path : str or PathLike
        Destination files (overwritten).

    """
    Path(bval_path).write_text(" ".join(_format_number(b) for b in table.bvals) + "\n")
    rows = (" ".join(f"{v:.6f}" for v in row) for row in _clean_zeros(table.bvecs.T))
    Path(bvec_path).write_text("\n".join(rows) + "\n")


def write_mrtrix_gradients(table: GradientTable, affine: np.ndarray, b_path: PathLike) -> None:
    """Write a table as an MRtrix3 ``.b`` file (world coordinates, one row per volume).

    Parameters
    ----------
    table : GradientTable
        The table to write.
    affine : ndarray, shape (4, 4)
        The image's voxel-to-world affine.
    b_path : str or PathLike
        Destination file (overwritten).

    """
    b_table = fsl_to_mrtrix(table.bvals, table.bvecs, affine)
    vectors = _clean_zeros(b_table[:, :3])
    lines = (
        " ".join(f"{v:.6f}" for v in vec) + " " + _format_number(b)
        for vec, b in zip(vectors, b_table[:, 3], strict=True)
    )
    Path(b_path).write_text("\n".join(lines) + "\n")


def check_gradient_agreement(
    table_a: GradientTable,
    table_b: GradientTable,
    path: PathLike,
    *,
    max_angle_deg: float = 5.0,
) -> None:
    """Check that two tables of one image (e.g. from ``.bvec`` and ``.b``) agree.

    Parameters
    ----------
    table_a, table_b : GradientTable
        The two tables, both in FSL convention.
    path : str or PathLike
        The file named in the error (typically the ``.b`` file).
    max_angle_deg : float
        Largest accepted antipodally symmetric angle between corresponding directions.

    Raises
    ------
    GradientError
        When the volume counts differ, a b-value differs by more than the shell tolerance of
        `table_a`, a volume is b=0 in one table only, or a direction differs by more than
        `max_angle_deg`.

    """
    if table_a.n_volumes != table_b.n_volumes:
        raise GradientError(
            path,
            f"has {table_b.n_volumes} volumes but the other gradient table has {table_a.n_volumes}",
        )
    b_diff = np.abs(table_a.bvals - table_b.bvals) > table_a.shell_tolerance
    bad = np.flatnonzero(b_diff | (table_a.b0_mask != table_b.b0_mask))
    if bad.size:
        i = bad[0]
        raise GradientError(
            path,
            f"disagrees with the other gradient table: volume {i} has b={table_b.bvals[i]:g} "
            f"here but b={table_a.bvals[i]:g} there",
        )
    dw = ~table_a.b0_mask
    cosines = np.abs(np.sum(table_a.bvecs[dw] * table_b.bvecs[dw], axis=1))
    angles = np.degrees(np.arccos(np.clip(cosines, 0.0, 1.0)))
    bad = np.flatnonzero(angles > max_angle_deg)
    if bad.size:
        i = np.flatnonzero(dw)[bad[0]]
        raise GradientError(
            path,
            f"disagrees with the other gradient table: the direction of volume {i} differs by "
            f"{angles[bad[0]]:.1f} degrees (more than {max_angle_deg:g})",
        )


# --------------------------------------------------------------------------- directions


def _normalise_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _repulsion(moving: np.ndarray, fixed: np.ndarray) -> tuple[float, np.ndarray]:
    """Energy and tangential gradient of the antipodal Coulomb energy for the moving points.

    Each direction ``d`` is a charge pair ``±d``; the energy sums ``1/|x-y| + 1/|x+y|`` over
    pairs of distinct directions with at least one moving point.
    """
    m = len(moving)
    others = np.vstack([moving, fixed])
    cos = np.clip(moving @ others.T, -1.0 + 1e-12, 1.0 - 1e-12)
    dist_minus = np.sqrt(2.0 - 2.0 * cos)
    dist_plus = np.sqrt(2.0 + 2.0 * cos)
    pair_energy = 1.0 / dist_minus + 1.0 / dist_plus
    weights = dist_minus**-3 - dist_plus**-3
    self_pairs = (np.arange(m), np.arange(m))
    pair_energy[self_pairs] = 0.0
    weights[self_pairs] = 0.0
    energy = 0.5 * pair_energy[:, :m].sum() + pair_energy[:, m:].sum()
    gradient = weights @ others  # radial components drop out in the projection below
    gradient -= np.sum(gradient * moving, axis=1, keepdims=True) * moving
    return float(energy), gradient


def _canonical_hemisphere(vectors: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """Flip vectors to z > 0 (ties: y > 0, then x > 0)."""
    x, y, z = vectors.T
    flip = (z < -eps) | ((np.abs(z) <= eps) & ((y < -eps) | ((np.abs(y) <= eps) & (x < 0))))
    return np.where(flip[:, None], -vectors, vectors)


def select_target_directions(
    acquired: np.ndarray,
    n_targets: int,
    *,
    seed: int = 0,
    n_iter: int = 500,
) -> np.ndarray:
    """Choose new directions that fill the sphere around the acquired ones.

    The new directions minimise an antipodally symmetric electrostatic energy with the acquired
    directions held fixed, by projected gradient descent on the sphere with an adaptive step
    (grown after an accepted step, halved after a rejected one, so the energy never increases).

    Parameters
    ----------
    acquired : ndarray, shape (N, 3)
        Acquired (fixed) directions; normalised here, N may be 0.
    n_targets : int
        Number of new directions.
    seed : int
        Seed of the random initialisation; the result is deterministic for a seed.
    n_iter : int
        Maximum number of descent iterations.

    Returns
    -------
    ndarray, shape (n_targets, 3)
        Unit directions, each flipped to the hemisphere z > 0 (ties broken on y, then x).

    """
    if n_targets < 0:
        raise ValueError(f"n_targets must be >= 0, got {n_targets}")
    fixed = _normalise_rows(acquired) if np.size(acquired) else np.empty((0, 3))
    if n_targets == 0:
        return np.empty((0, 3))
    moving = _normalise_rows(np.random.default_rng(seed).standard_normal((n_targets, 3)))
    energy, gradient = _repulsion(moving, fixed)
    step = 0.1  # largest angular move of any point in one iteration (radians)
    for _ in range(n_iter):
        largest = np.linalg.norm(gradient, axis=1).max()
        if largest == 0.0 or step < 1e-7:
            break
        trial = _normalise_rows(moving - (step / largest) * gradient)
        trial_energy, trial_gradient = _repulsion(trial, fixed)
        if trial_energy < energy:
            moving, energy, gradient = trial, trial_energy, trial_gradient
            step = min(step * 1.2, 0.3)
        else:
            step *= 0.5
    return _canonical_hemisphere(moving)


def fibonacci_sphere(n: int) -> np.ndarray:
    """Return ``n`` quasi-uniform unit vectors on the sphere (Fibonacci lattice), deterministic.

    Parameters
    ----------
    n : int
        Number of points.

    Returns
    -------
    ndarray, shape (n, 3)

    """
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    r = np.sqrt(1.0 - z**2)
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def largest_angular_gap_deg(directions: np.ndarray, *, n_grid: int = 4000) -> float:
    """Covering radius of a direction set: how far any direction is from the nearest sample.

    Parameters
    ----------
    directions : ndarray, shape (N, 3)
        Sampled directions (normalised here).
    n_grid : int
        Size of the Fibonacci-lattice grid the maximum is taken over.

    Returns
    -------
    float
        Max over the grid of the antipodally symmetric angle (degrees) to the nearest direction;
        90 for an empty set.

    """
    if np.size(directions) == 0:
        return 90.0
    angles = antipodal_angles_deg(fibonacci_sphere(n_grid), _normalise_rows(directions))
    return float(angles.min(axis=1).max())


def load_target_bvecs(path: PathLike) -> np.ndarray:
    """Read user-provided target directions.

    Parameters
    ----------
    path : str or PathLike
        Text file of 3 rows × M columns (FSL style) or M rows × 3 columns; a 3 × 3 file is read
        as 3 × M.

    Returns
    -------
    ndarray, shape (M, 3)
        Unit directions.

    Raises
    ------
    GradientError
        For an unreadable or non-numeric file, a shape with neither dimension 3, or a zero,
        NaN or inf vector.

    """
    values = _read_matrix(path)
    if values.shape[0] == 3:
        vectors = values.T
    elif values.shape[1] == 3:
        vectors = values
    else:
        raise GradientError(
            path,
            f"should hold 3 rows or 3 columns of directions, found {values.shape[0]} rows × "
            f"{values.shape[1]} columns",
        )
    _check_finite(path, vectors)
    norms = np.linalg.norm(vectors, axis=1)
    zero = np.flatnonzero(norms < 1e-6)
    if zero.size:
        raise GradientError(path, f"direction {zero[0]} is a zero vector")
    return vectors / norms[:, None]
