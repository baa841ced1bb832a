"""The SH-field model: features, network, sampler, engine and training (CPU, tiny configs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal
from qid2_bidsapp.errors import Qid2Error
from qid2_bidsapp.model.field_config import FieldConfig
from qid2_bidsapp.model.field_features import (
    coefficient_scales,
    context_indices,
    evaluation_matrix,
    scalar_values,
    shell_features,
    slice_condition,
)
from qid2_bidsapp.shm import sh_prediction_matrix

from .helpers import (
    noise_free_real_shell,
    noisy_phantom_shell,
    save_tiny_field_model,
    tensor_coefficient_slab,
)

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (20, 18, 5)
BVAL = 1000.0


@pytest.fixture(scope="module")
def shell():
    return noisy_phantom_shell(SHAPE, BVAL)


@pytest.fixture(scope="module")
def random_field_model(tmp_path_factory):
    return save_tiny_field_model(tmp_path_factory.mktemp("models") / "field")


@pytest.fixture(scope="module")
def untrained_field_model(tmp_path_factory):
    return save_tiny_field_model(tmp_path_factory.mktemp("models") / "field0", random=False)


def _engine(folder, **options):
    from qid2_bidsapp.engines.base import get_engine

    settings = {"device": "cpu", "n_steps": 2, "n_samples": 2, "seed": 3, "symmetries": 1}
    settings.update(options)
    return get_engine("qid2", model_dir=str(folder), **settings)


# ----------------------------------------------------------------------------- config, features


def test_config_round_trip_and_checks():
    cfg = FieldConfig.tiny(context_slices=2)
    assert FieldConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.condition_channels == 5 * cfg.features_per_slice + 3
    with pytest.raises(ValueError, match="order_scales"):
        FieldConfig(order_scales=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown"):
        FieldConfig.from_dict({"typo": 1})


def test_regularised_fit_is_the_sh_engine_prediction(shell):
    signal, b0, brain, bvecs = shell
    cfg = FieldConfig.tiny()
    _, prior = shell_features(signal, b0, brain, bvecs, cfg, s0_ref=1.0)
    targets = hemisphere_directions(7, seed=5)
    from_prior = prior.astype(np.float64) @ evaluation_matrix(targets, cfg).T
    ratio = signal / np.maximum(b0[..., None], 1e-6)
    expected = ratio @ sh_prediction_matrix(bvecs, targets, cfg.sh_order, cfg.prior_lambda).T
    inside = brain & (ratio.max(axis=-1) < cfg.signal_clip)
    np.testing.assert_allclose(from_prior[inside], expected[inside], atol=1e-4)


@pytest.mark.parametrize("prior", ["sh", "dti"])
def test_features_do_not_depend_on_signal_units(shell, prior):
    signal, b0, brain, bvecs = shell
    cfg = FieldConfig.tiny(prior=prior)
    base, _ = shell_features(signal, b0, brain, bvecs, cfg)
    for scale in (1e-3, 1e6):
        scaled, _ = shell_features(signal * scale, b0 * scale, brain, bvecs, cfg)
        np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prior", ["sh", "dti"])
def test_features_do_not_depend_on_direction_order(shell, prior):
    signal, b0, brain, bvecs = shell
    cfg = FieldConfig.tiny(prior=prior)
    order = np.random.default_rng(1).permutation(len(bvecs))
    a, _ = shell_features(signal, b0, brain, bvecs, cfg)
    b, _ = shell_features(signal[..., order], b0, brain, -bvecs[order], cfg)  # and sign flips
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_slice_condition_stacks_context_with_repeated_edges():
    cfg = FieldConfig.tiny(context_slices=1)
    feats = np.random.default_rng(0).normal(size=(6, 5, 4, cfg.features_per_slice))
    feats = feats.astype(np.float32)
    cond = slice_condition(feats, 0, 1, scalar_values(1000, 30, 2))
    assert cond.shape == (cfg.condition_channels, 6, 5)
    per = cfg.features_per_slice
    np.testing.assert_array_equal(cond[:per], np.moveaxis(feats[:, :, 0], -1, 0))
    np.testing.assert_array_equal(cond[per : 2 * per], cond[:per])  # slice -1 -> slice 0
    np.testing.assert_array_equal(cond[2 * per : 3 * per], np.moveaxis(feats[:, :, 1], -1, 0))
    np.testing.assert_allclose(cond[-3:, 0, 0], [1.0, np.sqrt(6 / 30), 1 / np.sqrt(2)])
    assert context_indices(3, 4, 2).tolist() == [1, 2, 3, 3, 3]


# ----------------------------------------------------------------------------- network


def test_untrained_network_returns_the_prior():
    from qid2_bidsapp.model.field_network import ShFieldNetwork

    cfg = FieldConfig.tiny()
    net = ShFieldNetwork(cfg).eval()
    cond = torch.randn(2, cfg.condition_channels, 16, 16)
    x = torch.randn(2, cfg.n_coefficients, 16, 16)
    out = net(x, cond, torch.tensor([0, 50]))
    torch.testing.assert_close(out, cond[:, net.prior_channels])
    with pytest.raises(ValueError, match="multiples"):
        net(x[..., :15], cond[..., :15], torch.tensor([0, 1]))


def test_keep_prior_mean_leaves_only_the_mean_signal_to_the_prior():
    from qid2_bidsapp.model.field_network import ShFieldNetwork

    cfg = dataclasses.replace(FieldConfig.tiny(), keep_prior_mean=True)
    torch.manual_seed(0)
    net = ShFieldNetwork(cfg).eval()
    with torch.no_grad():  # a trained-like network: a non-zero correction everywhere
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond = torch.randn(2, cfg.condition_channels, 16, 16)
    x = torch.randn(2, cfg.n_coefficients, 16, 16)
    out = net(x, cond, torch.tensor([0, 50]))
    prior = cond[:, net.prior_channels]
    torch.testing.assert_close(out[:, 0], prior[:, 0])  # order 0: the prior's, exactly
    assert (out[:, 1:] - prior[:, 1:]).abs().min(dim=1).values.mean() > 1e-4
    plain = ShFieldNetwork(dataclasses.replace(cfg, keep_prior_mean=False)).eval()
    plain.load_state_dict(net.state_dict())  # same weights (the mask is no parameter)
    changed = plain(x, cond, torch.tensor([0, 50]))
    assert (changed[:, 0] - prior[:, 0]).abs().max() > 1e-4
    torch.testing.assert_close(changed[:, 1:], out[:, 1:])


def test_tensor_fa_matches_dipy_on_a_tensor_field():
    from dipy.reconst.dti import fractional_anisotropy

    from qid2_bidsapp.model.field_network import TensorFA

    slab = tensor_coefficient_slab(0)
    cfg = FieldConfig.tiny()
    first = slab.coefs[:, :, 0].astype(np.float32) * coefficient_scales(cfg)
    model = torch.from_numpy(np.moveaxis(first, -1, 0))[None].float()
    fa = TensorFA(cfg)(model, torch.tensor([slab.bval]))[0].numpy()
    # the field was made from axially symmetric tensors with known eigenvalues
    x, y = np.meshgrid(*[np.linspace(0, np.pi, n) for n in slab.coefs.shape[:2]], indexing="ij")
    lam_perp = 1.7e-3 * (1 - (0.4 + 0.4 * np.sin(x + y) ** 2))
    evals = np.stack([np.full_like(lam_perp, 1.7e-3), lam_perp, lam_perp], axis=-1)
    np.testing.assert_allclose(fa, fractional_anisotropy(evals), atol=0.02)


def test_fa_bias_term_scores_a_shrunk_field_and_not_errors_that_cancel():
    from qid2_bidsapp.model.field_train import FieldLoss

    slab = tensor_coefficient_slab(0)
    cfg = FieldConfig.tiny()
    first = slab.coefs[:, :, 0].astype(np.float32) * coefficient_scales(cfg)
    target = torch.from_numpy(np.moveaxis(first, -1, 0))[None].float()
    mask = torch.ones(target.shape[:1] + target.shape[2:])
    bval = torch.tensor([slab.bval])
    anisotropic = torch.ones(target.shape[1], dtype=torch.bool)
    anisotropic[0] = False  # l = 0 is the mean signal
    shrunk = target.clone()
    shrunk[:, anisotropic] *= 0.7  # every voxel less anisotropic: a bias
    mixed = target.clone()  # less anisotropic on the left half, more on the right
    half = target.shape[2] // 2
    mixed[:, anisotropic, :half] *= 0.7
    mixed[:, anisotropic, half:] *= 1.3
    plain = FieldLoss(cfg, 1.0, 4.0)
    with_bias = FieldLoss(cfg, 1.0, 4.0, fa_bias_weight=10.0)
    loss_plain, parts_shrunk = plain(shrunk, target, mask, bval)
    loss_bias, _ = with_bias(shrunk, target, mask, bval)
    _, parts_mixed = plain(mixed, target, mask, bval)
    fa_error = plain.fa(shrunk, bval) - plain.fa(target, bval)
    assert parts_shrunk["fa_bias"] == pytest.approx(float(fa_error.mean().abs()), rel=1e-5)
    assert parts_shrunk["fa_bias"] > 0.05
    assert loss_bias.item() == pytest.approx(loss_plain.item() + 10 * parts_shrunk["fa_bias"])
    # errors of both signs in one example largely cancel in the bias, not in the MAE
    assert parts_mixed["fa_bias"] < 0.5 * parts_mixed["fa_mae"]
    assert with_bias(target, target, mask, bval)[1]["fa_bias"] < 1e-6


def test_split_fa_bias_term_sees_grey_and_white_matter_biases_that_cancel():
    from qid2_bidsapp.model.field_train import FieldLoss

    slab = tensor_coefficient_slab(0)
    cfg = FieldConfig.tiny()
    first = slab.coefs[:, :, 0].astype(np.float32) * coefficient_scales(cfg)
    target = torch.from_numpy(np.moveaxis(first, -1, 0))[None].float()
    mask = torch.ones(target.shape[:1] + target.shape[2:])
    bval = torch.tensor([slab.bval])
    plain = FieldLoss(cfg, 1.0, 4.0, fa_bias_weight=10.0)
    fa_true = plain.fa(target, bval)
    split = float(fa_true.median())
    high = fa_true >= split
    anisotropic = torch.ones(target.shape[1], dtype=torch.bool)
    anisotropic[0] = False
    # low-FA voxels made more anisotropic, high-FA voxels less: the biases cancel overall
    pulled = target.clone()
    factor = torch.where(high, 0.8, 1.25)[:, None]  # (1, 1, H, W)
    pulled[:, anisotropic] = target[:, anisotropic] * factor
    err = plain.fa(pulled, bval) - fa_true
    low_bias, high_bias = err[~high].mean(), err[high].mean()
    assert low_bias > 0.01 and high_bias < -0.01
    stratified = FieldLoss(cfg, 1.0, 4.0, fa_bias_weight=10.0, fa_bias_split=split)
    one = plain(pulled, target, mask, bval)[1]["fa_bias"]
    two = stratified(pulled, target, mask, bval)[1]["fa_bias"]
    share = high.float().mean()
    expected = (1 - share) * low_bias.abs() + share * high_bias.abs()
    assert two == pytest.approx(float(expected), rel=1e-4)
    assert one == pytest.approx(float(err.mean().abs()), rel=1e-4) and one < 0.5 * two
    assert stratified(target, target, mask, bval)[1]["fa_bias"] < 1e-6


# ----------------------------------------------------------------------------- engine


def test_engine_output_is_antipodally_symmetric(shell, random_field_model):
    signal, b0, brain, bvecs = shell
    targets = hemisphere_directions(6, seed=7)
    engine = _engine(random_field_model)
    plus = engine.predict(signal, b0, bvecs, targets, BVAL, brain)
    minus = engine.predict(signal, b0, bvecs, -targets, BVAL, brain)
    np.testing.assert_allclose(plus, minus, rtol=1e-5, atol=1e-3)
    assert plus[brain].std() > 0


def test_engine_output_does_not_depend_on_input_order(shell, random_field_model):
    signal, b0, brain, bvecs = shell
    targets = hemisphere_directions(6, seed=7)
    order = np.random.default_rng(2).permutation(len(bvecs))
    engine = _engine(random_field_model)
    a = engine.predict(signal, b0, bvecs, targets, BVAL, brain)
    b = engine.predict(signal[..., order], b0, bvecs[order], targets, BVAL, brain)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2)


def test_small_field_of_view_runs_on_a_mirrored_training_size_window(shell, random_field_model):
    # a crop shorter than half the training crop runs on a 64-voxel window centred on the
    # brain (the image mirrored around it); a longer one on the crop itself
    from qid2_bidsapp.model.field_features import MIN_NETWORK_SIZE, network_window

    assert network_window(3, 13, 0, 18) == (8 - MIN_NETWORK_SIZE // 2, 8 + MIN_NETWORK_SIZE // 2)
    assert network_window(10, 90, 6, 94) == (6, 94)
    assert network_window(4, 40, 0, 44) == (0, 44)
    signal, b0, brain, bvecs = shell
    targets = hemisphere_directions(4, seed=7)
    engine = _engine(random_field_model, n_samples=1)
    out = engine.predict(signal, b0, bvecs, targets, BVAL, brain)
    assert np.all(np.isfinite(out)) and out[brain].std() > 0


def test_engine_is_seeded_and_reports_uncertainty(shell, random_field_model):
    signal, b0, brain, bvecs = shell
    targets = hemisphere_directions(4, seed=7)
    a_mean, a_std = _engine(random_field_model).predict_with_uncertainty(
        signal, b0, bvecs, targets, BVAL, brain
    )
    b_mean, _ = _engine(random_field_model, batch_size=1).predict_with_uncertainty(
        signal, b0, bvecs, targets, BVAL, brain
    )
    c_mean, _ = _engine(random_field_model, seed=4).predict_with_uncertainty(
        signal, b0, bvecs, targets, BVAL, brain
    )
    # batch size: no effect beyond float rounding (oneDNN picks kernels by batch shape)
    np.testing.assert_allclose(a_mean, b_mean, rtol=1e-4, atol=1e-2)
    assert not np.allclose(a_mean, c_mean)
    assert a_std[brain].max() > 0 and np.all(a_std[~brain] == 0)
    settings = _engine(random_field_model).settings()
    assert settings["model_kind"] == "sh-field" and settings["amp"] is False


def test_precision_of_the_network():
    from qid2_bidsapp.model.inference import autocast_dtype, cpu_has_bfloat16

    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "float32", cpu_bfloat16=True) is None
    assert autocast_dtype(cpu, "bfloat16") is torch.bfloat16
    assert autocast_dtype(cpu, "auto") is None  # a model validated in float32 on the CPU
    expected = torch.bfloat16 if cpu_has_bfloat16() else None
    assert autocast_dtype(cpu, "auto", cpu_bfloat16=True) is expected
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype(cpu, "fp8")
    cfg = FieldConfig.tiny()
    defaults = {k: dict(v) for k, v in cfg.sampler_defaults.items()}
    defaults["cpu"]["precision"] = "bfloat16"
    assert FieldConfig.tiny(sampler_defaults=defaults).sampler_defaults["cpu"]["precision"]
    defaults["cpu"]["precision"] = "half"
    with pytest.raises(ValueError, match="precision"):
        FieldConfig.tiny(sampler_defaults=defaults)
    defaults["cpu"]["precision"] = "float32"
    defaults["cuda"]["precision"] = "float32"  # CUDA's precision is not a model setting
    with pytest.raises(ValueError, match="'cuda'"):
        FieldConfig.tiny(sampler_defaults=defaults)


def test_engine_runs_in_bfloat16_when_asked(shell, random_field_model, tmp_path):
    from qid2_bidsapp.model.inference import cpu_has_bfloat16

    signal, b0, brain, bvecs = shell
    targets = hemisphere_directions(4, seed=7)
    full = _engine(random_field_model, temperature=0.0, n_samples=1)
    half = _engine(random_field_model, temperature=0.0, n_samples=1, precision="bfloat16")
    expected = full.predict(signal, b0, bvecs, targets, BVAL, brain)
    mixed = half.predict(signal, b0, bvecs, targets, BVAL, brain)
    assert half.settings()["precision"] == "bfloat16" and half.settings()["amp"] is True
    assert full.settings()["precision"] == "float32"
    assert not np.array_equal(mixed, expected)  # it did run in another precision
    scale = np.abs(expected[brain]).mean()
    assert np.abs(mixed - expected)[brain].mean() < 0.05 * scale
    # "auto" follows the model: bfloat16 on the CPU only where the model names it
    defaults = {k: dict(v) for k, v in FieldConfig.tiny().sampler_defaults.items()}
    defaults["cpu"]["precision"] = "bfloat16"
    folder = save_tiny_field_model(tmp_path / "bf16", sampler_defaults=defaults)
    auto = _engine(folder, temperature=0.0, n_samples=1)
    auto.predict(signal, b0, bvecs, targets[:1], BVAL, brain)
    assert auto.settings()["precision"] == ("bfloat16" if cpu_has_bfloat16() else "float32")
    assert auto.settings()["precision_requested"] == "auto"
    with pytest.raises(Qid2Error, match="precision must be one of"):
        _engine(random_field_model, precision="fp8")
    # qid2-eval names the model and the precision its qid2 rows ran in
    from qid2_bidsapp.cli.eval import _qid2_methods, build_parser

    notes = []
    args = build_parser().parse_args(
        ["--phantom", "1", "--out", str(tmp_path / "ev"), "--model", str(folder), "--device", "cpu"]
    )
    assert [m.label for m in _qid2_methods(args, notes)] == ["qid2"]
    expected = "bfloat16" if cpu_has_bfloat16() else "float32"
    assert any(f"device cpu, precision {expected}" in note for note in notes), notes


def test_untrained_engine_returns_the_sh_prior(shell, untrained_field_model):
    signal, b0, brain, bvecs = shell
    targets = hemisphere_directions(5, seed=8)
    engine = _engine(untrained_field_model, temperature=0.0, n_samples=1)
    out = engine.predict(signal, b0, bvecs, targets, BVAL, brain)
    cfg = engine.config
    ratio = np.clip(signal / np.maximum(b0[..., None], 1e-6), 0, cfg.signal_clip)
    prior = ratio @ sh_prediction_matrix(bvecs, targets, cfg.sh_order, cfg.prior_lambda).T
    expected = np.clip(prior, 0, None) * b0[..., None]
    np.testing.assert_allclose(out[brain], expected[brain], rtol=1e-3, atol=0.5)


def test_log_mean_scale_gives_a_prediction_the_priors_mean_log_signal(shell):
    from dipy.data import default_sphere

    from qid2_bidsapp.model.field_features import log_mean_scale

    signal, b0, brain, bvecs = shell
    cfg = FieldConfig.tiny()
    _, prior = shell_features(signal, b0, brain, bvecs, cfg, bval=BVAL)
    prior = prior[brain].astype(np.float64)
    # another angular shape with another mean: orders >= 2 sharpened, all of it dimmed
    orders = np.asarray([0] + [2] * 5 + [4] * 9 + [6] * 13)
    predicted = prior * np.where(orders > 0, 1.3, 1.0) * 0.8
    scale = log_mean_scale(predicted, prior, cfg)
    evaluate = evaluation_matrix(default_sphere.vertices, cfg)

    def mean_log(c):
        return np.log(c @ evaluate.T).mean(-1)

    assert np.all(prior @ evaluate.T > 0.01)  # above the floor: the identity below is exact
    np.testing.assert_allclose(mean_log(scale[:, None] * predicted), mean_log(prior), atol=1e-9)
    assert np.abs(mean_log(predicted) - mean_log(prior)).min() > 0.1
    np.testing.assert_allclose(log_mean_scale(0.8 * prior, prior, cfg), 1 / 0.8)
    # brightening beyond 2x (noise-floor voxels) is not followed all the way; darkening is, so
    # a prediction far brighter than the acquired directions' tensor takes its mean signal
    np.testing.assert_allclose(log_mean_scale(0.1 * prior, prior, cfg), 2.0)
    np.testing.assert_allclose(log_mean_scale(10 * prior, prior, cfg), 0.1)


def test_log_mean_from_prior_rescales_each_voxel_to_the_priors_mean_log_signal(shell, tmp_path):
    from dipy.data import default_sphere

    signal, b0, brain, bvecs = shell
    targets = default_sphere.vertices  # the sphere log_mean_scale averages over
    outputs = {}
    for name, random, overrides in [
        ("prior", False, {}),
        ("plain", True, {}),
        ("matched", True, {"log_mean_from_prior": True}),
    ]:
        folder = save_tiny_field_model(tmp_path / name, random=random, **overrides)
        engine = _engine(folder, temperature=0.0, n_samples=1)
        out = engine.predict(signal, b0, bvecs, targets, BVAL, brain)
        outputs[name] = out[brain] / b0[brain][:, None]
    # voxels where the random network's signal is positive everywhere (no clipping at 0)
    positive = (outputs["plain"].min(-1) > 0.01) & (outputs["prior"].min(-1) > 0.01)
    assert positive.sum() > 50
    logs = {name: np.log(ratio[positive]) for name, ratio in outputs.items()}
    gap = logs["prior"].mean(-1) - logs["plain"].mean(-1)  # log of the unclipped factor
    inside = gap < np.log(2.0) - 0.01  # the factor is capped at 2 only
    assert inside.sum() > 20 and np.abs(gap[inside]).max() > 0.01
    np.testing.assert_allclose(
        logs["matched"].mean(-1)[inside], logs["prior"].mean(-1)[inside], atol=1e-3
    )
    # one factor per voxel: the angular shape of the network's prediction is kept; it is
    # capped at 2 where the prior is more than twice as bright as the network
    shift = logs["matched"] - logs["plain"]
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1], shift.shape), atol=1e-4)
    expected = np.minimum(gap, np.log(2.0))
    assert (gap < -np.log(2.0)).any()  # a voxel darkened by more than 2x: not clipped
    np.testing.assert_allclose(shift[:, 0], expected, atol=2e-3)
    # the engine option (qid2-eval's log_mean variant key) switches it on a model without it
    switched = _engine(tmp_path / "plain", temperature=0.0, n_samples=1, log_mean_from_prior=True)
    out = switched.predict(signal, b0, bvecs, targets, BVAL, brain)
    np.testing.assert_allclose(out[brain] / b0[brain][:, None], outputs["matched"], atol=1e-5)
    assert switched.settings()["prior"]["log_mean_from_prior"] is True


def test_evaluation_variants_switch_the_mean_signal_rescaling():
    import argparse

    from qid2_bidsapp.cli.eval import _variant

    assert _variant("raw:log_mean=0") == ("raw", {"log_mean_from_prior": False})
    assert _variant("m:log_mean=1,symmetries=4") == (
        "m",
        {"log_mean_from_prior": True, "symmetries": 4},
    )
    assert _variant("coronal:slice_axis=1") == ("coronal", {"slice_axis": 1})
    with pytest.raises(argparse.ArgumentTypeError, match="bad value"):
        _variant("m:log_mean=yes")


def test_network_passes_do_not_grow_with_the_number_of_targets(shell, random_field_model):
    signal, b0, brain, bvecs = shell
    engine = _engine(random_field_model, batch_size=8)  # every slice in one batch
    calls = []
    hook = engine.network.register_forward_hook(lambda *args: calls.append(1))
    try:
        engine.predict(signal, b0, bvecs, hemisphere_directions(4, seed=1), BVAL, brain)
        few = len(calls)
        calls.clear()
        engine.predict(signal, b0, bvecs, hemisphere_directions(60, seed=1), BVAL, brain)
    finally:
        hook.remove()
    assert len(calls) == few == 2  # n_steps passes over all slices (one batch)


def test_field_model_folder_round_trip(random_field_model):
    from qid2_bidsapp.model.checkpoint import load_model, read_model_config

    network, config, info = load_model(random_field_model)
    assert isinstance(config, FieldConfig)
    assert read_model_config(random_field_model) == config
    assert info["model_id"].startswith("field-")


# ----------------------------------------------------------------------------- training


def test_example_is_built_like_inference():
    from qid2_bidsapp.model.field_data import Protocol, make_field_example

    cfg = FieldConfig.tiny()
    slab = tensor_coefficient_slab(1)
    a = make_field_example(slab, np.random.default_rng(5), cfg, crop=16)
    b = make_field_example(slab, np.random.default_rng(5), cfg, crop=16)
    np.testing.assert_array_equal(a["condition"], b["condition"])
    assert a["condition"].shape == (cfg.condition_channels, 16, 16)
    assert a["target"].shape == (cfg.n_coefficients, 16, 16)
    proto = Protocol(n_directions=(30, 30), snr=(1e6, 1e6), n_b0=(6, 6))
    clean = make_field_example(slab, np.random.default_rng(6), cfg, crop=16, protocol=proto)
    m = clean["mask"] > 0
    start = cfg.context_slices * cfg.features_per_slice
    order2 = clean["condition"][start : start + 6]
    # almost no noise and 30 directions: the order-2 least-squares fit is the target's
    np.testing.assert_allclose(order2[:, m], clean["target"][:6][:, m], atol=0.05)


def _slab_folders(tmp_path, train_seeds=(0,), val_seed=9):
    """Write training slabs (one per seed) and a one-slab validation set; return the folders."""
    from qid2_bidsapp.sim.slabs import write_slab

    slabs = tmp_path / "slabs"
    slabs.mkdir()
    for k, seed in enumerate(train_seeds):
        write_slab(tensor_coefficient_slab(seed), slabs / f"slab-0-{k:06d}.npz")
    val = tmp_path / "run" / "val_slabs"
    val.mkdir(parents=True)
    write_slab(tensor_coefficient_slab(val_seed), val / "slab-1-000000.npz")
    return slabs, tmp_path / "run"


def test_tiny_training_lowers_the_loss(tmp_path):
    from qid2_bidsapp.model.field_train import FieldTrainConfig, FieldTrainer

    slabs, run = _slab_folders(tmp_path, (0, 1, 2))
    config = FieldTrainConfig(
        slabs=str(slabs),
        output=str(run),
        model=FieldConfig.tiny().to_dict(),
        batch_size=4,
        crop=16,
        steps=60,
        lr=3e-3,
        warmup_steps=5,
        n_val_slabs=1,
        n_val_examples=4,
        num_threads=1,
        protocol={"snr": [20, 20]},
    )
    trainer = FieldTrainer(config, echo=lambda *_: None)
    before = trainer.validate()
    losses = [trainer.train_step()["loss"] for _ in range(60)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    after = trainer.validate()
    assert after["net_coef_mse"] < before["net_coef_mse"]
    trainer.save_state()
    again = FieldTrainer(config, echo=lambda *_: None)
    again.load_state()
    assert again.step == 60


def test_real_examples_score_the_truth_as_perfect():
    from qid2_bidsapp.model.field_data import (
        _take,
        make_real_example,
        stack_real_examples,
    )
    from qid2_bidsapp.model.field_network import ShFieldNetwork
    from qid2_bidsapp.model.field_train import real_signal_loss

    cfg = FieldConfig.tiny()
    slab, shell = noise_free_real_shell(cfg.sh_order)
    coefs = slab.coefs.astype(np.float32)
    rng = np.random.default_rng(0)
    examples = [make_real_example(shell, rng, cfg, crop=16) for _ in range(3)]
    real = stack_real_examples(examples)
    assert real["real_target"].shape == (3, 48, 16, 16)
    for e in examples:
        n_in, n_hidden = e["meta"]["n_inputs"], e["meta"]["n_hidden"]
        assert n_in >= 6 and n_hidden >= 3 and n_in + n_hidden == 20
    scales = coefficient_scales(cfg).astype(np.float32)
    truth = np.stack(
        [
            np.moveaxis(_take(coefs[:, :, e["meta"]["slice"]], e["meta"]["corner"], 16), -1, 0)
            * scales[:, None, None]
            for e in examples
        ]
    )
    assert real_signal_loss(torch.from_numpy(truth), real).item() < 1e-3
    prior = torch.from_numpy(real["condition"])[:, ShFieldNetwork(cfg).prior_channels]
    assert (
        real_signal_loss(prior, real).item()
        > 10 * real_signal_loss(torch.from_numpy(truth), real).item()
    )


def test_qid2_train_trains_and_exports_a_field_model(tmp_path):
    import json

    from qid2_bidsapp.cli.train import main as train_main
    from qid2_bidsapp.model.checkpoint import load_model

    _slab_folders(tmp_path, (0, 1), val_seed=7)
    config = {
        "kind": "sh-field",
        "name": "tiny-field",
        "slabs": "slabs",
        "output": "run",
        "model": FieldConfig.tiny().to_dict(),
        "batch_size": 2,
        "crop": 16,
        "steps": 3,
        "n_val_slabs": 1,
        "n_val_examples": 2,
        "num_threads": 1,
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    assert train_main([str(path)]) == 0
    folder = tmp_path / "run" / "tiny-field"
    _, cfg, info = load_model(folder)
    assert isinstance(cfg, FieldConfig) and info["training"]["steps"] == 3
    card = (folder / "MODEL_CARD.md").read_text()
    assert "SH-field" in card and "CPU-hours" in card
    size = (folder / "model.safetensors").stat().st_size
    assert train_main([str(path), "--export", "--export-dtype", "float16"]) == 0
    assert (folder / "model.safetensors").stat().st_size < 0.6 * size
    _, _, half = load_model(folder)
    assert half["training"]["weights_dtype"] == "float16"
    assert cfg.sampler_defaults["cpu"].get("precision", "float32") == "float32"
    # --no-resume with --export must not delete the training state it exports from
    state = tmp_path / "run" / "training_state.pt"
    before = state.read_bytes()
    args = [str(path), "--export", "--no-resume", "--export-cpu-precision", "bfloat16"]
    assert train_main(args) == 0
    assert state.read_bytes() == before
    _, cfg, _ = load_model(folder)
    assert cfg.sampler_defaults["cpu"]["precision"] == "bfloat16"
    assert cfg.sampler_defaults["cuda"].get("precision", "float32") == "float32"


# ----------------------------------------------------------------------------- tensor prior


def test_untrained_tensor_prior_model_reproduces_dti_on_the_acquired_directions(tmp_path):
    from qid2_bidsapp.data.example import hemisphere_directions
    from qid2_bidsapp.engines.base import UncertaintyRecorder, get_engine
    from qid2_bidsapp.gradients import GradientTable
    from qid2_bidsapp.qc import fit_dti
    from qid2_bidsapp.upsampling import plan_targets, upsample_shells

    folder = save_tiny_field_model(tmp_path / "dti0", random=False, prior="dti", noise_input=True)
    bvecs = np.vstack([np.zeros((2, 3)), hemisphere_directions(15, seed=4)])
    bvals = np.r_[0.0, 0.0, np.full(15, 1000.0)]
    clean, brain = phantom_signal((20, 18, 5), bvals, bvecs)
    rng = np.random.default_rng(1)
    data = np.abs(clean + rng.normal(0, 15, clean.shape)).astype(np.float32)
    table = GradientTable(bvals, bvecs)
    engine = UncertaintyRecorder(
        get_engine("qid2", model_dir=str(folder), device="cpu", temperature=0.0, n_samples=1)
    )
    assert engine.needs_noise
    plans = plan_targets(table, sorted(table.shells), n_targets=30)
    synth, sb, sg, _ = upsample_shells(data, table, plans, engine, brain)
    merged = np.concatenate([data, synth], axis=-1)
    fa_merged = fit_dti(merged, np.r_[bvals, sb], np.vstack([bvecs, sg]), brain).fa
    fa_acquired = fit_dti(data, bvals, bvecs, brain).fa
    assert np.abs(fa_merged - fa_acquired)[brain].mean() < 0.005
    assert engine.settings()["noise_sigma"] > 0


# ----------------------------------------------------------------------------- summary input


def test_window_summary_is_invariant_to_direction_order_and_tracks_anisotropy(shell):
    from qid2_bidsapp.model.field_features import SUMMARY_QUANTILES, window_summary

    signal, b0, brain, bvecs = shell
    cfg = FieldConfig.tiny(prior="dti", summary_input=True)
    order = np.random.default_rng(2).permutation(len(bvecs))
    feats, _ = shell_features(signal, b0, brain, bvecs, cfg)
    shuffled, _ = shell_features(signal[..., order], b0, brain, -bvecs[order], cfg)
    idx = context_indices(2, SHAPE[2], 1)
    a = window_summary(feats, idx, cfg)
    assert a.shape == (len(SUMMARY_QUANTILES),) and np.all(np.diff(a) >= 0) and a[-1] > 0
    np.testing.assert_allclose(a, window_summary(shuffled, idx, cfg), atol=1e-4)
    # an isotropic signal (every direction equal to the mean) has no anisotropy
    flat = np.repeat(signal.mean(axis=-1, keepdims=True), len(bvecs), axis=-1)
    iso, _ = shell_features(flat, b0, brain, bvecs, cfg)
    np.testing.assert_allclose(window_summary(iso, idx, cfg), 0.0, atol=1e-3)
    empty = feats.copy()
    empty[..., cfg.features_per_slice - 1] = 0  # no brain voxel in the window
    np.testing.assert_array_equal(window_summary(empty, idx, cfg), 0.0)


def test_summary_maps_are_appended_to_the_condition(shell):
    from qid2_bidsapp.model.field_features import window_summary

    signal, b0, brain, bvecs = shell
    plain = FieldConfig.tiny(prior="dti", noise_input=True)
    cfg = FieldConfig.tiny(prior="dti", noise_input=True, summary_input=True)
    assert cfg.condition_channels == plain.condition_channels + 4
    feats, _ = shell_features(signal, b0, brain, bvecs, cfg)
    scalars = scalar_values(1000, 12, 1, 0.05)
    cond = slice_condition(feats, 0, 1, scalars, cfg)
    assert cond.shape == (cfg.condition_channels, *SHAPE[:2])
    np.testing.assert_array_equal(cond[:-4], slice_condition(feats, 0, 1, scalars, plain))
    summary = window_summary(feats, context_indices(0, SHAPE[2], 1), cfg)
    np.testing.assert_allclose(cond[-4:, 3, 7], summary)


def test_a_model_gains_the_summary_maps_without_changing_its_output():
    from qid2_bidsapp.model.field_network import ShFieldNetwork, widen_input_weights

    from .helpers import randomise_weights

    plain = FieldConfig.tiny(prior="dti", noise_input=True)
    wide = FieldConfig.tiny(prior="dti", noise_input=True, summary_input=True)
    old = ShFieldNetwork(plain).eval()
    randomise_weights(old)
    new = ShFieldNetwork(wide).eval()
    new.load_state_dict(widen_input_weights(old.state_dict(), new))
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(2, plain.condition_channels, 16, 16, generator=gen)
    summary = torch.randn(2, 4, 1, 1, generator=gen).expand(2, 4, 16, 16)
    x = torch.randn(2, plain.n_coefficients, 16, 16, generator=gen)
    t = torch.tensor([0, 90])
    torch.testing.assert_close(new(x, torch.cat([cond, summary], 1), t), old(x, cond, t))
    with pytest.raises(ValueError, match="cannot widen"):
        widen_input_weights(new.state_dict(), old)


def test_a_model_gains_context_slices_without_changing_its_output(shell):
    """Widened from 1 to 2 context slices, the network reads the new outer slices with zero
    weights: its output on a real condition equals the old network's on the middle three."""
    from qid2_bidsapp.model.field_network import ShFieldNetwork, widen_input_weights

    from .helpers import randomise_weights

    signal, b0, brain, bvecs = shell
    narrow = FieldConfig.tiny(prior="dti", noise_input=True, context_slices=1)
    wide = FieldConfig.tiny(prior="dti", noise_input=True, context_slices=2)
    old = ShFieldNetwork(narrow).eval()
    randomise_weights(old)
    new = ShFieldNetwork(wide).eval()
    new.load_state_dict(widen_input_weights(old.state_dict(), new, old_context=1))
    feats, _ = shell_features(signal, b0, brain, bvecs, wide)
    scalars = scalar_values(1000, 12, 1, 0.05)
    z = 2  # the middle slice: slices 0..4 in the wide window, 1..3 in the narrow one
    cond_narrow = torch.from_numpy(slice_condition(feats, z, 1, scalars, narrow))[None]
    cond_wide = torch.from_numpy(slice_condition(feats, z, 2, scalars, wide))[None]
    h, w = cond_wide.shape[-2:]
    crop = (slice(None), slice(None), slice(0, h - h % 4), slice(0, w - w % 4))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, narrow.n_coefficients, h, w, generator=gen)[crop]
    t = torch.tensor([40])
    per_slice = wide.features_per_slice  # the outer slices carry signal, so their zero
    assert cond_wide[0, :per_slice].abs().sum() > 0  # weights are what keeps the output
    torch.testing.assert_close(new(x, cond_wide[crop], t), old(x, cond_narrow[crop], t))
    with pytest.raises(ValueError, match="cannot widen"):
        widen_input_weights(new.state_dict(), old, old_context=2)


