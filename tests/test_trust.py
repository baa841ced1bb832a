"""The trust verdict: noise level, noise floor and the pass/warn checks (real arrays)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal
from qid2_bidsapp.engines.base import get_engine
from qid2_bidsapp.qc import hidden_direction_check
from qid2_bidsapp.trust import (
    FA_CHANGE_LIMIT,
    FLOOR_RATIO,
    SMALL_FIELD_VOXELS,
    estimate_noise,
    noise_floor_nrmse,
    small_field_of_view,
    trust_checks,
)

SHAPE = (16, 16, 6)
SIGMA = 25.0


def _scan(n_b0: int, seed: int = 0):
    bvecs = np.vstack([np.zeros((n_b0, 3)), hemisphere_directions(30, seed=1)])
    bvals = np.r_[np.zeros(n_b0), np.full(30, 1000.0)]
    clean, brain = phantom_signal(SHAPE, bvals, bvecs)
    rng = np.random.default_rng(seed)
    noisy = clean + rng.normal(0, SIGMA, clean.shape)  # Gaussian: high SNR in the brain
    return noisy.astype(np.float32), clean, bvals, bvecs, brain


@pytest.mark.parametrize(
    "n_b0, method, tolerance", [(4, "b0 repeats", 0.1), (1, "tensor residual", 0.25)]
)
def test_noise_is_measured_in_signal_units(n_b0, method, tolerance):
    noisy, _, bvals, bvecs, brain = _scan(n_b0)
    sigma, used = estimate_noise(noisy, bvals, bvecs, brain)
    assert used == method
    assert sigma == pytest.approx(SIGMA, rel=tolerance)
    scaled, _ = estimate_noise(noisy * 1e3, bvals, bvecs, brain)
    assert scaled == pytest.approx(1e3 * sigma, rel=1e-6)


def test_noise_ignores_voxels_where_the_tensor_fit_diverges():
    """A few voxels with near-zero diffusion-weighted signal (CSF at high b, dropouts) make the
    log-linear fit diverge there; the median over voxels keeps the estimate on the noise."""
    noisy, _, bvals, bvecs, brain = _scan(1)
    rng = np.random.default_rng(3)
    inside = np.argwhere(brain)
    bad = inside[rng.choice(len(inside), len(inside) // 20, replace=False)]
    for x, y, z in bad:  # 5 % of the brain: three volumes read (almost) nothing
        noisy[x, y, z, rng.choice(np.arange(1, 31), 3, replace=False)] = 1e-3
    sigma, used = estimate_noise(noisy, bvals, bvecs, brain)
    assert used == "tensor residual"
    assert sigma == pytest.approx(SIGMA, rel=0.25)


def test_noise_of_a_b0_repeat_with_motion_stays_on_the_noise():
    noisy, _, bvals, bvecs, brain = _scan(4)
    moved = noisy.copy()
    moved[..., 3] = np.roll(noisy[..., 3], 2, axis=0)  # one b=0 volume shifted by 2 voxels
    sigma, used = estimate_noise(moved, bvals, bvecs, brain)
    assert used == "b0 repeats"
    assert sigma < 2 * SIGMA


def test_noise_of_real_scans_does_not_depend_on_the_directions_used(real_bids):
    """On every run of bids-real (one b=0 each), half the directions give the σ of all of them
    (the mean squared tensor residual used before 2026-12-06 gave up to 10^49 times it)."""
    import nibabel as nib

    from qid2_bidsapp.upsampling import brain_mask

    runs = sorted(real_bids.glob("sub-*/**/dwi/*_dwi.nii.gz"))
    assert len(runs) == 10
    rng = np.random.default_rng(0)
    for run in runs:
        data = np.asarray(nib.load(run).dataobj, dtype=np.float32)
        stem = str(run)[: -len(".nii.gz")]
        bvals = np.loadtxt(stem + ".bval")
        bvecs = np.loadtxt(stem + ".bvec").T
        b0 = data[..., bvals <= 50].mean(axis=-1)
        brain = brain_mask(b0)
        full, _ = estimate_noise(data, bvals, bvecs, brain)
        weighted = np.flatnonzero(bvals > 50)
        half = np.r_[
            np.flatnonzero(bvals <= 50), rng.choice(weighted, len(weighted) // 2, replace=False)
        ]
        part, _ = estimate_noise(data[..., half], bvals[half], bvecs[half], brain)
        assert part == pytest.approx(full, rel=0.25), run.name
        snr = float(np.median(b0[brain])) / full
        assert 10 < snr < 200, (run.name, snr)


def test_noise_floor_is_what_the_truth_scores():
    noisy, clean, bvals, bvecs, brain = _scan(4)
    hidden = noisy[..., -5:]
    floor = noise_floor_nrmse(SIGMA, hidden, brain)
    truth_error = np.linalg.norm((clean[..., -5:] - hidden)[brain]) / np.linalg.norm(hidden[brain])
    assert floor == pytest.approx(truth_error, rel=0.05)
    assert math.isnan(noise_floor_nrmse(float("nan"), hidden, brain))


def test_checks_pass_and_warn_on_their_thresholds():
    verdict, checks = trust_checks(
        hidden_nrmse=0.1, noise_floor=0.09, sh_nrmse=0.11, fa_change=-0.004
    )
    assert verdict == "pass" and [c["status"] for c in checks] == ["pass"] * 3
    verdict, checks = trust_checks(
        hidden_nrmse=0.1, noise_floor=0.1 / (FLOOR_RATIO + 0.1), sh_nrmse=0.11,
        fa_change=-(FA_CHANGE_LIMIT + 0.001),
    )  # fmt: skip
    assert verdict == "warn"
    assert [c["status"] for c in checks] == ["warn", "pass", "warn"]
    verdict, checks = trust_checks(
        hidden_nrmse=float("nan"), noise_floor=float("nan"), sh_nrmse=float("nan"),
        fa_change=float("nan"),
    )  # fmt: skip
    assert verdict == "n/a"


def test_self_check_reports_the_floor_and_the_sh_baseline():
    noisy, _, bvals, bvecs, brain = _scan(4)
    sigma, _ = estimate_noise(noisy, bvals, bvecs, brain)
    shell = np.flatnonzero(bvals > 50)
    result = hidden_direction_check(
        noisy, bvals, bvecs, shell, get_engine("interp"), brain, noise_sigma=sigma
    )
    assert result["hidden_nrmse"] >= result["hidden_nrmse_floor"] * 0.9
    assert result["hidden_nrmse_sh"] != result["hidden_nrmse"]  # sh ran as the baseline


def test_small_field_of_view_needs_two_small_axes():
    cube = np.zeros((40, 40, 40), dtype=bool)
    cube[5:15, 5:15, 5:15] = True  # 10 x 10 x 10, like dipy's small_64D
    assert small_field_of_view(cube) == (10, 10, 10)
    slab = np.zeros((64, 64, 20), dtype=bool)
    slab[4:60, 6:58, :] = True  # partial coverage: one short axis only
    assert small_field_of_view(slab) is None
    edge = np.zeros((40, 40, 40), dtype=bool)
    edge[0:SMALL_FIELD_VOXELS, 0 : SMALL_FIELD_VOXELS - 1, :] = True
    assert small_field_of_view(edge) is None  # only one axis under the threshold
    edge[0 : SMALL_FIELD_VOXELS - 1] = False
    assert small_field_of_view(edge) == (1, SMALL_FIELD_VOXELS - 1, 40)
    assert small_field_of_view(np.zeros((5, 5, 5), dtype=bool)) is None


def test_small_field_threshold_is_where_the_network_mirrors_its_window():
    pytest.importorskip("torch")
    from qid2_bidsapp.model.field_features import MIN_NETWORK_SIZE

    assert SMALL_FIELD_VOXELS == MIN_NETWORK_SIZE // 2
