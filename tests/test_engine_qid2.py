"""The qid2 diffusion engine: inference mechanics, model lookup, and the app end to end (CPU)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from qid2_bidsapp.config import Config
from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal
from qid2_bidsapp.engines.base import UncertaintyRecorder, get_engine
from qid2_bidsapp.engines.qid2 import (
    MODEL_ENV,
    default_model_dir,
    listed_weights_sha256,
    model_search_paths,
)
from qid2_bidsapp.engines.sh import SHUpsampler
from qid2_bidsapp.errors import EngineUnavailableError, InputError, Qid2Error
from qid2_bidsapp.model.config import ModelConfig

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("einops")

from qid2_bidsapp.model.inference import (  # noqa: E402
    CPU_MAX_PAIRS,
    SamplerSettings,
    SliceGrid,
    auto_batch_size,
    estimate_bytes_per_image,
    is_out_of_memory,
    pair_generator,
    run_pairs,
    sample_pairs,
)
from qid2_bidsapp.model.sampler import Qid2Sampler  # noqa: E402

SHAPE = (20, 18, 4)
BVAL = 1000.0
FAST = {"n_steps": 2, "n_samples": 3, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def volume():
    """One shell of the phantom: signal, b0, mask, acquired directions and targets."""
    bvecs = hemisphere_directions(12, seed=0)
    signal, brain = phantom_signal(SHAPE, np.full(12, BVAL), bvecs)
    b0, _ = phantom_signal(SHAPE, np.zeros(1), np.zeros((1, 3)))
    targets = hemisphere_directions(5, seed=3)
    return signal, b0[..., 0], brain, bvecs, targets


def _close(actual, expected):
    """Equal up to the float rounding of the network's kernels (differs with the batch size)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-2)  # S0 is ~1000


def _engine(model, **options):
    return get_engine("qid2", model_dir=model, **{**FAST, **options})


def _run(engine, volume, mask=True):
    signal, b0, brain, bvecs, targets = volume
    return engine.predict_with_uncertainty(
        signal, b0, bvecs, targets, BVAL, brain if mask else None
    )


@pytest.fixture(scope="module")
def reference(tiny_model, volume):
    """Prediction and uncertainty with the default (automatic) batch size, seed 0."""
    return _run(_engine(tiny_model), volume)


# --------------------------------------------------------------------------- engine outputs


def test_output_shape_dtype_and_range(reference, volume):
    mean, std = reference
    assert mean.shape == std.shape == (*SHAPE, 5)
    assert mean.dtype == std.dtype == np.float32
    assert np.isfinite(mean).all() and np.isfinite(std).all()
    assert mean.min() >= 0 and std.min() >= 0


def test_outside_the_mask_is_the_sh_prior_and_the_std_is_zero(reference, volume):
    signal, b0, brain, bvecs, targets = volume
    mean, std = reference
    prior = SHUpsampler().predict(signal, b0, bvecs, targets, BVAL)  # the sh engine's defaults
    np.testing.assert_allclose(mean[~brain], prior[~brain], rtol=1e-6, atol=1e-4)
    assert (std[~brain] == 0).all()
    # inside, the (random) network changes the prior, and the samples disagree
    assert np.abs(mean[brain] - prior[brain]).mean() > 1.0
    assert (std[brain] > 0).mean() > 0.5


def test_predict_is_the_mean_and_the_protocol_holds(tiny_model, volume, reference):
    from qid2_bidsapp.engines.base import Upsampler

    engine = _engine(tiny_model)
    assert isinstance(engine, Upsampler) and engine.name == "qid2"
    signal, b0, brain, bvecs, targets = volume
    np.testing.assert_array_equal(
        engine.predict(signal, b0, bvecs, targets, BVAL, brain), reference[0]
    )


def test_same_seed_same_output_other_seed_other_output(tiny_model, volume, reference):
    again = _run(_engine(tiny_model), volume)
    np.testing.assert_array_equal(again[0], reference[0])
    np.testing.assert_array_equal(again[1], reference[1])
    other = _run(_engine(tiny_model, seed=1), volume)
    assert not np.allclose(other[0], reference[0])


