"""Tests of the plain-array quality-control functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import fractional_anisotropy
from dipy.sims.voxel import multi_tensor
from scipy.spatial.transform import Rotation

from qid2_bidsapp.engines.base import get_engine
from qid2_bidsapp.qc import (
    DTIResult,
    choose_hidden_directions,
    colour_fa,
    default_n_hidden,
    fit_dti,
    hidden_direction_check,
    masked_mae,
    masked_nrmse,
)

BVAL = 1000.0
S0 = 100.0
EVALS = (1.7e-3, 0.3e-3, 0.3e-3)


def fibonacci_hemisphere(n: int, seed: int | None = None) -> np.ndarray:
    """N near-uniform unit directions, one per antipodal pair (optionally randomly rotated)."""
    i = np.arange(2 * n) + 0.5
    z = 1.0 - i / n
    r = np.sqrt(1.0 - z**2)
    phi = np.pi * (1.0 + np.sqrt(5.0)) * i
    v = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)[:n]
    if seed is not None:
        v = Rotation.random(random_state=seed).apply(v)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def dwi_table(n_dirs: int = 30, n_b0: int = 2):
    """b-values and b-vectors: ``n_b0`` b=0 volumes then one b=1000 shell."""
    bvals = np.concatenate([np.zeros(n_b0), np.full(n_dirs, BVAL)])
    bvecs = np.concatenate([np.zeros((n_b0, 3)), fibonacci_hemisphere(n_dirs)])
    return bvals, bvecs


def single_tensor_volume(bvals, bvecs, shape=(3, 3, 2), seed=1) -> np.ndarray:
    """Noise-free single-tensor voxels (S0=100) in random orientations."""
    rng = np.random.default_rng(seed)
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=50)
    out = np.zeros((*shape, len(bvals)))
    for idx in np.ndindex(shape):
        angles = [(rng.uniform(0, 180), rng.uniform(0, 360))]
        out[idx], _ = multi_tensor(
            gtab, np.array([EVALS]), S0=S0, angles=angles, fractions=[100.0], snr=None
        )
    return out.astype(np.float32)


def rician(data: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    real = data + rng.normal(0, sigma, data.shape)
    imag = rng.normal(0, sigma, data.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


@pytest.fixture(scope="module")
def table():
    return dwi_table()


@pytest.fixture(scope="module")
def clean(table):
    return single_tensor_volume(*table)


def test_fit_dti_matches_analytic_fa(table, clean):
    bvals, bvecs = table
    result = fit_dti(clean, bvals, bvecs, None)
    assert isinstance(result, DTIResult)
    expected_fa = fractional_anisotropy(np.array(EVALS))
    np.testing.assert_allclose(result.fa, expected_fa, atol=1e-4)
    np.testing.assert_allclose(result.md, np.mean(EVALS), rtol=1e-3)
    assert result.fa.dtype == np.float32 and result.md.dtype == np.float32
    assert result.evec1.shape == (*clean.shape[:3], 3)
    np.testing.assert_allclose(np.linalg.norm(result.evec1, axis=-1), 1.0, atol=1e-5)


def test_fit_dti_principal_direction():
    bvals, bvecs = dwi_table()
    gtab = gradient_table(bvals, bvecs=bvecs)
    signal, _ = multi_tensor(
        gtab, np.array([EVALS]), S0=S0, angles=[(90, 0)], fractions=[100.0], snr=None
    )  # fibre along x
    result = fit_dti(signal[None, None, None, :], bvals, bvecs, None)
    np.testing.assert_allclose(np.abs(result.evec1[0, 0, 0]), [1, 0, 0], atol=1e-5)
    rgb = colour_fa(result.fa, result.evec1)
    np.testing.assert_allclose(rgb[0, 0, 0], [result.fa[0, 0, 0], 0, 0], atol=1e-5)


def test_fit_dti_mask_and_nan(table, clean):
    bvals, bvecs = table
    data = clean.copy()
    data[0, 0, 0] = 0.0  # an empty voxel inside the mask: FA must not be NaN
    mask = np.ones(data.shape[:3], dtype=bool)
    mask[2, 2, :] = False
    result = fit_dti(data, bvals, bvecs, mask)
    assert np.all(np.isfinite(result.fa)) and np.all(np.isfinite(result.md))
    assert np.all(result.fa[~mask] == 0) and np.all(result.md[~mask] == 0)
    assert np.all(result.evec1[~mask] == 0)
    assert np.all(result.fa[mask][1:] > 0.5)


def test_colour_fa_range():
    rng = np.random.default_rng(0)
    fa = rng.uniform(0, 1.2, (4, 4, 2)).astype(np.float32)
    evec = rng.normal(size=(4, 4, 2, 3))
    evec /= np.linalg.norm(evec, axis=-1, keepdims=True)
    evec[0, 0, 0] = np.nan
    rgb = colour_fa(fa, evec)
    assert rgb.shape == (4, 4, 2, 3)
    assert np.all(np.isfinite(rgb)) and rgb.min() >= 0 and rgb.max() <= 1


def test_masked_metrics():
    truth = np.ones((2, 2, 1, 3))
    pred = truth.copy()
    pred[0, 0, 0] = 2.0  # error outside the mask
    pred[1, 1, 0, 0] = 1.5
    mask = np.zeros((2, 2, 1), dtype=bool)
    mask[1, :, 0] = True
    assert masked_nrmse(pred, truth, mask) == pytest.approx(0.5 / math.sqrt(6))
    assert masked_mae(pred, truth, mask) == pytest.approx(0.5 / 6)
    assert masked_mae(pred, truth, None) == pytest.approx((3 + 0.5) / 12)
    assert masked_nrmse(truth, truth, mask) == 0.0
    assert math.isnan(masked_nrmse(pred, truth, np.zeros((2, 2, 1), dtype=bool)))
    assert math.isnan(masked_mae(pred, truth, np.zeros((2, 2, 1), dtype=bool)))
    with pytest.raises(ValueError):
        masked_mae(pred, truth[..., :2], mask)


@pytest.mark.parametrize(
    ("n", "expected"), [(0, 0), (6, 0), (7, 1), (10, 1), (16, 2), (30, 3), (64, 6), (90, 9)]
)
def test_default_n_hidden(n, expected):
    assert default_n_hidden(n) == expected


def test_default_n_hidden_leaves_six():
    for n in range(7, 200):
        k = default_n_hidden(n)
        assert k >= 1 and n - k >= 6


def _min_pair_angle(v: np.ndarray) -> float:
    c = np.abs(v @ v.T)
    np.fill_diagonal(c, 0)
    return float(np.degrees(np.arccos(np.clip(c.max(), 0, 1))))


def test_choose_hidden_directions_deterministic_and_spread():
    bvecs = fibonacci_hemisphere(30)
    a = choose_hidden_directions(bvecs, 5, seed=0)
    b = choose_hidden_directions(bvecs, 5, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.dtype.kind == "i" and len(set(a.tolist())) == 5
    assert np.all(np.diff(a) > 0)
    assert not np.array_equal(a, choose_hidden_directions(bvecs, 5, seed=1))
    # farther apart than a typical random subset, and than neighbours in the scheme
    spread = _min_pair_angle(bvecs[a])
    rng = np.random.default_rng(0)
    random_spread = np.median(
        [_min_pair_angle(bvecs[rng.choice(30, 5, replace=False)]) for _ in range(200)]
    )
    print(f"hidden min pair angle {spread:.1f} deg vs random subset median {random_spread:.1f}")
    assert spread > random_spread
    assert spread > 45.0
    assert choose_hidden_directions(bvecs, 0).size == 0
    with pytest.raises(ValueError):
        choose_hidden_directions(bvecs, 31)


def test_hidden_check_noise_free(table, clean):
    bvals, bvecs = table
    shell = np.flatnonzero(bvals > 50)
    mask = np.ones(clean.shape[:3], dtype=bool)
    mask[0, 0, 0] = False
    for name in ("sh", "interp"):
        result = hidden_direction_check(clean, bvals, bvecs, shell, get_engine(name), mask)
        print(f"noise-free {name}: {result}")
        assert result["hidden_n"] == 3
        assert result["hidden_nrmse"] < (0.06 if name == "sh" else 0.5)
        assert result["hidden_fa_mae"] < 0.02
    result = hidden_direction_check(
        clean, bvals, bvecs, shell, get_engine("sh", sh_lambda=0.0006), mask
    )
    print(f"noise-free sh lambda=0.0006: {result}")
    assert result["hidden_nrmse"] < 0.02
    assert result["hidden_fa_mae"] < 0.01


def test_hidden_check_grows_with_noise(table, clean):
    bvals, bvecs = table
    shell = np.flatnonzero(bvals > 50)
    engine = get_engine("sh")
    results = [
        hidden_direction_check(data, bvals, bvecs, shell, engine, None)
        for data in (clean, rician(clean, 5.0, seed=0), rician(clean, 15.0, seed=0))
    ]
    for sigma, result in zip((0, 5, 15), results, strict=True):
        print(f"sigma {sigma}: {result}")
    nrmse = [r["hidden_nrmse"] for r in results]
    fa_mae = [r["hidden_fa_mae"] for r in results]
    assert nrmse[0] < nrmse[1] < nrmse[2]
    assert fa_mae[0] < fa_mae[2]


def test_hidden_check_options(table, clean):
    bvals, bvecs = table
    shell = np.flatnonzero(bvals > 50)
    engine = get_engine("sh")
    reference = fit_dti(clean, bvals, bvecs, None).fa
    a = hidden_direction_check(clean, bvals, bvecs, shell, engine, None, fa_reference=reference)
    b = hidden_direction_check(clean, bvals, bvecs, shell, engine, None)
    assert a.keys() == b.keys()
    for key in a:  # equal, or both NaN (no noise level given: no floor)
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key]))
    assert a["hidden_nrmse_sh"] == a["hidden_nrmse"]  # the sh engine is its own baseline
    c = hidden_direction_check(clean, bvals, bvecs, shell, engine, None, n_hidden=6, seed=3)
    assert c["hidden_n"] == 6
    empty = hidden_direction_check(clean, bvals, bvecs, shell, engine, None, n_hidden=0)
    assert empty["hidden_n"] == 0
    assert math.isnan(empty["hidden_nrmse"]) and math.isnan(empty["hidden_fa_mae"])
    small = hidden_direction_check(clean, bvals, bvecs, shell[:6], engine, None)
    assert small["hidden_n"] == 0 and math.isnan(small["hidden_nrmse"])


def test_hidden_check_uses_mean_b0(table, clean):
    bvals, bvecs = table
    shell = np.flatnonzero(bvals > 50)
    seen = {}

    class Spy:
        name = "spy"

        def predict(self, signal, b0, bvecs_in, bvecs_out, bval, mask=None):
            seen.update(b0=b0, n_in=signal.shape[-1], n_out=len(bvecs_out), bval=bval)
            return np.zeros((*signal.shape[:3], len(bvecs_out)), np.float32)

        def settings(self):
            return {}

    data = clean.copy()
    data[..., 1] = 3 * data[..., 0]
    result = hidden_direction_check(data, bvals, bvecs, shell, Spy(), None)
    np.testing.assert_allclose(seen["b0"], 2 * clean[..., 0], rtol=1e-6)
    assert seen["n_in"] == 27 and seen["n_out"] == 3 and seen["bval"] == BVAL
    assert result["hidden_nrmse"] == pytest.approx(1.0)


def test_batched_wls_matches_dipy_on_noisy_crossings():
    """The batched DTI fit is DIPY's WLS estimator, degenerate voxels included."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel
    from dipy.sims.voxel import multi_tensor

    from qid2_bidsapp.data.example import hemisphere_directions

    rng = np.random.default_rng(0)
    bvals = np.r_[0, 0, np.full(30, 1000.0)]
    bvecs = np.vstack([np.zeros((2, 3)), hemisphere_directions(30, 1)])
    gtab = gradient_table(bvals, bvecs=bvecs)
    evals = np.array([[1.7e-3, 0.3e-3, 0.3e-3], [1.5e-3, 0.4e-3, 0.4e-3]])
    signals = []
    for _ in range(300):
        angles = rng.normal(size=(2, 3))
        f = rng.uniform(0, 100)
        s, _ = multi_tensor(
            gtab,
            evals,
            S0=100,
            angles=angles / np.linalg.norm(angles, axis=1, keepdims=True),
            fractions=[f, 100 - f],
            snr=rng.uniform(10, 40),
            rng=rng,
        )
        signals.append(s)
    signals = np.array(signals)
    signals[0] = 0.0
    signals[1, :5] = 0.0
    data = signals.reshape(10, 30, 1, -1)
    ours = fit_dti(data, bvals, bvecs)
    theirs = TensorModel(gtab, fit_method="WLS").fit(data)
    np.testing.assert_allclose(ours.fa, np.nan_to_num(theirs.fa), atol=1e-5)
    np.testing.assert_allclose(ours.md, theirs.md, atol=1e-8)
    cos = np.abs((ours.evec1 * theirs.evecs[..., 0]).sum(-1))
    assert cos[ours.fa > 0.2].min() > 0.999


