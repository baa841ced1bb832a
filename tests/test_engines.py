"""Tests of the classical up-sampling engines (spherical harmonics and the paper's Interp)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.sims.voxel import multi_tensor
from scipy.spatial.transform import Rotation

from qid2_bidsapp.engines.base import Upsampler, get_engine
from qid2_bidsapp.engines.interp import InterpUpsampler, interp_weights
from qid2_bidsapp.engines.sh import (
    SHUpsampler,
    apply_direction_matrix,
    sh_basis_matrix,
    sh_order_for,
    sh_prediction_matrix,
)

BVAL = 1000.0
S0 = 100.0
EVALS_PROLATE = (1.7e-3, 0.3e-3, 0.3e-3)


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


def tensor_signal(bvecs: np.ndarray, angles, fractions, evals=EVALS_PROLATE) -> np.ndarray:
    """Noise-free multi-tensor signal (b=1000, S0=100) at unit directions."""
    gtab = gradient_table(np.full(len(bvecs), BVAL), bvecs=bvecs, b0_threshold=0)
    mevals = np.array([evals] * len(angles))
    signal, _ = multi_tensor(gtab, mevals, S0=S0, angles=angles, fractions=fractions, snr=None)
    return signal


def phantom(bvecs: np.ndarray, *, crossing: bool = True, seed: int = 1) -> np.ndarray:
    """A (3, 3, 2, N) grid of single fibres in random orientations, with crossings."""
    rng = np.random.default_rng(seed)
    shape = (3, 3, 2)
    out = np.zeros((*shape, len(bvecs)))
    for idx in np.ndindex(shape):
        theta, phi = rng.uniform(0, 180), rng.uniform(0, 360)
        if crossing and sum(idx) % 3 == 0:
            angles = [(theta, phi), (theta + 70.0, phi + 30.0)]
            fractions = [60.0, 40.0]
        else:
            angles, fractions = [(theta, phi)], [100.0]
        out[idx] = tensor_signal(bvecs, angles, fractions)
    return out


def rel_error(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(pred - truth) / np.linalg.norm(truth))


@pytest.fixture(scope="module")
def dirs():
    return fibonacci_hemisphere(30), fibonacci_hemisphere(60, seed=3)


@pytest.fixture(scope="module")
def single(dirs):
    b_in, b_out = dirs
    return phantom(b_in, crossing=False), phantom(b_out, crossing=False)


@pytest.fixture(scope="module")
def crossing(dirs):
    b_in, b_out = dirs
    return phantom(b_in, crossing=True), phantom(b_out, crossing=True)


def _predict(engine, signal, b_in, b_out, mask=None):
    b0 = np.full(signal.shape[:3], S0, dtype=np.float32)
    return engine.predict(signal.astype(np.float32), b0, b_in, b_out, BVAL, mask)


@pytest.mark.parametrize(("n", "order"), [(6, 2), (15, 4), (28, 6), (45, 8), (100, 8)])
def test_sh_order_for(n, order):
    assert sh_order_for(n) == order


def test_sh_order_for_edges():
    assert sh_order_for(3) == 2  # at least 2
    assert sh_order_for(14) == 2
    assert sh_order_for(27) == 4
    assert sh_order_for(10_000) == 8  # at most 8


@pytest.mark.parametrize("name", ["sh", "interp"])
def test_get_engine_satisfies_protocol(name):
    engine = get_engine(name)
    assert isinstance(engine, Upsampler)
    assert engine.name == name
    json.dumps(engine.settings())


def test_get_engine_options():
    sh = get_engine("sh", sh_order=4, sh_lambda=0.0)
    assert sh.settings()["order"] == 4
    assert sh.settings()["lambda"] == 0.0
    assert sh.settings()["basis"] == "descoteaux07"
    assert get_engine("interp", n_neighbours=6).settings() == {"n_neighbours": 6}


def test_sh_settings_record_order_used(dirs, single):
    b_in, b_out = dirs
    engine = SHUpsampler()
    assert engine.settings()["order"] == "auto"
    _predict(engine, single[0], b_in, b_out)
    settings = engine.settings()
    assert settings["orders_used"] == {"1000": 6}
    assert engine.order_for(30) == 6
    json.dumps(settings)


@pytest.mark.parametrize("kwargs", [{"order": 3}, {"order": -2}, {"lambda_": -1.0}])
def test_sh_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        SHUpsampler(**kwargs)


def test_interp_rejects_bad_settings():
    with pytest.raises(ValueError):
        InterpUpsampler(n_neighbours=0)


@pytest.mark.parametrize("engine_name", ["sh", "interp"])
def test_shape_dtype_nonnegative(engine_name, dirs, single):
    b_in, b_out = dirs
    signal = single[0].copy()
    signal[0, 0, 0] = -50.0  # negative input forces negative predictions, which must be clipped
    pred = _predict(get_engine(engine_name), signal, b_in, b_out)
    assert pred.shape == (*signal.shape[:3], len(b_out))
    assert pred.dtype == np.float32
    assert pred.min() >= 0.0
    assert np.all(pred[0, 0, 0] == 0.0)


@pytest.mark.parametrize("engine_name", ["sh", "interp"])
def test_mask_contract(engine_name, dirs, crossing):
    b_in, b_out = dirs
    engine = get_engine(engine_name)
    mask = np.zeros(crossing[0].shape[:3], dtype=bool)
    mask[1:, :2, 1] = True
    full = _predict(engine, crossing[0], b_in, b_out, None)
    masked = _predict(engine, crossing[0], b_in, b_out, mask)
    assert np.all(masked[~mask] == 0.0)
    np.testing.assert_allclose(masked[mask], full[mask], rtol=1e-6)
    assert np.all(full.max(axis=-1) > 0.0)  # None predicts every voxel


@pytest.mark.parametrize(
    ("order", "lam", "tolerance"),
    [
        # the default lambda = 0.006 shrinks l >= 4 noticeably with 30 directions: ~4% bias
        (None, 0.006, 0.05),
        (None, 0.0006, 0.03),
        (6, 0.0, 0.005),
    ],
)
def test_sh_recovers_single_tensor(dirs, single, order, lam, tolerance):
    b_in, b_out = dirs
    pred = _predict(SHUpsampler(order=order, lambda_=lam), single[0], b_in, b_out)
    err = rel_error(pred, single[1])
    print(f"SH(order={order}, lambda={lam}) single-tensor relative error: {err:.4f}")
    assert err < tolerance


def test_sh_beats_interp(dirs, single, crossing):
    b_in, b_out = dirs
    for signal_in, signal_out in (single, crossing):
        err_sh = rel_error(_predict(get_engine("sh"), signal_in, b_in, b_out), signal_out)
        err_interp = rel_error(_predict(get_engine("interp"), signal_in, b_in, b_out), signal_out)
        print(f"relative error: SH {err_sh:.4f}, interp {err_interp:.4f}")
        assert err_sh < err_interp


def test_sh_exact_for_low_order_sh_signal(dirs):
    b_in, b_out = dirs
    rng = np.random.default_rng(7)
    basis_in, _ = sh_basis_matrix(b_in, 4)
    basis_out, _ = sh_basis_matrix(b_out, 4)
    coefs = rng.normal(size=(2, 2, 1, basis_in.shape[1]))
    coefs[..., 0] = 50.0  # keep the function positive so clipping does not interfere
    signal_in = coefs @ basis_in.T
    signal_out = coefs @ basis_out.T
    assert signal_out.min() > 0
    matrix = sh_prediction_matrix(b_in, b_out, 4, 0.0)
    np.testing.assert_allclose(
        signal_in.reshape(-1, 30) @ matrix.T, signal_out.reshape(-1, 60), rtol=1e-9, atol=1e-9
    )
    # higher order with lambda = 0 also reproduces it (the fit space contains it)
    pred = _predict(SHUpsampler(order=6, lambda_=0.0), signal_in, b_in, b_out)
    np.testing.assert_allclose(pred, signal_out, rtol=1e-5)


def test_sh_prediction_matrix_closed_form(dirs):
    b_in, b_out = dirs
    lam = 0.006
    basis_in, l_values = sh_basis_matrix(b_in, 4)
    basis_out, _ = sh_basis_matrix(b_out, 4)
    reg = np.diag((l_values * (l_values + 1.0)) ** 2)
    expected = basis_out @ np.linalg.solve(basis_in.T @ basis_in + lam * reg, basis_in.T)
    np.testing.assert_allclose(sh_prediction_matrix(b_in, b_out, 4, lam), expected, atol=1e-10)


def test_sh_constant_signal_preserved(dirs):
    b_in, b_out = dirs
    matrix = sh_prediction_matrix(b_in, b_out, 8, 0.006)
    # regularisation leaves l=0 untouched: a constant is reproduced exactly
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-8)


def test_sh_underdetermined_is_finite():
    b_in = fibonacci_hemisphere(5)
    b_out = fibonacci_hemisphere(20, seed=0)
    for lam in (0.0, 0.006):
        matrix = sh_prediction_matrix(b_in, b_out, 2, lam)
        assert np.all(np.isfinite(matrix))
    # with regularisation, a constant is still reproduced
    np.testing.assert_allclose(sh_prediction_matrix(b_in, b_out, 2, 0.006).sum(1), 1.0, atol=1e-8)


def test_chunking_does_not_change_result(dirs, crossing):
    b_in, b_out = dirs
    matrix = sh_prediction_matrix(b_in, b_out, 6, 0.006)
    mask = np.ones(crossing[0].shape[:3], dtype=bool)
    mask[0, 0, 0] = False
    a = apply_direction_matrix(crossing[0], matrix, mask, chunk_voxels=1)
    b = apply_direction_matrix(crossing[0], matrix, mask)
    np.testing.assert_array_equal(a, b)


def test_interp_reproduces_acquired_directions(dirs, crossing):
    b_in, _ = dirs
    targets = np.concatenate([b_in[[0, 7, 21]], -b_in[[3, 29]]])
    pred = _predict(InterpUpsampler(), crossing[0], b_in, targets)
    expected = crossing[0][..., [0, 7, 21, 3, 29]]
    np.testing.assert_allclose(pred, expected, rtol=1e-5)
    weights = interp_weights(b_in, targets, 3)
    np.testing.assert_allclose(weights[3, 3], 1.0, atol=1e-10)
    np.testing.assert_allclose(np.delete(weights[3], 3), 0.0, atol=1e-10)


def test_interp_antipodal_symmetry(dirs, crossing):
    b_in, b_out = dirs
    np.testing.assert_allclose(interp_weights(b_in, -b_out, 3), interp_weights(b_in, b_out, 3))
    engine = InterpUpsampler()
    np.testing.assert_allclose(
        _predict(engine, crossing[0], b_in, -b_out), _predict(engine, crossing[0], b_in, b_out)
    )
    # flipping acquired directions (same signal) must not change anything either
    flipped = b_in.copy()
    flipped[::2] *= -1
    np.testing.assert_allclose(
        interp_weights(flipped, b_out, 3), interp_weights(b_in, b_out, 3), atol=1e-12
    )


def test_interp_flip_matters():
    # Target g between b1 and b2, but b2 is stored as its antipode: without the flip the
    # coefficient of b2 would be negative and the prediction would cancel the signal.
    b1 = np.array([1.0, 0.0, 0.0])
    b2 = np.array([0.0, 1.0, 0.0])
    b3 = np.array([0.0, 0.0, 1.0])
    refs = np.stack([b1, -b2, b3])
    g = np.array([[1.0, 1.0, 0.0]]) / np.sqrt(2)
    weights = interp_weights(refs, g, 2)
    np.testing.assert_allclose(weights, [[1 / np.sqrt(2), 1 / np.sqrt(2), 0.0]], atol=1e-12)


def test_interp_weights_sparse(dirs):
    b_in, b_out = dirs
    weights = interp_weights(b_in, b_out, 3)
    assert weights.shape == (60, 30)
    assert np.all(np.count_nonzero(weights, axis=1) <= 3)
    # more neighbours than acquired directions are capped
    assert interp_weights(b_in[:2], b_out, 5).shape == (60, 2)


@pytest.mark.parametrize("engine_name", ["sh", "interp"])
def test_no_targets(engine_name, dirs, single):
    b_in, _ = dirs
    pred = _predict(get_engine(engine_name), single[0], b_in, np.zeros((0, 3)))
    assert pred.shape == (*single[0].shape[:3], 0) and pred.dtype == np.float32