def test_output_does_not_depend_on_the_batch_size(tiny_model, volume, reference):
    for size in (1, 7):
        mean, std = _run(_engine(tiny_model, batch_size=size), volume)
        # the noise is per pair: only the kernels' float rounding may differ between sizes
        _close(mean, reference[0])
        _close(std, reference[1])


def test_zero_temperature_is_deterministic_and_single_sample_has_zero_std(tiny_model, volume):
    mean, std = _run(_engine(tiny_model, temperature=0.0, n_samples=2), volume)
    assert (std == 0).all()
    other, _ = _run(_engine(tiny_model, temperature=0.0, n_samples=1, seed=5), volume)
    _close(mean, other)
    _, std1 = _run(_engine(tiny_model, n_samples=1), volume)
    assert (std1 == 0).all()


def test_full_chain_from_noise(tiny_model, volume):
    mean, std = _run(_engine(tiny_model, t_start="noise"), volume)
    assert np.isfinite(mean).all() and mean.min() >= 0 and std.max() > 0


def test_slice_axis_gives_the_same_result_as_transposing(tiny_model, volume):
    signal, b0, brain, bvecs, targets = volume

    def moved(a):
        return np.moveaxis(a, 0, 2)

    on_axis0 = _engine(tiny_model, slice_axis=0).predict_with_uncertainty(
        signal, b0, bvecs, targets, BVAL, brain
    )
    # the voxel axes are permuted: so are the voxel-frame directions
    transposed = _engine(tiny_model).predict_with_uncertainty(
        moved(signal), moved(b0), bvecs[:, [1, 2, 0]], targets[:, [1, 2, 0]], BVAL, moved(brain)
    )
    for a, b in zip(on_axis0, transposed, strict=True):
        assert a.shape == (*SHAPE, 5)
        np.testing.assert_array_equal(moved(a), b)


def test_no_mask_predicts_every_voxel(tiny_model, volume):
    brain, b0 = volume[2], volume[1]
    mean, std = _run(_engine(tiny_model), volume, mask=False)
    assert (std[brain] > 0).mean() > 0.5 and mean.min() >= 0
    # the network works on S/S0: where S0 is 0 (outside the phantom) it predicts 0
    assert (b0[~brain] == 0).all() and (mean[~brain] == 0).all() and (std[~brain] == 0).all()


def test_empty_mask_gives_the_prior(tiny_model, volume):
    signal, b0, _, bvecs, targets = volume
    mean, std = _engine(tiny_model).predict_with_uncertainty(
        signal, b0, bvecs, targets, BVAL, np.zeros(SHAPE, bool)
    )
    prior = SHUpsampler().predict(signal, b0, bvecs, targets, BVAL)
    np.testing.assert_allclose(mean, prior, rtol=1e-6, atol=1e-4)
    assert (std == 0).all()


def test_settings_are_provenance(tiny_model, volume):
    engine = _engine(tiny_model, batch_size=3)
    _run(engine, volume)
    settings = engine.settings()
    json.dumps(settings)
    assert settings["model_id"].startswith("tiny-")
    assert settings["model_sha256"] == listed_weights_sha256(tiny_model)
    assert settings["sampler"] == {
        "n_steps": 2,
        "t_start": 200,
        "temperature": 1.0,
        "n_samples": 3,
        "eta": 0.0,
        "symmetries": 1,  # per-target models run the slice as it is
    }
    assert settings["device"] == "cpu" and settings["precision"] == "float32"
    assert settings["batch_size"] == settings["batch_size_used"] == 3


def test_uncertainty_recorder(tiny_model, volume):
    signal, b0, brain, bvecs, targets = volume
    recorder = UncertaintyRecorder(_engine(tiny_model))
    assert recorder.provides_uncertainty and recorder.name == "qid2"
    recorder.predict(signal, b0, bvecs, targets[:2], BVAL, brain)
    recorder.predict(signal, b0, bvecs, targets[2:], BVAL, brain)
    assert recorder.uncertainty(SHAPE).shape == (*SHAPE, 5)
    classical = UncertaintyRecorder(SHUpsampler())
    classical.predict(signal, b0, bvecs, targets, BVAL, brain)
    assert not classical.provides_uncertainty and classical.uncertainty(SHAPE).shape == (*SHAPE, 0)