@pytest.mark.parametrize("scale", [1e-3, 1e6])
def test_fa_md_and_merged_fa_do_not_depend_on_signal_units(scale):
    from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal
    from qid2_bidsapp.gradients import GradientTable
    from qid2_bidsapp.upsampling import brain_mask, mean_b0, plan_targets, upsample_shells

    bvecs = np.vstack([np.zeros((1, 3)), hemisphere_directions(20, seed=2)])
    bvals = np.r_[0.0, np.full(20, 1000.0)]
    clean, _ = phantom_signal((18, 18, 4), bvals, bvecs)
    rng = np.random.default_rng(0)
    data = np.abs(clean + rng.normal(0, 30, clean.shape)).astype(np.float32)
    data[0, 0, 0, 5] = 0.0  # a zero signal: the clamp must be relative
    table = GradientTable(bvals, bvecs)

    def maps(x):
        mask = brain_mask(mean_b0(x, table))
        dti = fit_dti(x, bvals, bvecs, mask)
        plans = plan_targets(table, sorted(table.shells), n_targets=20)
        synth, sb, sg, _ = upsample_shells(x, table, plans, get_engine("sh"), None)
        merged = np.concatenate([x, synth], axis=-1)
        fa_merged = fit_dti(merged, np.r_[bvals, sb], np.vstack([bvecs, sg]), mask).fa
        return mask, dti.fa, dti.md, fa_merged

    base = maps(data)
    scaled = maps(data * np.float32(scale))
    np.testing.assert_array_equal(base[0], scaled[0])
    np.testing.assert_allclose(scaled[1], base[1], atol=1e-4)
    np.testing.assert_allclose(scaled[2], base[2], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(scaled[3], base[3], atol=1e-4)
