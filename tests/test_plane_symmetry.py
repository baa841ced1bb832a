"""Mirror symmetries of the SH-field model's inference (`model.plane_symmetry`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qid2_bidsapp.data.example import hemisphere_directions
from qid2_bidsapp.model.field_config import FieldConfig
from qid2_bidsapp.model.field_features import scalar_values, shell_features, slice_condition
from qid2_bidsapp.model.plane_symmetry import (
    SYMMETRIES,
    condition_matrix,
    direction_matrix,
    map_plane,
    sh_symmetry_matrix,
)
from qid2_bidsapp.shm import sh_basis_matrix

from .helpers import noise_free_real_shell, noisy_phantom_shell, save_tiny_field_model

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (20, 18, 5)
BVAL = 1000.0


@pytest.fixture(scope="module")
def shell():
    return noisy_phantom_shell(SHAPE, BVAL)


def _mirror(index, signal, b0, brain, bvecs):
    """The scan mirrored as symmetry `index` mirrors a slice (rows, columns, slice order)."""
    axes = [a for a, on in enumerate(SYMMETRIES[index]) if on]
    t = direction_matrix(index)
    return (
        np.ascontiguousarray(np.flip(signal, axes)),
        np.ascontiguousarray(np.flip(b0, axes)),
        np.ascontiguousarray(np.flip(brain, axes)),
        bvecs @ t.T,
    )


@pytest.mark.parametrize("index", range(8))
def test_coefficient_map_mirrors_the_function_it_represents(index):
    t = direction_matrix(index)
    r = sh_symmetry_matrix(t, 6)
    assert set(np.unique(np.round(r, 9))) <= {-1.0, 0.0, 1.0}  # a signed permutation
    rng = np.random.default_rng(index)
    c = rng.normal(size=r.shape[0])
    g = hemisphere_directions(30, seed=1)
    basis, _ = sh_basis_matrix(g, 6)
    mirrored_at_tg, _ = sh_basis_matrix(g @ t.T, 6)
    # the mirrored function at the mirrored direction is the function at the direction
    np.testing.assert_allclose(mirrored_at_tg @ (r @ c), basis @ c, atol=1e-10)


@pytest.mark.parametrize("prior", ["sh", "dti"])
@pytest.mark.parametrize("index", [1, 2, 3, 4, 7])
def test_condition_of_a_mirrored_scan_is_the_mapped_condition(shell, prior, index):
    cfg = FieldConfig.tiny(prior=prior, summary_input=True, noise_input=True)
    signal, b0, brain, bvecs = shell
    scalars = scalar_values(BVAL, len(bvecs), 1, 0.05)
    features, _ = shell_features(signal, b0, brain, bvecs, cfg, bval=BVAL)
    m_signal, m_b0, m_brain, m_bvecs = _mirror(index, signal, b0, brain, bvecs)
    m_features, _ = shell_features(m_signal, m_b0, m_brain, m_bvecs, cfg, bval=BVAL)
    z = 1
    m_z = SHAPE[2] - 1 - z if SYMMETRIES[index][2] else z
    cond = slice_condition(features, z, cfg.context_slices, scalars, cfg)
    expected = map_plane(np.einsum("dc,chw->dhw", condition_matrix(cfg, index), cond), index)
    got = slice_condition(m_features, m_z, cfg.context_slices, scalars, cfg)
    # the tensor prior is projected from fixed directions that are not themselves mirrored
    tol = 1e-6 if prior == "sh" else 5e-3  # measured: 1e-15 and up to 1e-3
    np.testing.assert_allclose(got, expected, atol=tol * np.abs(expected).max())


def _engine(folder, **options):
    from qid2_bidsapp.engines.base import get_engine

    settings = {"device": "cpu", "n_steps": 1, "n_samples": 1, "seed": 3, "temperature": 0.0}
    settings.update(options)
    return get_engine("qid2", model_dir=str(folder), **settings)


@pytest.fixture(scope="module")
def sh_prior_model(tmp_path_factory):
    # the 'sh' prior's features mirror exactly, so the engine's output can too
    return save_tiny_field_model(tmp_path_factory.mktemp("models") / "field", prior="sh")


@pytest.mark.parametrize(("symmetries", "index"), [(4, 1), (4, 3), (8, 4), (8, 6)])
def test_averaging_over_the_mirrors_makes_the_engine_mirror_equivariant(
    shell, sh_prior_model, symmetries, index
):
    signal, b0, brain, bvecs = shell
    targets = hemisphere_directions(5, seed=7)
    m_signal, m_b0, m_brain, m_bvecs = _mirror(index, signal, b0, brain, bvecs)
    axes = [a for a, on in enumerate(SYMMETRIES[index]) if on]

    def gap(s):
        engine = _engine(sh_prior_model, symmetries=s)
        out = engine.predict(signal, b0, bvecs, targets, BVAL, brain)
        mirrored = engine.predict(m_signal, m_b0, m_bvecs, targets @ direction_matrix(index).T,
                                  BVAL, m_brain)  # fmt: skip
        return np.abs(np.flip(mirrored, axes) - out)[brain].max() / out[brain].max()

    assert gap(symmetries) < 1e-4
    assert gap(1) > 1e-3  # the network alone is not equivariant: the averaging does it


def test_symmetries_multiply_the_network_passes_and_feed_the_uncertainty(shell, sh_prior_model):
    signal, b0, brain, bvecs = shell
    targets = hemisphere_directions(4, seed=1)
    counts = {}
    for s in (1, 4):
        engine = _engine(sh_prior_model, symmetries=s, temperature=1.0, batch_size=8)
        counts[s] = 0

        def count(*args, s=s):
            counts[s] += 1

        hook = engine.network.register_forward_hook(count)
        try:
            _, std = engine.predict_with_uncertainty(signal, b0, bvecs, targets, BVAL, brain)
        finally:
            hook.remove()
        if s == 1:  # one sample: no spread
            assert np.all(std == 0)
        else:  # one sample on each of four mirrors: their spread, inside the brain only
            assert std[brain].max() > 0 and np.all(std[~brain] == 0)
        assert engine.settings()["sampler"]["symmetries"] == s
    assert counts == {1: 1, 4: 4}  # one step, every slice in one batch, per mirror


def test_model_default_symmetries_and_checks(tmp_path):
    from qid2_bidsapp.errors import Qid2Error
    from qid2_bidsapp.model.inference import SamplerSettings

    cfg = FieldConfig.tiny()
    assert cfg.sampler_defaults["cpu"]["symmetries"] == 4
    folder = save_tiny_field_model(
        tmp_path / "m",
        sampler_defaults={
            "cpu": {"n_steps": 1, "n_samples": 1, "t_start": 50},  # an older model: no key
            "cuda": {"n_steps": 1, "n_samples": 1, "t_start": 50},
        },
    )
    from qid2_bidsapp.engines.base import get_engine

    engine = get_engine("qid2", model_dir=str(folder), device="cpu")
    assert engine.sampler_settings.symmetries == 1
    for bad in (0, 3, 16):
        with pytest.raises(ValueError, match="symmetries"):
            SamplerSettings(symmetries=bad)
        with pytest.raises(ValueError, match="symmetries"):
            dataclasses.replace(
                cfg, sampler_defaults={k: {**v, "symmetries": bad} for k, v in
                                       cfg.sampler_defaults.items()}
            )  # fmt: skip
    with pytest.raises(Qid2Error, match="symmetries"):
        get_engine("qid2", model_dir=str(folder), device="cpu", symmetries=5)


@pytest.mark.parametrize("index", range(1, 8))
def test_a_mirrored_training_example_is_the_same_signal_seen_in_a_mirror(index):
    from qid2_bidsapp.model.field_data import (
        make_field_example,
        make_real_example,
        stack_real_examples,
    )
    from qid2_bidsapp.model.field_features import evaluation_matrix
    from qid2_bidsapp.model.field_network import ShFieldNetwork
    from qid2_bidsapp.model.field_train import real_signal_loss
    from qid2_bidsapp.model.plane_symmetry import mirror_example

    cfg = FieldConfig.tiny()
    slab, shell = noise_free_real_shell(cfg.sh_order)
    example = make_field_example(slab, np.random.default_rng(index), cfg, crop=16)
    mirrored = mirror_example(example, index, cfg)
    assert mirrored["meta"]["mirror"] == index and "mirror" not in example["meta"]
    g = hemisphere_directions(10, seed=4)
    at = evaluation_matrix(g, cfg)
    at_mirrored = evaluation_matrix(g @ direction_matrix(index).T, cfg)
    prior = ShFieldNetwork(cfg).prior_channels
    for key, channels in (("target", slice(None)), ("condition", prior)):
        seen = np.einsum("mc,chw->mhw", at, example[key][channels])
        in_mirror = np.einsum("mc,chw->mhw", at_mirrored, mirrored[key][channels])
        np.testing.assert_allclose(map_plane(in_mirror, index), seen, atol=1e-5)
    np.testing.assert_array_equal(map_plane(mirrored["mask"], index), example["mask"])
    # a real example: the prior scores the same on the hidden directions, mirrored or not
    real = make_real_example(shell, np.random.default_rng(index), cfg, crop=16)
    losses = []
    for e in (real, mirror_example(real, index, cfg)):
        batch = stack_real_examples([e])
        losses.append(real_signal_loss(torch.from_numpy(batch["condition"])[:, prior], batch))
    assert losses[0].item() > 1e-4
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
