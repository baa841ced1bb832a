"""Per-subject adaptation (``--adapt-steps``): a short self-supervised fine-tune (CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from qid2_bidsapp.engines.base import get_engine  # noqa: E402
from qid2_bidsapp.model.adapt import AdaptSettings, adapt_network, subject_volume  # noqa: E402
from qid2_bidsapp.model.checkpoint import load_model  # noqa: E402

SHAPE = (24, 22, 3)
BVAL = 1000.0
FAST = {"n_steps": 2, "n_samples": 2, "device": "cpu"}
AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shell():
    """One shell of the phantom: signal, b0, mask, 14 acquired directions, 6 targets."""
    bvecs = hemisphere_directions(14, seed=0)
    signal, brain = phantom_signal(SHAPE, np.full(14, BVAL), bvecs)
    b0, _ = phantom_signal(SHAPE, np.zeros(1), np.zeros((1, 3)))
    return signal, b0[..., 0], brain, bvecs, hemisphere_directions(6, seed=3)


def _subject(shell):
    signal, b0, brain, bvecs, _ = shell
    return subject_volume(signal, b0, bvecs, BVAL, brain, AFFINE)


def _weights(network):
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_settings_are_checked():
    for bad in ({"steps": -1}, {"steps": 1.5}, {"lr": 0}, {"batch_size": 0}, {"max_timestep": -1}):
        with pytest.raises(ValueError):
            AdaptSettings(**bad)


def test_the_subject_volume_is_the_shell_with_its_b0_first(shell):
    volume = _subject(shell)
    assert volume.n_b0 == 1 and list(volume.shells) == [BVAL]
    assert len(volume.shells[BVAL]) == 14 and volume.slices.size == SHAPE[2]
    np.testing.assert_allclose(volume.b0, shell[1], rtol=1e-6)


def test_zero_steps_is_an_unchanged_copy(tiny_model, shell):
    network, config, _ = load_model(tiny_model, device="cpu")
    adapted, record = adapt_network(network, config, _subject(shell), AdaptSettings(steps=0))
    assert adapted is not network and _same(_weights(adapted), _weights(network))
    assert record["seconds"] == 0.0 and record["loss_first"] is None


def test_adaptation_learns_is_reproducible_and_leaves_the_loaded_network_alone(tiny_model, shell):
    network, config, _ = load_model(tiny_model, device="cpu")
    before = _weights(network)
    settings = AdaptSettings(steps=40, lr=2e-3, batch_size=4, seed=3)
    first, record = adapt_network(network, config, _subject(shell), settings)
    second, _ = adapt_network(network, config, _subject(shell), settings)
    assert _same(_weights(network), before)
    assert not _same(_weights(first), before)
    assert _same(_weights(first), _weights(second))
    assert record["loss_last"] < 0.8 * record["loss_first"], record
    assert record["kept"] == [7, 13] and record["n_directions"] == 14
    assert not first.training


def test_the_engine_adapts_each_shell_and_records_it(tiny_model, shell):
    signal, b0, brain, bvecs, targets = shell
    plain = get_engine("qid2", model_dir=tiny_model, affine=AFFINE, **FAST)
    adapting = get_engine("qid2", model_dir=tiny_model, affine=AFFINE, adapt_steps=3, **FAST)
    again = get_engine("qid2", model_dir=tiny_model, affine=AFFINE, adapt_steps=3, **FAST)
    base = plain.predict(signal, b0, bvecs, targets, BVAL, brain)
    adapted = adapting.predict(signal, b0, bvecs, targets, BVAL, brain)
    np.testing.assert_array_equal(adapted, again.predict(signal, b0, bvecs, targets, BVAL, brain))
    assert not np.allclose(adapted[brain], base[brain])
    np.testing.assert_array_equal(adapted[~brain], base[~brain])  # the SH prior outside
    assert plain.settings()["adaptation"] == {"steps": 0, "lr": 1e-4, "shells": []}
    record = adapting.settings()["adaptation"]
    assert record["steps"] == 3 and len(record["shells"]) == 1
    assert record["shells"][0]["bval"] == BVAL and record["shells"][0]["loss_last"] > 0
    # the loaded weights stay as shipped: a second shell starts from them again
    fresh = get_engine("qid2", model_dir=tiny_model, affine=AFFINE, **FAST)
    assert _same(_weights(adapting.network), _weights(fresh.network))


def test_a_shell_too_small_to_learn_from_is_not_adapted(tiny_model, shell):
    signal, b0, brain, bvecs, targets = shell
    few = slice(0, 6)  # 6 directions: nothing to hide from (needs more than 6)
    engine = get_engine("qid2", model_dir=tiny_model, affine=AFFINE, adapt_steps=3, **FAST)
    plain = get_engine("qid2", model_dir=tiny_model, affine=AFFINE, **FAST)
    out = engine.predict(signal[..., few], b0, bvecs[few], targets, BVAL, brain)
    expected = plain.predict(signal[..., few], b0, bvecs[few], targets, BVAL, brain)
    np.testing.assert_array_equal(out, expected)
    (record,) = engine.settings()["adaptation"]["shells"]
    assert "no shell with more than 6 directions" in record["skipped"]


def test_the_evaluation_harness_takes_adaptation_variants():
    from qid2_bidsapp.cli.eval import _variant

    name, options = _variant("a50:adapt=50,adapt_lr=1e-5")
    assert name == "a50" and options == {"adapt_steps": 50, "adapt_lr": 1e-5}


def test_the_app_has_no_adapt_option(tmp_path):
    """Not kept on the app: it did not measurably help (docs/results.md)."""
    from qid2_bidsapp.cli.run import _config_from_args

    with pytest.raises(SystemExit):
        _config_from_args([str(tmp_path), str(tmp_path / "o"), "participant", "--adapt-steps", "5"])
