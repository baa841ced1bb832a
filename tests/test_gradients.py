"""Tests of qid2_bidsapp.gradients (fast; real files written to tmp_path)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from qid2_bidsapp.errors import GradientError
from qid2_bidsapp.gradients import (
    GradientTable,
    antipodal_angles_deg,
    check_gradient_agreement,
    fibonacci_sphere,
    fsl_to_mrtrix,
    group_shells,
    largest_angular_gap_deg,
    load_target_bvecs,
    mrtrix_to_fsl,
    nearest_directions,
    read_fsl_gradients,
    read_mrtrix_gradients,
    select_target_directions,
    write_fsl_gradients,
    write_mrtrix_gradients,
)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bids-real"


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_gradients(n_dw: int = 12, bval: float = 1000.0, seed: int = 0):
    """One b=0 volume then `n_dw` unit directions, as (bvals, bvecs (N, 3))."""
    bvals = np.r_[0.0, np.full(n_dw, bval)]
    bvecs = np.vstack([np.zeros(3), unit_vectors(n_dw, seed)])
    return bvals, bvecs


def write_fsl(tmp_path: Path, bvals, bvecs, *, transpose: bool = False, bval_text=None):
    bval_path, bvec_path = tmp_path / "sub-01_dwi.bval", tmp_path / "sub-01_dwi.bvec"
    bval_path.write_text(bval_text if bval_text is not None else " ".join(map(str, bvals)))
    vectors = np.asarray(bvecs) if transpose else np.asarray(bvecs).T
    np.savetxt(bvec_path, vectors, fmt="%.8f")
    return bval_path, bvec_path


def random_affine(seed: int, flip: bool) -> np.ndarray:
    """Oblique affine with anisotropic voxels; `flip` makes det < 0."""
    rotation = Rotation.random(random_state=seed).as_matrix()
    zooms = np.diag([1.5, 2.0, 2.5]) @ np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ zooms
    affine[:3, 3] = [-90.0, -120.0, -60.0]
    return affine


# --------------------------------------------------------------------------- FSL files


def test_fsl_round_trip(tmp_path):
    bvals, bvecs = make_gradients()
    bvals[3] = 1005.5
    table = read_fsl_gradients(*write_fsl(tmp_path, bvals, bvecs), n_volumes=13)
    assert table.n_volumes == 13
    assert table.bvals.dtype == np.float64 and table.bvecs.shape == (13, 3)
    out = tmp_path / "out"
    out.mkdir()
    write_fsl_gradients(table, out / "a.bval", out / "a.bvec")
    assert (out / "a.bval").read_text().split()[:4] == ["0", "1000", "1000", "1005.5"]
    assert len((out / "a.bvec").read_text().splitlines()) == 3
    again = read_fsl_gradients(out / "a.bval", out / "a.bvec", 13)
    np.testing.assert_array_equal(again.bvals, table.bvals)
    np.testing.assert_allclose(again.bvecs, table.bvecs, atol=1e-6)
    with pytest.raises(AttributeError):
        table.bvals = np.zeros(13)  # frozen


def test_bval_single_column_accepted(tmp_path):
    bvals, bvecs = make_gradients()
    paths = write_fsl(tmp_path, bvals, bvecs, bval_text="\n".join(map(str, bvals)))
    np.testing.assert_array_equal(read_fsl_gradients(*paths, 13).bvals, bvals)


def test_shell_grouping():
    labels = group_shells(np.array([0, 995, 1000, 1005, 2000, 1990, 5, 3000]))
    np.testing.assert_array_equal(labels, [0, 1000, 1000, 1000, 1995, 1995, 0, 3000])
    np.testing.assert_array_equal(group_shells(np.array([1000.0, 2000.0])), [1000, 2000])
    bvals = np.array([0, 995, 1000, 1005, 2000, 2000])
    bvecs = np.vstack([np.zeros(3), unit_vectors(5)])
    table = GradientTable(bvals, bvecs)
    assert list(table.shells) == [1000, 2000]
    np.testing.assert_array_equal(table.shells[1000], [1, 2, 3])
    np.testing.assert_array_equal(table.shell_of(), [0, 1000, 1000, 1000, 2000, 2000])
    np.testing.assert_array_equal(table.b0_mask, [True] + [False] * 5)


def test_low_b_with_vector_is_b0(tmp_path):
    bvals, bvecs = make_gradients()
    bvals[0], bvecs[0] = 5.0, [0.0, 0.0, 1.0]
    table = read_fsl_gradients(*write_fsl(tmp_path, bvals, bvecs), 13)
    assert table.b0_mask[0] and 0 not in table.shells.get(1000, [])
    np.testing.assert_array_equal(table.bvecs[0], 0.0)


def test_near_unit_vector_normalised(tmp_path):
    bvals, bvecs = make_gradients()
    bvecs[4] *= 1.05
    table = read_fsl_gradients(*write_fsl(tmp_path, bvals, bvecs), 13)
    np.testing.assert_allclose(np.linalg.norm(table.bvecs[1:], axis=1), 1.0, atol=1e-12)


def _corrupt(name):
    """Return (bvals, bvecs, kwargs for write_fsl, n_volumes) with one corruption."""
    bvals, bvecs = make_gradients()
    kwargs, n_volumes = {}, 13
    if name == "n_volumes":
        n_volumes = 14
    elif name == "count":
        bvals, n_volumes = bvals[:-1], None
    elif name == "nan":
        bvecs[5, 1] = np.nan
    elif name == "inf":
        bvals[6] = np.inf
    elif name == "negative":
        bvals[2] = -1000
    elif name == "transposed":  # and one row short: ambiguous, refused
        kwargs["transpose"] = True
        bvecs = bvecs[:-1]
    elif name == "no_b0":
        bvals[0], bvecs[0] = 1000, unit_vectors(1, 7)[0]
    elif name == "b0_vector":
        bvecs[0] = [0.6, 0.8, 0.0]
    elif name == "non_unit":
        bvecs[3] *= 0.5
    elif name == "zero_dw":
        bvecs[3] = 0.0
    elif name == "text":
        kwargs["bval_text"] = "0 1000 abc"
    return bvals, bvecs, kwargs, n_volumes


@pytest.mark.parametrize(
    ("name", "culprit", "expected"),
    [
        ("n_volumes", "bval", "has 13 b-values but the image has 14 volumes"),
        ("count", "bvec", "has 13 columns but sub-01_dwi.bval has 12 b-values"),
        ("nan", "bvec", "non-finite value (NaN) at volume 5"),
        ("inf", "bval", "non-finite value (inf) at volume 6"),
        ("negative", "bval", "negative b-value (-1000) at volume 2"),
        ("transposed", "bvec", "appears transposed: 12 rows × 3 columns, but sub-01_dwi.bval"),
        ("no_b0", "bval", "no b=0 volume (b <= 50)"),
        ("b0_vector", "bvec", "b=0 volume 0 has a non-zero b-vector (0.600, 0.800, 0.000)"),
        ("non_unit", "bvec", "volume 3 (b=1000) has a b-vector of norm 0.500"),
        ("zero_dw", "bvec", "volume 3 (b=1000) has a b-vector of norm 0.000"),
        ("text", "bval", "is not numeric (line 1"),
    ],
)
def test_corrupt_fsl_files(tmp_path, name, culprit, expected):
    bvals, bvecs, kwargs, n_volumes = _corrupt(name)
    paths = dict(zip(("bval", "bvec"), write_fsl(tmp_path, bvals, bvecs, **kwargs), strict=True))
    with pytest.raises(GradientError) as info:
        read_fsl_gradients(paths["bval"], paths["bvec"], n_volumes)
    message = str(info.value)
    assert message.startswith(str(paths[culprit]) + ": ")
    assert expected in message
    if name == "b0_vector":
        assert "are .bval and .bvec out of step?" in message


def test_bvec_column_count_vs_image(tmp_path):
    bvals, bvecs = make_gradients()
    bval_path, bvec_path = write_fsl(tmp_path, bvals, bvecs)
    np.savetxt(bvec_path, bvecs[:-1].T)
    with pytest.raises(GradientError, match=r"sub-01_dwi\.bvec: has 12 columns .* image has 13"):
        read_fsl_gradients(bval_path, bvec_path, 13)


def test_unreadable_and_empty_files(tmp_path):
    (tmp_path / "empty.bval").write_text("\n")
    with pytest.raises(GradientError, match=r"missing\.bval: cannot be read"):
        read_fsl_gradients(tmp_path / "missing.bval", tmp_path / "missing.bvec")
    with pytest.raises(GradientError, match=r"empty\.bval: is empty"):
        read_fsl_gradients(tmp_path / "empty.bval", tmp_path / "missing.bvec")


# --------------------------------------------------------------------------- MRtrix


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_mrtrix_round_trip_oblique(seed, flip):
    affine = random_affine(seed, flip)
    assert (np.linalg.det(affine[:3, :3]) < 0) == flip
    bvals, bvecs = make_gradients(30, seed=seed)
    b_table = fsl_to_mrtrix(bvals, bvecs, affine)
    back_bvals, back_bvecs = mrtrix_to_fsl(b_table, affine)
    np.testing.assert_allclose(back_bvecs, bvecs, atol=1e-6)
    np.testing.assert_array_equal(back_bvals, bvals)
    np.testing.assert_allclose(np.linalg.norm(b_table[1:, :3], axis=1), 1.0, atol=1e-12)
    # world directions follow the image rotation: rotating the image rotates the world vectors
    rotation = Rotation.random(random_state=100 + seed).as_matrix()
    turned = affine.copy()
    turned[:3, :] = rotation @ affine[:3, :]
    np.testing.assert_allclose(
        fsl_to_mrtrix(bvals, bvecs, turned)[:, :3], b_table[:, :3] @ rotation.T, atol=1e-9
    )


def test_mrtrix_known_cases():
    world = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1000.0], [0.0, 0.6, 0.8, 1000.0]])
    las = np.diag([-2.0, 2.0, 2.5, 1.0])  # det < 0: image x runs right-to-left
    ras = np.diag([2.0, 2.0, 2.5, 1.0])  # det > 0: FSL flips x
    for affine in (las, ras):
        bvals, bvecs = mrtrix_to_fsl(world, affine)
        np.testing.assert_allclose(bvecs, [[0, 0, 0], [-1, 0, 0], [0, 0.6, 0.8]], atol=1e-12)
        np.testing.assert_array_equal(bvals, world[:, 3])
    # 90 degree rotation about z (det > 0): world y is image -x, then x is flipped
    rot = np.array([[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0, 0, 1, 0], [0, 0, 0, 1]])
    _, bvecs = mrtrix_to_fsl(np.array([[0.0, 1.0, 0.0, 1000.0]]), rot)
    np.testing.assert_allclose(bvecs, [[-1.0, 0.0, 0.0]], atol=1e-12)


def test_mrtrix_files_and_agreement(tmp_path):
    affine = random_affine(3, flip=True)
    bvals, bvecs = make_gradients(20)
    fsl = read_fsl_gradients(*write_fsl(tmp_path, bvals, bvecs), 21)
    b_path = tmp_path / "sub-01_dwi.b"
    write_mrtrix_gradients(fsl, affine, b_path)
    assert len(b_path.read_text().splitlines()) == 21
    mrtrix = read_mrtrix_gradients(b_path, affine, 21)
    np.testing.assert_allclose(mrtrix.bvecs, fsl.bvecs, atol=1e-5)
    check_gradient_agreement(fsl, mrtrix, b_path)
    # the wrong affine (y axis reversed) gives different image-axis directions
    wrong_affine = affine @ np.diag([1.0, -1.0, 1.0, 1.0])
    wrong = read_mrtrix_gradients(b_path, wrong_affine, 21)
    with pytest.raises(GradientError, match=r"sub-01_dwi\.b: .*direction of volume \d+ differs"):
        check_gradient_agreement(fsl, wrong, b_path)
    other = GradientTable(np.r_[0.0, np.full(20, 2000.0)], fsl.bvecs)
    with pytest.raises(GradientError, match="volume 1 has b=2000 here but b=1000 there"):
        check_gradient_agreement(fsl, other, b_path)
    with pytest.raises(GradientError, match="has 21 rows .* image has 22 volumes"):
        read_mrtrix_gradients(b_path, affine, 22)
    np.savetxt(b_path, np.c_[np.zeros((21, 3)), bvals].T)
    with pytest.raises(GradientError, match=r"sub-01_dwi\.b: appears transposed"):
        read_mrtrix_gradients(b_path, affine)


def test_mrtrix_b0_vector_rejected(tmp_path):
    b_path = tmp_path / "x.b"
    np.savetxt(b_path, [[0, 0, 1, 0], [1, 0, 0, 1000], [0, 1, 0, 1000]])
    with pytest.raises(GradientError, match=r"x\.b: b=0 volume 0 has a non-zero b-vector"):
        read_mrtrix_gradients(b_path, np.eye(4))


# --------------------------------------------------------------------------- directions


def test_nearest_directions_antipodal():
    references = unit_vectors(20, seed=1)
    targets = unit_vectors(7, seed=2)
    indices, angles = nearest_directions(targets, references, 5)
    assert indices.shape == angles.shape == (7, 5)
    assert np.issubdtype(indices.dtype, np.integer)
    assert np.all(np.diff(angles, axis=1) >= 0) and np.all(angles <= 90.0)
    signs = np.where(np.arange(20) % 2, -1.0, 1.0)[:, None]
    flipped_indices, flipped_angles = nearest_directions(targets, references * signs, 5)
    np.testing.assert_array_equal(flipped_indices, indices)
    np.testing.assert_allclose(flipped_angles, angles, atol=1e-9)
    pair = nearest_directions(targets[:1], np.vstack([references[:1], -references[:1]]), 2)[1]
    assert pair[0, 0] == pytest.approx(pair[0, 1], abs=1e-9)
    np.testing.assert_allclose(antipodal_angles_deg(targets, -targets).diagonal(), 0, atol=1e-5)


def test_select_targets_fill_the_sphere():
    acquired = unit_vectors(30, seed=3)
    before = acquired.copy()
    start = time.perf_counter()
    targets = select_target_directions(acquired, 60, seed=4)
    assert time.perf_counter() - start < 2.0
    np.testing.assert_array_equal(acquired, before)
    assert targets.shape == (60, 3)
    np.testing.assert_allclose(np.linalg.norm(targets, axis=1), 1.0, atol=1e-12)
    assert np.all(targets[:, 2] >= 0)
    merged = np.vstack([acquired, targets])
    assert largest_angular_gap_deg(merged) < largest_angular_gap_deg(acquired)
    assert antipodal_angles_deg(targets, acquired).min() > 5.0
    among = antipodal_angles_deg(targets, targets) + 90 * np.eye(60)
    assert among.min() > 5.0


def test_select_targets_deterministic_and_fast():
    acquired = select_target_directions(np.empty((0, 3)), 45, seed=9)
    start = time.perf_counter()
    first = select_target_directions(acquired, 90, seed=1)
    assert time.perf_counter() - start < 2.0
    np.testing.assert_array_equal(first, select_target_directions(acquired, 90, seed=1))
    assert not np.allclose(first, select_target_directions(acquired, 90, seed=2))
    assert select_target_directions(acquired, 0).shape == (0, 3)


def test_largest_gap():
    assert largest_angular_gap_deg(fibonacci_sphere(1000)) < 5.0
    assert largest_angular_gap_deg(np.array([[0.0, 0.0, 1.0]])) == pytest.approx(90.0, abs=0.5)


@pytest.mark.parametrize("transpose", [False, True])
def test_load_target_bvecs(tmp_path, transpose):
    vectors = unit_vectors(10, seed=5) * 2.0
    path = tmp_path / "targets.txt"
    np.savetxt(path, vectors.T if transpose else vectors)
    np.testing.assert_allclose(load_target_bvecs(path), vectors / 2.0, atol=1e-9)
    vectors[4] = 0.0
    np.savetxt(path, vectors)
    with pytest.raises(GradientError, match=r"targets\.txt: direction 4 is a zero vector"):
        load_target_bvecs(path)
    vectors[4, 1] = np.nan
    np.savetxt(path, vectors)
    with pytest.raises(GradientError, match=r"targets\.txt: .*NaN"):
        load_target_bvecs(path)
    np.savetxt(path, np.ones((4, 5)))
    with pytest.raises(GradientError, match="3 rows or 3 columns"):
        load_target_bvecs(path)


def test_load_target_bvecs_three_by_three_is_columns(tmp_path):
    path = tmp_path / "targets.txt"
    np.savetxt(path, [[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(load_target_bvecs(path), [[1, 0, 0], [0, 0, 1], [0, 1, 0]])


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_gradients():
    if not REAL_DATA.is_dir():
        pytest.skip("../shared/data/bids-real not present")
    nib = pytest.importorskip("nibabel")
    bval_paths = sorted(REAL_DATA.rglob("*_dwi.bval"))
    assert bval_paths
    for bval_path in bval_paths:
        stem = str(bval_path)[: -len(".bval")]
        n_volumes = nib.load(stem + ".nii.gz").shape[3]
        table = read_fsl_gradients(bval_path, stem + ".bvec", n_volumes)
        assert table.b0_mask.sum() == 1, bval_path.name
        assert len(table.shells) == 1, bval_path.name


def test_transposed_bvec_with_matching_count_is_read_with_a_warning(tmp_path):
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    bvals, bvecs, _, _ = _corrupt("b0_vector")  # any valid table, then fixed up below
    bvecs[0] = 0.0
    paths = write_fsl(tmp_path, bvals, bvecs, transpose=True)
    keep = Keep()
    logging.getLogger("qid2").addHandler(keep)  # the app's logger need not propagate
    try:
        table = read_fsl_gradients(*paths, len(bvals))
    finally:
        logging.getLogger("qid2").removeHandler(keep)
    (tmp_path / "ok").mkdir()
    expected = read_fsl_gradients(*write_fsl(tmp_path / "ok", bvals, bvecs), len(bvals))
    np.testing.assert_allclose(table.bvecs, expected.bvecs)
    assert any("transposed" in m for m in keep.messages)