def test_summary_model_engine_is_symmetric_and_order_independent(shell, tmp_path):
    signal, b0, brain, bvecs = shell
    folder = save_tiny_field_model(tmp_path / "summary", prior="dti", summary_input=True)
    engine = _engine(folder)
    targets = hemisphere_directions(7, seed=9)
    both = np.vstack([targets, -targets])
    a = engine.predict(signal, b0, bvecs, both, BVAL, brain)
    np.testing.assert_allclose(a[..., :7], a[..., 7:], rtol=1e-5, atol=1e-3)
    assert a[brain].std() > 0
    order = np.random.default_rng(3).permutation(len(bvecs))
    b = engine.predict(signal[..., order], b0, bvecs[order], both, BVAL, brain)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2)


def test_fine_tune_adds_the_summary_maps_to_a_model_without_them(tmp_path):
    from qid2_bidsapp.model.field_network import INPUT_CONV_WEIGHT
    from qid2_bidsapp.model.field_train import FieldTrainConfig, FieldTrainer

    slabs, run = _slab_folders(tmp_path)
    plain = save_tiny_field_model(tmp_path / "plain", prior="dti")
    wide = FieldConfig.tiny(prior="dti", summary_input=True)
    config = FieldTrainConfig(
        slabs=str(slabs), output=str(run), model=wide.to_dict(), batch_size=2,
        crop=16, steps=2, n_val_slabs=1, n_val_examples=2, num_threads=1,
        init_weights=str(plain), prior_relative=True, fa_bias_weight=8.0, fa_bias_split=0.3,
    )  # fmt: skip
    trainer = FieldTrainer(config, echo=lambda *_: None)
    from qid2_bidsapp.model.checkpoint import load_model

    old, _, _ = load_model(plain)
    before = old.state_dict()[INPUT_CONV_WEIGHT]
    after = trainer.network.state_dict()[INPUT_CONV_WEIGHT]
    n = before.shape[1]
    torch.testing.assert_close(after[:, :n], before)
    assert after.shape[1] == n + 4 and not after[:, n:].any()
    parts = trainer.train_step()  # and it trains (with the weighted, split loss)
    assert np.isfinite(parts["loss"]) and parts["fa_bias"] >= 0
    other = FieldTrainConfig(**{**config.to_dict(), "model": {**wide.to_dict(), "sh_order": 4}})
    other.model["order_scales"] = [1.0, 10.0, 40.0]
    with pytest.raises(Exception, match="differs"):
        FieldTrainer(other, echo=lambda *_: None)