def test_model_inputs_are_built_as_in_training(tiny_model, volume):
    from qid2_bidsapp.model.conditioning import direction_tokens, select_references
    from qid2_bidsapp.model.data import model_frame_bvecs, model_inputs, sh_prior_for_target

    signal, b0, brain, bvecs, targets = volume
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # positive determinant: FSL flips x
    engine = _engine(tiny_model, batch_size=1, affine=affine, slice_axis=1)
    recorder = _Recorder(engine.network)
    engine.network = recorder
    engine.predict_with_uncertainty(signal, b0, bvecs, targets, BVAL, brain)

    # the first pair: first slice (along axis 1) with brain voxels, target 0
    sig, s0, inside = (np.moveaxis(a, 1, 2) for a in (signal, b0, brain))  # slice axis last
    grid = SliceGrid.from_mask(inside, margin=4)
    (r0, r1), (c0, c1), z = grid.rows, grid.cols, grid.slices[0]
    frame_in = model_frame_bvecs(bvecs, affine, 1)
    target = model_frame_bvecs(targets, affine, 1)[0]
    assert not np.allclose(frame_in, bvecs[:, [0, 2, 1]])  # x was flipped
    kept = sig[r0:r1, c0:c1, z]
    refs = select_references(target, frame_in, engine.config.n_references)
    prior = sh_prior_for_target(kept, frame_in, target)
    clip = engine.config.signal_clip
    expected = model_inputs(np.moveaxis(kept[..., refs], -1, 0), prior, s0[r0:r1, c0:c1, z], clip)
    condition, tokens = recorder.calls[0]
    np.testing.assert_allclose(condition[0, :, : r1 - r0, : c1 - c0], expected, atol=1e-6)
    np.testing.assert_allclose(tokens[0], direction_tokens(target, frame_in[refs], BVAL), atol=1e-7)


class _Recorder(torch.nn.Module):
    """Wrap a network and keep the condition and tokens of every (first-step) call."""

    def __init__(self, network):
        super().__init__()
        self.inner, self.calls = network, []

    def forward(self, x, condition, timesteps, tokens):
        self.calls.append((condition.numpy().copy(), tokens.numpy().copy()))
        return self.inner(x, condition, timesteps, tokens)


# --------------------------------------------------------------------------- out of memory


class _OOMAbove(torch.nn.Module):
    """Wrap a network so that a batch of more than `limit` images raises `error`."""

    def __init__(self, network, limit, error):
        super().__init__()
        self.inner, self.limit, self.error, self.sizes = network, limit, error, []

    def forward(self, x, condition, timesteps, tokens):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error
        return self.inner(x, condition, timesteps, tokens)


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
    ],
)
def test_out_of_memory_halves_the_batch_and_gives_the_same_result(
    tiny_model, volume, reference, error
):
    engine = _engine(tiny_model, batch_size=8)
    k = FAST["n_samples"]
    engine.network = _OOMAbove(engine.network, limit=2 * k, error=error)  # 2 pairs fit
    mean, std = _run(engine, volume)
    _close(mean, reference[0])
    _close(std, reference[1])
    assert engine.settings()["batch_size_used"] == 2
    assert max(engine.network.sizes) == 8 * k  # it tried the full batch first


