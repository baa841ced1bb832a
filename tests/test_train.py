"""Tests of the training data pipeline and loop (qid2_bidsapp.model.data / .train): CPU, tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from qid2_bidsapp.engines.sh import sh_order_for, sh_prediction_matrix
from qid2_bidsapp.errors import InputError, Qid2Error
from qid2_bidsapp.gradients import select_target_directions
from qid2_bidsapp.model.conditioning import (
    TOKEN_FEATURES,
    normalise_signal,
    select_references,
    to_model_space,
)
from qid2_bidsapp.model.data import (
    Augmentation,
    ExampleSampler,
    PhantomSource,
    PreparedVolume,
    Volume,
    VolumeSource,
    hide_directions,
    make_example,
    model_frame_bvecs,
    prepare_volumes,
    resample_slices,
    rotate_in_plane,
    sh_prior_for_target,
)

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("einops")

from qid2_bidsapp.cli.train import main as train_main  # noqa: E402
from qid2_bidsapp.model import train as train_module  # noqa: E402
from qid2_bidsapp.model.checkpoint import load_model  # noqa: E402
from qid2_bidsapp.model.train import TrainConfig, train  # noqa: E402

EXAMPLE_CONFIG = Path(train_module.__file__).parents[1] / "data" / "train_example.json"
R = 4
CLIP = 1.5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantom_volumes() -> list[PreparedVolume]:
    source = PhantomSource(2, seed=3, size=(28, 36), n_slices=3, n_directions=(12, 24))
    return prepare_volumes([source])[0]


def _config(tmp_path: Path, **overrides) -> dict:
    values = {
        "sources": [
            {
                "kind": "phantom",
                "n_volumes": 2,
                "size": [28, 36],
                "n_slices": 2,
                "n_directions": [10, 20],
            }
        ],
        "validation_sources": [
            {"kind": "phantom", "n_volumes": 1, "seed": 5, "size": [28, 28], "n_slices": 2}
        ],
        "model": {"preset": "tiny"},
        "crop": 32,
        "batch_size": 4,
        "lr": 1e-3,
        "steps": 24,
        "log_every": 1,
        "validate_every": 12,
        "n_val_examples": 4,
        "n_sample_examples": 2,
        "sample_steps": 2,
        "output": str(tmp_path / "run"),
    }
    values.update(overrides)
    return values


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- examples


def test_examples_are_deterministic_with_the_right_shapes(phantom_volumes):
    volume = phantom_volumes[0]
    args = {"n_references": R, "clip": CLIP, "crop": 32, "augmentation": Augmentation()}
    a = make_example(volume, np.random.default_rng(7), **args)
    b = make_example(volume, np.random.default_rng(7), **args)
    c = make_example(volume, np.random.default_rng(8), **args)
    assert a["target"].shape == (1, 32, 32) and a["mask"].shape == (1, 32, 32)
    assert a["condition"].shape == (R + 1, 32, 32) and a["tokens"].shape == (R + 1, TOKEN_FEATURES)
    for key in ("target", "condition", "tokens", "mask"):
        assert a[key].dtype == np.float32
        np.testing.assert_array_equal(a[key], b[key])
    assert a["meta"] == b["meta"] and a["meta"] != c["meta"]
    assert set(np.unique(a["mask"])) <= {0.0, 1.0} and a["mask"].sum() > 50
    for key in ("target", "condition"):
        assert a[key].min() >= -1.0 and a[key].max() <= 1.0
    n = len(volume.shells[a["meta"]["bval"]])
    assert 6 <= a["meta"]["n_kept"] <= n - 1
    assert a["meta"]["target_index"] not in a["meta"]["kept_indices"]
    sampler = ExampleSampler([phantom_volumes], [1.0], np.random.default_rng(0), **args)
    batch = sampler.batch(3)
    assert batch["condition"].shape == (3, R + 1, 32, 32) and len(batch["meta"]) == 3


def test_hide_directions_varies_the_input_count():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(200):
        target, kept = hide_directions(12, rng, 6)
        assert target not in kept and 6 <= len(kept) <= 11 and len(set(kept.tolist())) == len(kept)
        counts.add(len(kept))
    assert counts == set(range(6, 12))
    _, kept = hide_directions(40, rng, 6, max_keep=8)
    assert len(kept) <= 8
    with pytest.raises(ValueError):
        hide_directions(6, rng, 6)


def test_prior_equals_a_direct_sh_computation(phantom_volumes):
    rng = np.random.default_rng(0)
    kept = select_target_directions(np.empty((0, 3)), 15, seed=1)
    target = select_target_directions(kept, 1, seed=2)[0]
    signal = rng.uniform(100, 1000, (5, 4, 15))
    matrix = sh_prediction_matrix(kept, target[None], sh_order_for(15), 0.006)
    np.testing.assert_allclose(
        sh_prior_for_target(signal, kept, target), signal @ matrix[0], rtol=1e-5
    )

    # end to end: without augmentation the crop is exact and the prior channel is the SH fit
    volume = phantom_volumes[1]
    ex = make_example(volume, np.random.default_rng(1), n_references=R, clip=CLIP, crop=32)
    meta = ex["meta"]
    bvecs_kept = volume.bvecs[meta["kept_indices"]]
    bvec_target = volume.bvecs[meta["target_index"]]
    np.testing.assert_allclose(meta["target_bvec"], bvec_target)
    direct = sh_prediction_matrix(
        bvecs_kept, bvec_target[None], sh_order_for(len(bvecs_kept)), 0.006
    )
    start = np.asarray(meta["centre"]) - 15.5
    i, j = int(start[0]), int(start[1])
    assert np.allclose(start, [i, j])
    z = meta["slice"]

    def window(image):  # the crop window, zero-padded where it leaves the image
        padded = np.pad(image, [(32, 32), (32, 32)] + [(0, 0)] * (image.ndim - 2))
        return padded[i + 32 : i + 64, j + 32 : j + 64]

    data = window(volume.data[:, :, z])
    b0 = window(volume.b0[:, :, z])
    prior = data[..., meta["kept_indices"]] @ direct[0]
    expected = to_model_space(normalise_signal(prior, b0, CLIP), CLIP)
    np.testing.assert_allclose(ex["condition"][-1], expected, atol=1e-5)
    refs = select_references(bvec_target, bvecs_kept, R)
    assert meta["ref_indices"] == np.asarray(meta["kept_indices"])[refs].tolist()
    for k, index in enumerate(meta["ref_indices"]):
        ref = to_model_space(normalise_signal(data[..., index], b0, CLIP), CLIP)
        np.testing.assert_allclose(ex["condition"][k], ref, atol=1e-5)
    truth = to_model_space(normalise_signal(data[..., meta["target_index"]], b0, CLIP), CLIP)
    np.testing.assert_allclose(ex["target"][0], truth, atol=1e-5)


# --------------------------------------------------------------------------- frames, rotation


def _stripe_volume(fsl_det_positive: bool = False, size: int = 48) -> tuple[Volume, np.ndarray]:
    """A single-fibre bundle: a spatial stripe along u whose fibres also point along u."""
    u = np.array([np.cos(np.deg2rad(20.0)), np.sin(np.deg2rad(20.0)), 0.0])
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    offsets = np.stack([ii, jj], -1) - (size - 1) / 2.0
    stripe = np.abs(offsets @ np.array([-u[1], u[0]])) < 5.0
    bvecs = select_target_directions(np.empty((0, 3)), 30, seed=3)
    fibre = np.exp(-1000.0 * (0.2e-3 + 1.5e-3 * (bvecs @ u) ** 2))
    signal = np.where(stripe[..., None], fibre, np.exp(-0.8)) * 1000.0
    data = np.concatenate([np.full((size, size, 1), 1000.0), signal], axis=-1)
    data = np.repeat(data[:, :, None], 3, axis=2).astype(np.float32)
    all_bvecs = np.vstack([np.zeros(3), bvecs])
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    if fsl_det_positive:  # the same acquisition stored neurologically: FSL flips x
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        all_bvecs = all_bvecs * np.array([-1.0, 1.0, 1.0])
    mask = np.repeat(stripe[:, :, None], 3, axis=2)
    return Volume(data, np.r_[0.0, np.full(30, 1000.0)], all_bvecs, mask, affine), u


def _fibre_model(bvecs: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.exp(-1000.0 * (0.2e-3 + 1.5e-3 * (np.asarray(bvecs) @ u) ** 2))


@pytest.mark.parametrize("angle", [40.0, -40.0, 12.0])
@pytest.mark.parametrize("det_positive", [False, True])
def test_rotation_turns_image_and_gradients_together(angle, det_positive):
    volume, u = _stripe_volume(det_positive)
    aug = Augmentation(rotation_deg=15.0, scale=(1.0, 1.0), intensity=(1.0, 1.0))
    args = {"n_references": R, "clip": CLIP, "crop": 32, "augmentation": aug}
    ex = make_example(PreparedVolume(volume), np.random.default_rng(0), **args, angle_deg=angle)
    meta = ex["meta"]
    assert meta["angle_deg"] == angle
    # the stripe in the output image is along u rotated by +angle (first axis toward second)
    mask = ex["mask"][0] > 0
    points = np.argwhere(mask).astype(float)
    points -= points.mean(axis=0)
    axis = np.linalg.eigh(points.T @ points)[1][:, -1]
    image_angle = np.degrees(np.arctan2(axis[1], axis[0])) % 180.0
    assert abs(image_angle - (20.0 + angle) % 180.0) < 3.0
    # and the signals agree with the fibre model evaluated at the rotated directions
    u_rot = rotate_in_plane(u[None], angle)[0]
    inner = ndimage.binary_erosion(mask, iterations=2)
    images = np.concatenate([ex["condition"][:R], ex["target"]])
    observed = [np.median((img[inner] + 1.0) * CLIP / 2.0) for img in images]
    directions = np.vstack([meta["ref_bvecs"], [meta["target_bvec"]]])
    np.testing.assert_allclose(observed, _fibre_model(directions, u_rot), atol=0.01)
    # the opposite rotation of the gradients would not match
    u_wrong = rotate_in_plane(u[None], -angle)[0]
    assert np.abs(np.subtract(observed, _fibre_model(directions, u_wrong))).max() > 0.02


def test_model_frame_and_fsl_flip():
    bvecs = np.array([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    radiological = np.diag([-2.0, 2.0, 2.0, 1.0])
    neurological = np.diag([2.0, 2.0, 2.0, 1.0])
    np.testing.assert_allclose(model_frame_bvecs(bvecs, radiological), bvecs)
    np.testing.assert_allclose(model_frame_bvecs(bvecs, neurological), bvecs * [-1, 1, 1])
    # slices along axis 0: in-plane axes (1, 2), then the slice axis
    np.testing.assert_allclose(model_frame_bvecs(bvecs, radiological, 0), bvecs[:, [1, 2, 0]])
    # the same acquisition stored both ways gives the same example
    args = {"n_references": R, "clip": CLIP, "crop": 32, "augmentation": Augmentation()}
    a = make_example(PreparedVolume(_stripe_volume(False)[0]), np.random.default_rng(4), **args)
    b = make_example(PreparedVolume(_stripe_volume(True)[0]), np.random.default_rng(4), **args)
    for key in ("target", "condition", "tokens", "mask"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)


def test_resample_without_rotation_is_an_exact_crop():
    image = np.arange(20 * 30, dtype=np.float32).reshape(20, 30, 1)
    out = resample_slices(image, (9.5, 14.5), (8, 8))
    np.testing.assert_array_equal(out[..., 0], image[6:14, 11:19, 0])
    turned = resample_slices(image, (9.5, 14.5), (8, 8), angle_deg=90.0)
    np.testing.assert_allclose(turned[..., 0], np.rot90(image[6:14, 11:19, 0], k=1), atol=1e-3)
    vector = rotate_in_plane(np.array([[1.0, 0.0, 0.3]]), 90.0)
    np.testing.assert_allclose(vector, [[0.0, 1.0, 0.3]], atol=1e-12)


def test_sources_follow_the_protocol():
    assert isinstance(PhantomSource(1), VolumeSource)
    volumes = list(PhantomSource(2, seed=1, size=(20, 20), n_slices=2).volumes())
    again = list(PhantomSource(2, seed=1, size=(20, 20), n_slices=2).volumes())
    assert volumes[0].clean is not None
    np.testing.assert_array_equal(volumes[1].data, again[1].data)
    with pytest.raises(Qid2Error, match="no shell"):
        v = volumes[0]
        PreparedVolume(Volume(v.data[..., :5], v.bvals[:5], v.bvecs[:5], v.mask))


@pytest.mark.realdata
def test_bids_source_on_real_scans(real_bids):
    from qid2_bidsapp.model.data import BidsSource

    source = BidsSource(real_bids, participant_label=["vanderbilt"])
    (volumes,) = prepare_volumes([source])
    assert len(volumes) == 1 and volumes[0].describe()["shells"] == {"2000": 15}
    ex = make_example(volumes[0], np.random.default_rng(0), n_references=R, clip=CLIP)
    assert ex["condition"].shape == (R + 1, 64, 64) and ex["mask"].mean() > 0.2
    assert source.describe()["runs"] == ["sub-vanderbilt/dwi/sub-vanderbilt_dwi.nii.gz"]
    with pytest.raises(InputError):
        list(BidsSource(real_bids, participant_label=["nobody"]).volumes())


# --------------------------------------------------------------------------- training


def test_training_loss_falls(tmp_path):
    folder = train(
        TrainConfig.from_dict(_config(tmp_path, validate_every=100)), echo=lambda s: None
    )
    losses = [r["loss"] for r in _log(tmp_path / "run") if r["event"] == "train"]
    assert len(losses) == 24
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    assert folder == tmp_path / "run" / "qid2-model"


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    steps = {"steps": 6, "validate_every": 4}
    whole = TrainConfig.from_dict(_config(tmp_path / "a", **steps))
    train(whole, echo=lambda s: None)
    reference = torch.load(tmp_path / "a" / "run" / "training_state.pt", weights_only=True)

    clock = iter(float(t) for t in range(10_000))
    monkeypatch.setattr(train_module, "_now", lambda: next(clock))
    chunked = TrainConfig.from_dict(_config(tmp_path / "b", max_minutes=0.1, **steps))
    state = train(chunked, echo=lambda s: None)  # the fake clock runs out of time mid-way
    assert state.name == "training_state.pt"
    stopped = torch.load(state, weights_only=True)["step"]
    assert 0 < stopped < 6
    monkeypatch.setattr(train_module, "_now", iter(float(t) for t in range(10_000)).__next__)
    resumed = TrainConfig.from_dict(_config(tmp_path / "b", **steps))
    train(resumed, echo=lambda s: None)
    final = torch.load(tmp_path / "b" / "run" / "training_state.pt", weights_only=True)
    assert final["step"] == reference["step"] == 6
    for name, tensor in reference["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    ref_moments = reference["optimizer"]["state"]
    for key, value in final["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], ref_moments[key]["exp_avg"])
    events = [r["event"] for r in _log(tmp_path / "b" / "run")]
    assert "stop" in events and "resume" in events and events[-1] == "export"
    train_steps = [r["step"] for r in _log(tmp_path / "b" / "run") if r["event"] == "train"]
    assert train_steps == list(range(1, 7))

    changed = TrainConfig.from_dict(_config(tmp_path / "b", **steps, batch_size=2))
    with pytest.raises(Qid2Error, match="batch_size"):
        train(changed, echo=lambda s: None)


def test_first_ctrl_c_stops_between_steps(tmp_path, monkeypatch):
    import signal

    original = train_module.Trainer.train_step

    def step_then_interrupt(self):
        loss = original(self)
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        return loss

    monkeypatch.setattr(train_module.Trainer, "train_step", step_then_interrupt)
    state = train(TrainConfig.from_dict(_config(tmp_path, steps=5)), echo=lambda s: None)
    assert torch.load(state, weights_only=True)["step"] == 2
    assert _log(tmp_path / "run")[-1]["reason"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_export_round_trip(tmp_path):
    config = TrainConfig.from_dict(_config(tmp_path, steps=3))
    folder = train(config, echo=lambda s: None)
    network, model_config, info = load_model(folder)
    assert model_config == config.model_config()
    training = info["training"]
    assert training["steps"] == 3 and training["optimizer"]["lr"] == 1e-3
    metrics = training["final_metrics"]
    assert metrics["step"] == 3 and {"nrmse_network", "nrmse_prior", "val_loss"} <= set(metrics)
    state = torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    card = (folder / "MODEL_CARD.md").read_text()
    assert "SH prior alone" in card and "phantom" in card and "Limits" in card
    assert "Verdict: " in card and "not measured" not in card
    # --export rewrites the model folder from the state without training
    assert train(config, export_only=True, echo=lambda s: None) == folder


def test_cli_train_resume_export_and_errors(tmp_path, capsys):
    config_path = tmp_path / "config.json"
    values = _config(tmp_path, steps=2)
    values["output"] = "out"  # relative to the config file's folder
    config_path.write_text(json.dumps(values))
    assert train_main([str(config_path), "--max-minutes", "0"]) == 0
    assert "state:" in capsys.readouterr().out
    assert torch.load(tmp_path / "out" / "training_state.pt", weights_only=True)["step"] == 0
    assert train_main([str(config_path), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "qid2-model" / "model.safetensors").is_file()
    assert train_main([str(config_path), "--export"]) == 0
    capsys.readouterr()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**values, "learning_rate": 1.0}))
    assert train_main([str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown field(s): learning_rate" in err
    bad.write_text(json.dumps({**values, "sources": [{"kind": "bids", "path": "nowhere"}]}))
    assert train_main([str(bad)]) == 1
    assert "not a BIDS dataset" in capsys.readouterr().err
    bad.write_text("{not json")
    assert train_main([str(bad)]) == 1
    assert "not valid json" in capsys.readouterr().err
    assert train_main([str(tmp_path / "missing.json")]) == 1
    assert train_main([str(config_path), "--output", str(tmp_path / "new"), "--export"]) == 1
    assert "no training state" in capsys.readouterr().err


def test_config_validation(tmp_path):
    with pytest.raises(Qid2Error, match="preset"):
        TrainConfig.from_dict(_config(tmp_path, model={"preset": "huge"}))
    with pytest.raises(Qid2Error, match="unknown model field"):
        TrainConfig.from_dict(_config(tmp_path, model={"preset": "tiny", "chanels": [8]}))
    with pytest.raises(Qid2Error, match="multiple of 4"):
        TrainConfig.from_dict(_config(tmp_path, crop=30))
    with pytest.raises(Qid2Error, match="augmentation"):
        TrainConfig.from_dict(_config(tmp_path, augmentation={"rotate": 5}))
    config = TrainConfig.from_dict(_config(tmp_path, model={"preset": "tiny", "n_references": 3}))
    assert config.model_config().n_references == 3
    assert TrainConfig.from_dict(config.to_dict()) == config
    toml = tmp_path / "sub" / "config.toml"
    toml.parent.mkdir()
    toml.write_text(
        'output = "out"\nsteps = 5\n[model]\npreset = "tiny"\n'
        '[[sources]]\nkind = "bids"\npath = "../data"\nweight = 2.0\n'
    )
    loaded = TrainConfig.from_file(toml)
    assert loaded.steps == 5 and loaded.output == str(tmp_path / "sub" / "out")
    assert loaded.sources == [{"kind": "bids", "path": str(tmp_path / "data"), "weight": 2.0}]


def test_example_config_resolves_paths():
    config = TrainConfig.from_file(EXAMPLE_CONFIG)
    paths = [s["path"] for s in config.sources + config.validation_sources if "path" in s]
    assert paths and all(
        Path(p).is_absolute() and p.endswith("shared/data/bids-real") for p in paths
    )
    assert config.model_config().channels == (32, 64, 64)
    assert Path(config.output).is_absolute()


def test_lr_history_segments_a_log_with_a_lowered_learning_rate(tmp_path):
    import json

    from qid2_bidsapp.model.train import _lr_text, lr_history

    log = tmp_path / "train_log.jsonl"
    events = [{"event": "start"}]
    events += [{"event": "train", "step": s, "lr": 3e-4, "loss": 0.1} for s in (25, 50, 75)]
    events += [{"event": "val", "step": 75}, {"event": "resume", "step": 50}]
    events += [{"event": "train", "step": s, "lr": 5e-5, "loss": 0.1} for s in (75, 100)]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    segments = lr_history(log)
    assert segments == [
        {"from_step": 25, "to_step": 75, "lr": 3e-4},
        {"from_step": 75, "to_step": 100, "lr": 5e-5},
    ]
    text = _lr_text({"lr_history": segments, "optimizer": {"lr": 5e-5}})
    assert text == "0.0003 (logged steps 25-75), then 5e-05 (logged steps 75-100)"
    assert _lr_text({"lr_history": segments[:1], "optimizer": {"lr": 3e-4}}) == "0.0003"
    assert lr_history(tmp_path / "missing.jsonl") == []


# --------------------------------------------------------------------------- fine-tuning


def test_prior_lambda_reaches_the_examples(phantom_volumes):
    volume = phantom_volumes[1]
    default = make_example(volume, np.random.default_rng(1), n_references=R, clip=CLIP, crop=32)
    sharp = make_example(
        volume, np.random.default_rng(1), n_references=R, clip=CLIP, crop=32, prior_lambda=0.0
    )
    assert default["meta"] == sharp["meta"]
    np.testing.assert_array_equal(default["condition"][:-1], sharp["condition"][:-1])
    assert not np.allclose(default["condition"][-1], sharp["condition"][-1])  # the prior


def test_init_model_starts_from_its_weights_with_overrides(tmp_path):
    base = train(TrainConfig.from_dict(_config(tmp_path / "a", steps=2)), echo=lambda s: None)
    network, base_config, info = load_model(base)
    values = _config(tmp_path / "b", steps=2, init_model=str(base), lr=1e-9)
    values["model"] = {"prior_lambda": 0.0006}
    config = TrainConfig.from_dict(values)
    assert config.model_config().prior_lambda == 0.0006
    assert config.model_config().channels == base_config.channels
    trainer = train_module.Trainer(config, log=lambda s: None)
    for name, tensor in network.state_dict().items():
        assert torch.equal(trainer.network.state_dict()[name], tensor), name
    assert trainer.init_info["sha256"] == info["sha256"]
    folder = train(config, echo=lambda s: None)
    _, tuned_config, tuned = load_model(folder)
    assert tuned_config.prior_lambda == 0.0006
    assert tuned["training"]["sh_prior"]["lambda"] == 0.0006
    assert tuned["training"]["init_model"]["sha256"] == info["sha256"]
    assert f"Fine-tuned from model `{info['model_id']}`" in (folder / "MODEL_CARD.md").read_text()
    assert "Started from random weights" in (base / "MODEL_CARD.md").read_text()


def test_init_model_errors(tmp_path):
    base = train(TrainConfig.from_dict(_config(tmp_path / "a", steps=1)), echo=lambda s: None)
    with pytest.raises(Qid2Error, match="either model.preset or init_model"):
        TrainConfig.from_dict(_config(tmp_path / "b", init_model=str(base)))
    with pytest.raises(InputError, match="config.json"):
        values = _config(tmp_path / "b", init_model=str(tmp_path / "none"))
        TrainConfig.from_dict({**values, "model": {}})
    values = {**_config(tmp_path / "b", init_model=str(base)), "model": {"channels": [8, 8, 16]}}
    with pytest.raises(Qid2Error, match="do not fit the configured network"):
        train_module.Trainer(TrainConfig.from_dict(values), log=lambda s: None)