def test_fine_tune_adds_context_slices_to_a_model_folder(tmp_path):
    from qid2_bidsapp.model.checkpoint import load_model
    from qid2_bidsapp.model.field_network import INPUT_CONV_WEIGHT
    from qid2_bidsapp.model.field_train import FieldTrainConfig, FieldTrainer

    slabs, run = _slab_folders(tmp_path)
    narrow_folder = save_tiny_field_model(tmp_path / "narrow", prior="dti")
    old, narrow, _ = load_model(narrow_folder)
    assert narrow.context_slices == 1
    wide = FieldConfig.tiny(prior="dti", context_slices=2)
    config = FieldTrainConfig(
        slabs=str(slabs), output=str(run), model=wide.to_dict(), batch_size=2,
        crop=16, steps=2, n_val_slabs=1, n_val_examples=2, num_threads=1,
        init_weights=str(narrow_folder),
    )  # fmt: skip
    trainer = FieldTrainer(config, echo=lambda *_: None)
    before = old.state_dict()[INPUT_CONV_WEIGHT]
    after = trainer.network.state_dict()[INPUT_CONV_WEIGHT]
    c, f = wide.n_coefficients, wide.features_per_slice
    torch.testing.assert_close(after[:, :c], before[:, :c])
    torch.testing.assert_close(after[:, c + f : c + 4 * f], before[:, c : c + 3 * f])
    torch.testing.assert_close(after[:, c + 5 * f :], before[:, c + 3 * f :])
    assert not after[:, c : c + f].any() and not after[:, c + 4 * f : c + 5 * f].any()
    assert np.isfinite(trainer.train_step()["loss"])
    # a state file cannot be widened: its context is not recorded
    torch.save({"model": old.state_dict()}, tmp_path / "narrow.pt")
    other = FieldTrainConfig(
        **{
            **config.to_dict(),
            "output": str(tmp_path / "run2"),
            "init_weights": str(tmp_path / "narrow.pt"),
        }
    )
    with pytest.raises(Exception, match="cannot widen"):
        FieldTrainer(other, echo=lambda *_: None)