def test_out_of_memory_with_one_pair_is_raised(tiny_model, volume):
    engine = _engine(tiny_model, batch_size=4)
    engine.network = _OOMAbove(engine.network, limit=0, error=torch.cuda.OutOfMemoryError("oom"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _run(engine, volume)


def test_other_errors_are_not_retried(tiny_model, volume):
    engine = _engine(tiny_model, batch_size=4)
    engine.network = _OOMAbove(engine.network, limit=0, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _run(engine, volume)
    assert engine.network.sizes == [4 * FAST["n_samples"]]


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate: out of memory"))
    assert not is_out_of_memory(RuntimeError("size mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


# --------------------------------------------------------------------------- inference pieces


def test_run_pairs_builds_batches_lazily():
    consumed = []

    def keys():
        for i in range(10):
            consumed.append(i)
            yield i

    seen = []

    def process(batch):
        assert len(consumed) <= batch[-1] + 1  # nothing beyond this batch was built yet
        seen.append(list(batch))

    assert run_pairs(keys(), process, batch_size=4, total=10) == 4
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_sample_pairs_matches_the_sampler_for_one_pair(tiny_model):
    from qid2_bidsapp.model.checkpoint import load_model

    network, cfg, _ = load_model(tiny_model)
    sampler = Qid2Sampler(cfg)
    gen = torch.Generator().manual_seed(3)
    condition = torch.rand((1, cfg.condition_channels, 8, 12), generator=gen) * 2 - 1
    tokens = torch.rand((1, cfg.n_tokens, 9), generator=gen)
    for eta in (0.0, 0.5):
        settings = SamplerSettings(n_steps=3, t_start=300, n_samples=3, eta=eta)
        ours = sample_pairs(network, sampler, condition, tokens, [pair_generator(0, 1)], settings)
        theirs = sampler.sample(
            network,
            condition,
            tokens,
            n_steps=3,
            t_start=300,
            n_samples=3,
            eta=eta,
            generator=pair_generator(0, 1),
        )
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_pair_generators_are_reproducible_and_distinct():
    def draw(*key):
        return torch.randn(4, generator=pair_generator(*key))

    torch.testing.assert_close(draw(0, 1000, 3, 2), draw(0, 1000, 3, 2), rtol=0, atol=0)
    for other in [(1, 1000, 3, 2), (0, 2000, 3, 2), (0, 1000, 2, 3), (0, 1000, 3, 3)]:
        assert not torch.equal(draw(0, 1000, 3, 2), draw(*other))
    draw(-1, 0, 0, 0)  # negative seeds are fine


def test_slice_grid_crops_to_the_mask_with_a_margin():
    mask = np.zeros((30, 20, 5), bool)
    mask[10:15, 3:8, 1] = True
    mask[12:20, 5:6, 3] = True
    grid = SliceGrid.from_mask(mask, margin=4)
    assert grid.rows == (6, 24) and grid.cols == (0, 12)
    assert grid.slices.tolist() == [1, 3] and grid.shape == (18, 12)
    assert SliceGrid.from_mask(np.zeros((4, 4, 2), bool), 2).slices.size == 0


def test_automatic_batch_size_on_cpu():
    cfg = ModelConfig()
    assert estimate_bytes_per_image(cfg, 176, 148) > estimate_bytes_per_image(cfg, 32, 32) > 0
    net = torch.nn.Linear(1, 1)
    size = auto_batch_size(net, cfg, 176, 148, 4, torch.device("cpu"))
    assert 1 <= size <= CPU_MAX_PAIRS


def test_sampler_settings_are_checked(tiny_model):
    with pytest.raises(ValueError, match="n_steps"):
        SamplerSettings(n_steps=5, t_start=2)
    with pytest.raises(ValueError, match="temperature"):
        SamplerSettings(temperature=-1)
    with pytest.raises(Qid2Error, match="t_start"):
        get_engine("qid2", model_dir=tiny_model, t_start=5000)
    with pytest.raises(Qid2Error, match="device"):
        get_engine("qid2", model_dir=tiny_model, device="tpu")


# --------------------------------------------------------------------------- model lookup


def test_no_model_is_unavailable_with_a_clear_message(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EngineUnavailableError, match="--engine sh") as err:
        get_engine("qid2", model_dir=empty)
    assert str(empty) in str(err.value) and "--model" in str(err.value)
    monkeypatch.setenv(MODEL_ENV, str(empty))
    assert model_search_paths() == [empty] and default_model_dir() is None
    with pytest.raises(EngineUnavailableError, match="looked in") as err:
        get_engine("qid2")
    assert str(empty) in str(err.value)


def test_default_model_lookup(tiny_model, monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    paths = model_search_paths()
    assert paths[0].parts[-2:] == ("_models", "qid2-default")
    assert paths[-1].parts[-2:] == ("models", "qid2-default")
    monkeypatch.setenv(MODEL_ENV, str(tiny_model))
    assert default_model_dir() == tiny_model
    assert get_engine("qid2", **FAST).settings()["model_sha256"] == listed_weights_sha256(
        tiny_model
    )


def test_corrupted_model_is_an_input_error(tiny_model, tmp_path):
    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum mismatch") as err:
        get_engine("qid2", model_dir=broken)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="a GPU is present")
def test_cuda_without_a_gpu_is_unavailable(tiny_model):
    with pytest.raises(EngineUnavailableError, match="--device cpu"):
        get_engine("qid2", model_dir=tiny_model, device="cuda")


def test_a_changed_model_is_refused(tiny_model):
    with pytest.raises(InputError, match="changed"):
        get_engine("qid2", model_dir=tiny_model, expected_sha256="0" * 64)


# --------------------------------------------------------------------------- CLI and config


def test_cli_options_reach_the_engine(tiny_model, tmp_path):
    from qid2_bidsapp.cli.run import _config_from_args

    config = _config_from_args(
        [
            str(tmp_path),
            str(tmp_path / "out"),
            "participant",
            "--model",
            str(tiny_model),
            "--sampler-steps",
            "3",
            "--sampler-t-start",
            "noise",
            "--temperature",
            "0.5",
            "--n-samples",
            "2",
            "--device",
            "cpu",
            "--batch-size",
            "5",
            "--random-seed",
            "9",
        ]
    )
    options = config.engine_options
    assert options["model_dir"] == str(tiny_model)
    assert options["expected_sha256"] == listed_weights_sha256(tiny_model)
    assert (options["n_steps"], options["t_start"], options["temperature"]) == (3, "noise", 0.5)
    assert (options["n_samples"], options["device"], options["batch_size"]) == (2, "cpu", 5)
    assert options["seed"] == 9
    engine = get_engine("qid2", **options)
    assert engine.settings()["sampler"]["t_start"] is None
    restored = Config.from_json(config.to_json(tmp_path / "c.json") or tmp_path / "c.json")
    assert restored.model == tiny_model and restored.sampler_t_start == "noise"
    sh = Config(bids_dir=tmp_path, output_dir=tmp_path / "o", engine="sh")
    assert set(sh.engine_options) == {"sh_order", "sh_lambda"}


@pytest.mark.parametrize(
    "extra",
    [
        ["--sampler-steps", "0"],
        ["--sampler-t-start", "-1"],
        ["--sampler-t-start", "soon"],
        ["--sampler-steps", "20", "--sampler-t-start", "10"],
        ["--temperature", "-0.1"],
        ["--n-samples", "0"],
        ["--device", "tpu"],
        ["--batch-size", "0"],
        ["--model", "/nonexistent/model"],
    ],
)
def test_cli_rejects_bad_engine_options(extra, tmp_path):
    from qid2_bidsapp.cli.run import _config_from_args

    with pytest.raises(SystemExit) as exc:
        _config_from_args([str(tmp_path), str(tmp_path / "out"), "participant", *extra])
    assert exc.value.code == 2


# --------------------------------------------------------------------------- the workflow


def test_slice_axis_from_the_sidecar(tmp_path):
    from qid2_bidsapp.workflows.dwi import slice_axis_of

    dwi = tmp_path / "sub-01_dwi.nii.gz"
    assert slice_axis_of(dwi) == 2  # no sidecar
    for value, axis in (("i", 0), ("j-", 1), ("k", 2)):
        (tmp_path / "sub-01_dwi.json").write_text(json.dumps({"SliceEncodingDirection": value}))
        assert slice_axis_of(dwi) == axis


def test_workflow_publishes_the_uncertainty_for_qid2_only(example_bids_ro, tiny_model, tmp_path):
    from qid2_bidsapp.bids import collect_dwi_runs
    from qid2_bidsapp.workflows.dwi import init_dwi_upsample_wf

    run = collect_dwi_runs(example_bids_ro)[0]
    for engine in ("sh", "qid2"):
        config = Config(
            bids_dir=example_bids_ro, output_dir=tmp_path / "o", engine=engine, model=tiny_model
        )
        wf = init_dwi_upsample_wf(run=run, config=config)
        paths = wf.get_node("publish").inputs.out_paths
        has_std = any(p.endswith("_model-qid2_param-std_dwimap.nii.gz") for p in paths)
        assert has_std == (engine == "qid2")
        upsample = wf.get_node("upsample")
        assert not upsample.is_gpu_node()  # no GPU on the test machines
        if engine == "qid2":
            assert upsample.inputs.engine_options["slice_axis"] == 2
            upsample.inputs.use_gpu = True  # what a machine with CUDA sets
            assert upsample.is_gpu_node() and wf.get_node("hidden_qc").inputs.use_gpu is False


# --------------------------------------------------------------------------- the app


@pytest.mark.slow
def test_app_end_to_end_with_the_qid2_engine(example_bids_ro, tiny_model, tmp_path):
    from qid2_bidsapp.cli.run import main

    from .helpers import assert_valid_derivative, check_run_outputs

    out = tmp_path / "out"
    args = [str(example_bids_ro), str(out), "participant", "--participant-label", "01"]
    args += ["--engine", "qid2", "--model", str(tiny_model), "--sampler-steps", "2"]
    args += ["--n-samples", "2", "-w", str(tmp_path / "work"), "--nprocs", "2"]
    assert main(args) == 0
    folder = out / "sub-01" / "dwi"
    dwi = folder / "sub-01_space-orig_desc-preproc_dwi.nii.gz"
    sidecar = check_run_outputs(dwi, 17)
    assert sidecar["UpsamplingEngine"] == "qid2"
    assert sidecar["ModelID"].startswith("tiny-")
    assert sidecar["ModelSHA256"] == listed_weights_sha256(tiny_model)
    assert sidecar["SamplerSettings"]["n_samples"] == 2
    std_path = folder / "sub-01_space-orig_model-qid2_param-std_dwimap.nii.gz"
    std = np.asarray(nib.load(std_path).dataobj)
    n_synth = len(sidecar["SynthesizedVolumes"])
    assert std.shape == (*nib.load(dwi).shape[:3], n_synth) and std.dtype == np.float32
    mask = np.asarray(nib.load(folder / "sub-01_space-orig_desc-brain_mask.nii.gz").dataobj) > 0
    assert (std[~mask] == 0).all() and std[mask].max() > 0 and std.min() >= 0
    info = json.loads(std_path.with_name(std_path.name.replace(".nii.gz", ".json")).read_text())
    assert info["VolumeIndices"] == sidecar["SynthesizedVolumes"]
    assert info["ModelSHA256"] == sidecar["ModelSHA256"]
    report = (out / "sub-01.html").read_text()
    figure = out / "sub-01" / "figures" / "sub-01_space-orig_desc-uncertainty_dwimap.png"
    assert figure.stat().st_size > 0 and figure.name in report
    assert "Uncertainty of the diffusion engine" in report
    assert_valid_derivative(out)


def test_channels_last_on_the_cpu_changes_only_the_rounding(tiny_model, volume, reference):
    """The CPU runs the network with channels-last weights, and gives them back unchanged."""
    from qid2_bidsapp.model import inference

    engine = _engine(tiny_model)
    weights = {k: v.clone() for k, v in engine.network.state_dict().items()}
    previous = inference.CPU_CHANNELS_LAST
    try:
        inference.CPU_CHANNELS_LAST = False
        mean, std = _run(engine, volume)
    finally:
        inference.CPU_CHANNELS_LAST = previous
    _close(mean, reference[0])
    _close(std, reference[1])
    _run(engine, volume)  # channels-last (the default) once more: the layout is restored
    for name, value in engine.network.state_dict().items():
        assert value.is_contiguous(), name
        assert torch.equal(value, weights[name]), name
    with inference.cpu_channels_last(engine.network, torch.device("cpu"), enabled=True):
        convs = [p for p in engine.network.parameters() if p.dim() == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        assert not all(p.is_contiguous() for p in convs)