def test_prior_relative_loss_weighs_examples_by_their_priors_fa_error():
    from qid2_bidsapp.model.field_train import FieldLoss

    slab = tensor_coefficient_slab(0)
    cfg = FieldConfig.tiny()
    first = slab.coefs[:, :, 0].astype(np.float32) * coefficient_scales(cfg)
    one = torch.from_numpy(np.moveaxis(first, -1, 0))[None].float()
    target = torch.cat([one, one])
    mask = torch.ones(target.shape[:1] + target.shape[2:])
    bval = torch.full((2,), slab.bval)
    anisotropic = torch.ones(target.shape[1], dtype=torch.bool)
    anisotropic[0] = False
    pred = target.clone()
    pred[:, anisotropic] *= 0.9  # the same error in both examples
    prior = target.clone()
    prior[0, anisotropic] *= 0.95  # example 0: a good prior (high SNR) ...
    prior[1, anisotropic] *= 0.6  # ... example 1: a poor one
    plain = FieldLoss(cfg, 1.0, 4.0, fa_bias_weight=8.0)
    relative = FieldLoss(cfg, 1.0, 4.0, fa_bias_weight=8.0, prior_relative=True)
    loss_plain, parts_plain = plain(pred, target, mask, bval, prior)
    loss_rel, parts_rel = relative(pred, target, mask, bval, prior)
    assert parts_rel == pytest.approx(parts_plain)  # the reported parts are plain means
    # equal errors and equal masks: the weights average to 1, so the loss is unchanged ...
    assert loss_rel.item() == pytest.approx(loss_plain.item(), rel=1e-4)
    # ... but the example with the good prior now carries most of the gradient
    pred_a = pred.clone().requires_grad_(True)
    relative(pred_a, target, mask, bval, prior)[0].backward()
    g = pred_a.grad.abs().sum(dim=(1, 2, 3))
    assert g[0] > 3 * g[1]
    pred_b = pred.clone().requires_grad_(True)
    plain(pred_b, target, mask, bval, prior)[0].backward()
    h = pred_b.grad.abs().sum(dim=(1, 2, 3))
    assert h[0] == pytest.approx(h[1].item(), rel=1e-4)


@pytest.mark.parametrize("prior_relative", [False, True])
def test_wm_weight_moves_the_gradient_to_white_matter_and_leaves_the_parts_alone(prior_relative):
    from qid2_bidsapp.model.field_train import WM_FA_THRESHOLD, FieldLoss

    slab = tensor_coefficient_slab(0)
    cfg = FieldConfig.tiny()
    first = slab.coefs[:, :, 0].astype(np.float32) * coefficient_scales(cfg)
    target = torch.from_numpy(np.moveaxis(first, -1, 0))[None].float()
    half = target.shape[-1] // 2
    target[:, 1:, :, :half] *= 0.1  # left half: nearly isotropic (grey matter)
    mask = torch.ones(target.shape[:1] + target.shape[2:])
    bval = torch.full((1,), slab.bval)
    pred = target * 0.9
    prior = target * 0.8
    plain = FieldLoss(cfg, 1.0, 4.0, fa_bias_weight=8.0, prior_relative=prior_relative)
    wm = FieldLoss(cfg, 1.0, 4.0, fa_bias_weight=8.0, prior_relative=prior_relative, wm_weight=3.0)
    white = (plain.fa(target, bval) >= WM_FA_THRESHOLD)[0]
    assert 0 < white.float().mean() < 1  # the fixture has both tissues
    grads = []
    for loss in (plain, wm):
        p = pred.clone().requires_grad_(True)
        value, parts = loss(p, target, mask, bval, prior)
        value.backward()
        per_voxel = p.grad.abs().sum(dim=1)[0]
        grads.append(per_voxel[white].mean() / per_voxel[~white].mean())
    assert loss(pred, target, mask, bval, prior)[1] == pytest.approx(
        plain(pred, target, mask, bval, prior)[1]
    )  # reported parts stay plain means
    assert grads[1] > 2.0 * grads[0]  # white matter's share of the gradient grows


def test_small_field_example_is_the_mirrored_window_the_app_runs_on():
    from qid2_bidsapp.model.field_data import make_field_example
    from qid2_bidsapp.model.field_features import network_window

    cfg = FieldConfig.tiny()
    base = tensor_coefficient_slab(1)
    slab = dataclasses.replace(base, mask=np.ones_like(base.mask))  # brain everywhere
    ex = make_field_example(slab, np.random.default_rng(3), cfg, crop=32, small_field=10)
    again = make_field_example(slab, np.random.default_rng(3), cfg, crop=32, small_field=10)
    np.testing.assert_array_equal(ex["condition"], again["condition"])
    assert ex["condition"].shape == (cfg.condition_channels, 32, 32)
    assert ex["target"].shape == (cfg.n_coefficients, 32, 32)
    assert ex["meta"]["field"] == 10
    # the loss sees the square only, where the app's window puts a 10-voxel scan (centred) ...
    top = -network_window(0, 10, 0, 10, min_size=32)[0]
    expected = np.zeros((32, 32))
    expected[top : top + 10, top : top + 10] = 1
    np.testing.assert_array_equal(ex["mask"], expected)
    square = ex["condition"][:, top : top + 10]
    # ... and outside it the condition is the square mirrored (numpy "symmetric")
    np.testing.assert_array_equal(ex["condition"][:, top - 1], square[:, 0])
    np.testing.assert_array_equal(ex["condition"][:, top + 10], square[:, 9])
    np.testing.assert_array_equal(ex["target"][:, top - 2], ex["target"][:, top + 1])
    with pytest.raises(ValueError, match="small_field"):
        make_field_example(slab, np.random.default_rng(3), cfg, crop=32, small_field=16)


def _tiny_trainer_settings(slabs, run) -> dict:
    """FieldTrainConfig settings of a tiny trainer on `_slab_folders`."""
    return dict(
        slabs=str(slabs), output=str(run), model=FieldConfig.tiny().to_dict(),
        batch_size=8, crop=16, n_val_slabs=1, n_val_examples=2, num_threads=1,
    )  # fmt: skip


def test_trainer_draws_small_fields_only_when_asked(tmp_path):
    from qid2_bidsapp.model.field_train import FieldTrainConfig, FieldTrainer

    slabs, run = _slab_folders(tmp_path)
    base = _tiny_trainer_settings(slabs, run)

    def extents(masks):
        return [np.ptp(np.argwhere(m > 0), axis=0).max() + 1 for m in masks]

    plain = FieldTrainer(FieldTrainConfig(**base), echo=lambda *_: None)
    assert min(extents(plain._batch()["mask"])) > 7  # whole 16-voxel crops of the slab
    small = FieldTrainer(
        FieldTrainConfig(**base, small_field_fraction=1.0, small_field_sizes=[4, 7]),
        echo=lambda *_: None,
    )
    masks = small._batch()["mask"]
    assert masks.shape == (8, 16, 16)
    assert max(extents(masks)) <= 7
    assert small.train_step()["loss"] > 0


def test_trainer_mirrors_examples_only_when_asked(tmp_path):
    from qid2_bidsapp.model.field_train import FieldTrainConfig, FieldTrainer

    slabs, run = _slab_folders(tmp_path)
    base = _tiny_trainer_settings(slabs, run)
    plain = FieldTrainer(FieldTrainConfig(**base), echo=lambda *_: None)
    assert not any("mirror" in m for m in plain._batch()["meta"])
    mirrored = FieldTrainer(FieldTrainConfig(**base, mirror_fraction=1.0), echo=lambda *_: None)
    drawn = [m["mirror"] for m in mirrored._batch()["meta"]]
    assert len(drawn) == 8 and min(drawn) >= 1 and max(drawn) <= 7 and len(set(drawn)) > 1
    assert mirrored.train_step()["loss"] > 0


def test_training_rescaling_is_the_inference_rescaling(shell):
    from qid2_bidsapp.model.field_features import log_mean_matrix, log_mean_scale
    from qid2_bidsapp.model.field_train import rescale_to_prior_log_mean

    signal, b0, brain, bvecs = shell
    cfg = FieldConfig.tiny()
    _, prior = shell_features(signal, b0, brain, bvecs, cfg, bval=BVAL)
    prior = prior[:, :, 2]  # (H, W, C): one slice
    rng = np.random.default_rng(0)
    pred = (prior * rng.uniform(0.7, 1.3, prior.shape)).astype(np.float32)
    as_tensor = [torch.from_numpy(np.moveaxis(a, -1, 0)[None].copy()) for a in (pred, prior)]
    evaluate = torch.from_numpy(log_mean_matrix(cfg).astype(np.float32))
    rescaled = rescale_to_prior_log_mean(*as_tensor, evaluate)[0].numpy()
    expected = pred * log_mean_scale(pred, prior, cfg)[..., None]
    np.testing.assert_allclose(np.moveaxis(rescaled, 0, -1), expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(expected, pred, rtol=1e-2)


def test_trainer_trains_through_the_rescaling_only_when_the_model_has_it(tmp_path):
    from qid2_bidsapp.model.field_train import FieldTrainConfig, FieldTrainer

    slabs, run = _slab_folders(tmp_path)
    base = _tiny_trainer_settings(slabs, run)
    plain = FieldTrainer(FieldTrainConfig(**base), echo=lambda *_: None)
    assert plain.log_mean_matrix is None
    base["model"] = FieldConfig.tiny(log_mean_from_prior=True).to_dict()
    matched = FieldTrainer(FieldTrainConfig(**base), echo=lambda *_: None)
    batch = matched._batch()
    condition = torch.from_numpy(batch["condition"])
    prior = condition[:, matched.network.prior_channels]
    out = matched._as_run(2.0 * prior, condition)  # twice the prior: scaled back to it
    np.testing.assert_allclose(out.numpy(), prior.numpy(), rtol=1e-4, atol=1e-5)
    assert np.isfinite(matched.train_step()["loss"])
    assert np.isfinite(matched.validate()["net_fa_mae"])


def test_data_workers_make_the_batches_in_their_own_processes(tmp_path):
    from qid2_bidsapp.model.field_train import FieldTrainConfig, FieldTrainer

    slabs, run = _slab_folders(tmp_path, (0, 1))
    settings = _tiny_trainer_settings(slabs, run)

    def losses(trainer, steps=3):
        try:
            return [trainer.train_step()["loss"] for _ in range(steps)]
        finally:
            trainer.close()

    workers = FieldTrainer(FieldTrainConfig(**settings, data_workers=2), echo=lambda *_: None)
    before = workers.rng.bit_generator.state
    first = losses(workers)
    assert all(np.isfinite(first)) and workers.step == 3
    assert workers.rng.bit_generator.state == before  # nothing was drawn in this process
    again = losses(FieldTrainer(FieldTrainConfig(**settings, data_workers=2), echo=lambda *_: None))
    assert again == first  # the workers' generators are seeded: same data, same losses
    in_process = losses(FieldTrainer(FieldTrainConfig(**settings), echo=lambda *_: None))
    assert in_process != first


def test_training_on_a_missing_gpu_is_a_clear_error(tmp_path):
    from qid2_bidsapp.model.field_train import FieldTrainConfig, FieldTrainer

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    slabs, run = _slab_folders(tmp_path)
    settings = _tiny_trainer_settings(slabs, run)
    with pytest.raises(Qid2Error, match="device 'cuda': .*no CUDA device"):
        FieldTrainer(FieldTrainConfig(**settings, device="cuda"), echo=lambda *_: None)
    with pytest.raises(Qid2Error, match="data_workers"):
        FieldTrainer(FieldTrainConfig(**settings, data_workers=-1), echo=lambda *_: None)
    auto = FieldTrainer(FieldTrainConfig(**settings, device="auto"), echo=lambda *_: None)
    assert auto.device.type == "cpu" and auto.amp_dtype is None


def test_cpu_amp_trains_in_bfloat16_on_a_cpu_that_has_it(tmp_path):
    from qid2_bidsapp.model.field_train import (
        FieldTrainConfig,
        FieldTrainer,
        cpu_has_bfloat16,
        training_autocast_dtype,
    )

    cpu = torch.device("cpu")
    assert training_autocast_dtype(cpu, False) is None
    slabs, run = _slab_folders(tmp_path)
    settings = _tiny_trainer_settings(slabs, run)
    if not cpu_has_bfloat16():
        messages = []
        trainer = FieldTrainer(FieldTrainConfig(**settings, cpu_amp=True), echo=messages.append)
        assert trainer.amp_dtype is None and any("no bfloat16" in m for m in messages)
        pytest.skip("this CPU has no native bfloat16: amp falls back to float32 (checked)")
    assert training_autocast_dtype(cpu, True) == torch.bfloat16
    assert FieldTrainer(FieldTrainConfig(**settings), echo=lambda *_: None).amp_dtype is None
    mixed = FieldTrainer(FieldTrainConfig(**settings, cpu_amp=True), echo=lambda *_: None)
    plain = FieldTrainer(FieldTrainConfig(**settings), echo=lambda *_: None)
    seen = []
    mixed.network.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    first, reference = mixed.train_step()["loss"], plain.train_step()["loss"]
    assert seen == [torch.bfloat16]  # the forward pass ran in bfloat16
    assert first != reference and abs(first - reference) < 0.05 * abs(reference)
    assert all(p.dtype == torch.float32 for p in mixed.network.parameters())
    losses = [mixed.train_step()["loss"] for _ in range(3)]
    assert all(np.isfinite(losses))
    assert np.isfinite(mixed.validate()["net_fa_mae"])  # validation runs in float32


def test_weight_average_is_kept_validated_resumed_and_exported(tmp_path):
    import shutil

    from qid2_bidsapp.model.checkpoint import load_model
    from qid2_bidsapp.model.field_network import INPUT_CONV_WEIGHT
    from qid2_bidsapp.model.field_train import (
        FieldTrainConfig,
        FieldTrainer,
        export_model,
        train_field,
    )

    slabs, run = _slab_folders(tmp_path)
    settings = {**_tiny_trainer_settings(slabs, run), "ema_decay": 0.5, "lr": 1e-2}
    trainer = FieldTrainer(FieldTrainConfig(**settings), echo=lambda *_: None)
    assert "ema_fa_mae" not in trainer.validate()  # nothing averaged yet
    expected = None
    for _ in range(3):
        trainer.train_step()
        weights = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        expected = (
            weights
            if expected is None
            else {k: 0.5 * expected[k] + 0.5 * weights[k] for k in weights}
        )
    average = trainer.ema.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(average[key], value)
    assert not torch.equal(average[INPUT_CONV_WEIGHT], weights[INPUT_CONV_WEIGHT])
    scores = trainer.validate()
    assert np.isfinite(scores["ema_fa_mae"]) and scores["ema_fa_mae"] != scores["net_fa_mae"]
    with pytest.raises(Qid2Error, match="ema_decay"):
        FieldTrainer(FieldTrainConfig(**{**settings, "ema_decay": 1.0}), echo=lambda *_: None)

    # 2 + 2 steps in two chunks keep the same average as 4 in one
    whole = {**settings, "output": str(tmp_path / "whole"), "steps": 4}
    whole.update(snapshot_every=2, validate_every=2)
    chunks = {**whole, "output": str(tmp_path / "chunks"), "steps": 2}
    for path in (tmp_path / "whole", tmp_path / "chunks"):
        shutil.copytree(run / "val_slabs", path / "val_slabs")
    state = train_field(FieldTrainConfig(**whole), echo=lambda *_: None)
    train_field(FieldTrainConfig(**chunks), echo=lambda *_: None)
    again = train_field(FieldTrainConfig(**{**chunks, "steps": 4}), echo=lambda *_: None)
    ours, theirs = (torch.load(p, weights_only=True)["extra"]["ema"] for p in (again, state))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    assert (tmp_path / "whole" / "snapshots" / "ema-step-0000004.pt").is_file()
    folder = export_model(tmp_path / "whole", tmp_path / "model")
    network, _, info = load_model(folder)
    prefix = "module."
    for key, value in theirs.items():
        if key.startswith(prefix):
            torch.testing.assert_close(network.state_dict()[key[len(prefix) :]], value)
    assert info["training"]["exported_weights"].startswith("moving average")
    card = (folder / "MODEL_CARD.md").read_text()
    assert "network " in card and "(moving average of its weights 0." in card


def test_float16_weights_halve_the_file_and_load_as_float32(tmp_path):
    from qid2_bidsapp.model.checkpoint import WEIGHTS_NAME, load_model, save_model

    full = save_tiny_field_model(tmp_path / "full")
    network, config, _ = load_model(full)
    half = save_model(
        tmp_path / "half", network, config, training={}, card="# test\n", weights_dtype="float16"
    )
    size = (half / WEIGHTS_NAME).stat().st_size / (full / WEIGHTS_NAME).stat().st_size
    assert 0.45 < size < 0.6
    loaded, _, info = load_model(half)
    assert info["sha256"] != load_model(full)[2]["sha256"]
    pairs = zip(loaded.state_dict().items(), network.state_dict().values(), strict=True)
    for (name, ours), theirs in pairs:
        assert ours.dtype == theirs.dtype, name
        if ours.is_floating_point():
            torch.testing.assert_close(ours, theirs.half().float(), rtol=0, atol=0)
            torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="weights_dtype"):
        save_model(tmp_path / "x", network, config, training={}, card="#", weights_dtype="int8")


def test_data_echo_serves_each_drawn_batch_for_several_steps(tmp_path):
    from qid2_bidsapp.model.field_train import FieldTrainConfig, FieldTrainer

    slabs, run = _slab_folders(tmp_path, (0, 1))
    settings = _tiny_trainer_settings(slabs, run)
    echoed = FieldTrainer(FieldTrainConfig(**settings, data_echo=2), echo=lambda *_: None)
    plain = FieldTrainer(FieldTrainConfig(**settings), echo=lambda *_: None)
    first = echoed.train_step()["loss"]
    assert first == plain.train_step()["loss"]  # the same first batch, noise and timesteps
    echoed.train_step()
    assert echoed.rng.bit_generator.state == plain.rng.bit_generator.state  # no new draw
    echoed.train_step()
    plain.train_step()
    assert echoed.rng.bit_generator.state == plain.rng.bit_generator.state  # one more each
    with pytest.raises(Qid2Error, match="data_echo"):
        FieldTrainer(FieldTrainConfig(**settings, data_echo=0), echo=lambda *_: None)


def test_model_card_names_the_gpu_a_run_trained_on():
    from qid2_bidsapp.model.field_train import _hardware_text

    cpu = {"cpu_hours": 2.5, "hardware": {"cpu": "x86_64", "torch_threads": 2}}
    assert _hardware_text(cpu) == "about 2.5 CPU-hours on x86_64 (2 torch thread(s), no GPU)"
    gpu = {
        "cpu_hours": 0.2,
        "hardware": {
            "cpu": "x86_64",
            "torch_threads": 2,
            "device": "cuda",
            "gpu": "NVIDIA H100",
            "data_workers": 14,
            "data_echo": 2,
        },
    }
    text = _hardware_text(gpu)
    assert "NVIDIA H100" in text and "14 CPU worker(s)" in text and "CPU-hours" not in text
    mixed = {"cpu_hours": 1.0, "hardware": {"cpu": "x86_64", "torch_threads": 2, "cpu_amp": True}}
    assert "(2 torch thread(s), bfloat16 autocast, no GPU)" in _hardware_text(mixed)
