"""Training of the QID² network: configuration, loop, validation, resumable state, export.

``train(config)`` runs (or resumes) a training in ``config.output``::

    <output>/
      training_state.pt   weights, optimiser, RNG states, step (resume from here)
      train_log.jsonl     one JSON object per line: start/resume, train, val, stop, export
      train_config.json   the resolved configuration of the last run
      <name>/             the exported model folder (`checkpoint.save_model`)

The loss is the masked MSE of the network's prediction (epsilon by default) on noisy targets
``add_noise(x0, noise, t)`` with uniform timesteps, inside the brain mask only. All randomness
comes from a numpy generator (examples) and a torch generator (noise, timesteps), both saved in
the training state: resuming continues the very same sequence of batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import Qid2Error
from ..shm import ORDER_RULE
from .checkpoint import (
    load_model,
    load_training_state,
    read_model_config,
    save_model,
    save_training_state,
)
from .conditioning import from_model_space
from .config import ModelConfig
from .data import (
    DEFAULT_CROP,
    DEFAULT_MIN_KEEP,
    Augmentation,
    BidsSource,
    ExampleSampler,
    PhantomSource,
    make_example,
    prepare_volumes,
    stack_examples,
)
from .network import Qid2Network
from .sampler import Qid2Sampler, make_scheduler

STATE_NAME = "training_state.pt"
LOG_NAME = "train_log.jsonl"
CONFIG_COPY_NAME = "train_config.json"

#: Model presets (``model.preset`` in the configuration).
PRESETS = {"tiny": ModelConfig.tiny, "small": ModelConfig.small, "default": ModelConfig}

#: Fields that may change between a run and its resumption.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "lr",  # lowering the learning rate for a final chunk is a resumable change
        "max_minutes",
        "log_every",
        "validate_every",
        "sample_every",
        "checkpoint_every",
        "device",
        "amp",
        "num_threads",
        "output",
        "name",
    }
)

#: The clock of the time limit (module level so tests can replace it).
_now = time.monotonic


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything a training run needs, loadable from JSON or TOML.

    Parameters
    ----------
    sources : list of dict
        Training sources: ``{"kind": "phantom", ...PhantomSource arguments}`` or
        ``{"kind": "bids", "path": ..., ...BidsSource arguments}``; each may have a
        ``"weight"`` (relative probability of drawing from it, default 1).
    validation_sources : list of dict
        Held-out sources for validation (same format). Empty: validation examples are drawn
        (without augmentation) from the training volumes, which only checks fitting.
    model : dict
        ``{"preset": "default" | "small" | "tiny", ...ModelConfig fields to override}``
        (no preset: ``default``; with `init_model`: the initial model's configuration).
    init_model : str or None
        A model folder (`checkpoint.save_model`) whose weights the network starts from: a
        fine-tune of the shipped model on a site's own scans, or with a changed
        ``prior_lambda`` or ``sampler_defaults`` (``model`` overrides; fields that change the
        architecture are refused when the weights are loaded). Relative to the config file.
    output : str
        Output folder (state, log, model).
    name : str
        Name of the exported model folder inside `output`.
    crop : int
        Training crop H = W (a multiple of the model's ``spatial_multiple``).
    slice_axis : int
        Voxel axis the slices are taken along.
    min_keep, max_keep : int
        Range of the number of kept (input) directions; ``max_keep`` None: N - 1.
    clean_target : bool
        Use a source's noise-free signal as the target where it has one (phantom).
    augmentation : dict
        `Augmentation` fields (rotation_deg, scale, intensity, noise_prob, noise_snr).
    batch_size : int
        Examples per step.
    lr : float
        Adam learning rate (the paper: 2.5e-5).
    betas : list of float
        Adam betas (the paper: 0.5, 0.999).
    weight_decay : float
        Adam weight decay.
    grad_clip : float or None
        Gradient-norm clip.
    warmup_steps : int
        Linear learning-rate warm-up.
    steps : int
        Total optimisation steps.
    max_minutes : float or None
        Stop cleanly (saving the state) after this many minutes of this run.
    log_every, validate_every, checkpoint_every : int
        Intervals in steps.
    sample_every : int
        Every this many validations, also sample with the truncated DDIM sampler.
    n_val_examples, n_sample_examples : int
        Validation examples (loss), and how many of them are sampled.
    max_timestep : int or None
        Train on diffusion timesteps ``0..max_timestep`` only (None: the whole schedule). A
        model sampled with a truncated start at ``t_start`` never sees later timesteps, so
        ``max_timestep >= t_start`` spends all training on the steps it will run.
    sample_steps, sample_t_start : int
        Sampler steps and truncation.
    sample_temperature : float
        Sampler temperature.
    sample_n : int
        Samples averaged per example.
    seed : int
        Seed of everything.
    device : str
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    amp : bool
        Mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler).
    num_threads : int or None
        torch CPU threads.

    """

    sources: list[dict]
    validation_sources: list[dict] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    init_model: str | None = None
    output: str = "qid2-training"
    name: str = "qid2-model"
    crop: int = DEFAULT_CROP
    slice_axis: int = 2
    min_keep: int = DEFAULT_MIN_KEEP
    max_keep: int | None = None
    clean_target: bool = False
    augmentation: dict = field(default_factory=dict)
    batch_size: int = 8
    lr: float = 2.5e-5
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    steps: int = 10000
    max_minutes: float | None = None
    log_every: int = 10
    validate_every: int = 200
    sample_every: int = 2
    checkpoint_every: int = 500
    n_val_examples: int = 32
    n_sample_examples: int = 8
    max_timestep: int | None = None
    sample_steps: int = 5
    sample_t_start: int = 200
    sample_temperature: float = 1.0
    sample_n: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_threads: int | None = None

    def __post_init__(self) -> None:
        self.betas = [float(b) for b in self.betas]
        self.validate()

    def validate(self) -> None:
        """Check the values (the model and sources are checked when built).

        Raises
        ------
        Qid2Error
            Naming the first bad field.

        """
        if not self.sources:
            raise Qid2Error("config: 'sources' must list at least one training source")
        positive = ("crop", "batch_size", "steps", "log_every", "validate_every")
        positive += ("sample_every", "checkpoint_every", "n_val_examples", "sample_steps")
        positive += ("sample_n",)
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise Qid2Error(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise Qid2Error(f"config: need lr > 0 and two betas in [0, 1): {self.lr}, {self.betas}")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise Qid2Error(f"config: max_minutes must be >= 0, got {self.max_minutes}")
        if self.min_keep < 1 or (self.max_keep is not None and self.max_keep < self.min_keep):
            raise Qid2Error(
                f"config: need 1 <= min_keep <= max_keep: {self.min_keep}, {self.max_keep}"
            )
        n_t = self.model_config().num_train_timesteps
        if self.max_timestep is not None and not 0 <= self.max_timestep < n_t:
            raise Qid2Error(f"config: max_timestep must be between 0 and {n_t - 1}")
        if not 0 <= self.n_sample_examples <= self.n_val_examples:
            raise Qid2Error("config: n_sample_examples must be between 0 and n_val_examples")
        self.augmentation_settings()  # raises for unknown fields
        multiple = self.model_config().spatial_multiple
        if self.crop % multiple:
            raise Qid2Error(f"config: crop {self.crop} must be a multiple of {multiple}")

    # ------------------------------------------------------------------ derived objects

    def model_config(self) -> ModelConfig:
        """Build the `ModelConfig` from ``model`` (preset + overrides).

        Returns
        -------
        ModelConfig

        Raises
        ------
        Qid2Error
            For an unknown preset or field, or inconsistent values.

        """
        values = dict(self.model)
        preset = values.pop("preset", None)
        if self.init_model is not None:
            if preset is not None:
                raise Qid2Error(
                    "config: give either model.preset or init_model (whose configuration the "
                    "model then has), not both"
                )
            base = read_model_config(Path(self.init_model)).to_dict()
        elif (preset or "default") not in PRESETS:
            raise Qid2Error(
                f"config: model preset must be one of {sorted(PRESETS)}, got {preset!r}"
            )
        else:
            base = PRESETS[preset or "default"]().to_dict()
        unknown = sorted(set(values) - set(base))
        if unknown:
            raise Qid2Error(f"config: unknown model field(s): {', '.join(unknown)}")
        try:
            return ModelConfig.from_dict({**base, **values})
        except (ValueError, TypeError) as err:
            raise Qid2Error(f"config: invalid model: {err}") from err

    def augmentation_settings(self) -> Augmentation:
        """Build the `Augmentation` from ``augmentation``.

        Returns
        -------
        Augmentation

        """
        try:
            return Augmentation(**self.augmentation)
        except TypeError as err:
            raise Qid2Error(f"config: invalid augmentation: {err}") from err

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a JSON-serialisable dict.

        Returns
        -------
        dict

        """
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any], base_dir: str | Path | None = None) -> TrainConfig:
        """Build a configuration, resolving relative paths against `base_dir`.

        Parameters
        ----------
        values : dict
            Field values.
        base_dir : str or Path, optional
            Folder relative ``output`` and source ``path`` values are relative to (default:
            the current directory). Without ``output``: ``./qid2-training`` in the current
            directory.

        Returns
        -------
        TrainConfig

        Raises
        ------
        Qid2Error
            For unknown fields or bad values.

        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise Qid2Error(f"config: unknown field(s): {', '.join(unknown)}")
        if "sources" not in values:
            raise Qid2Error("config: missing 'sources'")
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        values = dict(values)
        for key in ("sources", "validation_sources"):
            values[key] = [_resolve_source(s, base) for s in values.get(key) or []]
        if values.get("init_model"):
            values["init_model"] = str(_resolve(values["init_model"], base))
        output = values.get("output")
        values["output"] = str(_resolve(output, base) if output else Path.cwd() / cls.output)
        try:
            return cls(**values)
        except TypeError as err:
            raise Qid2Error(f"config: {err}") from err

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a JSON (``.json``) or TOML (``.toml``) configuration file.

        Relative paths in it are relative to the file's folder.

        Parameters
        ----------
        path : str or Path
            The file.

        Returns
        -------
        TrainConfig

        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise Qid2Error(f"{path}: cannot be read ({err.strerror or err})") from None
        try:
            if path.suffix.lower() == ".toml":
                import tomllib

                values = tomllib.loads(text)
            else:
                values = json.loads(text)
        except ValueError as err:
            raise Qid2Error(
                f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {err}"
            ) from None
        if not isinstance(values, dict):
            raise Qid2Error(f"{path}: the configuration must be an object/table")
        return cls.from_dict(values, base_dir=path.resolve().parent)


def _resolve(value: str | Path, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_source(spec: dict, base: Path) -> dict:
    if not isinstance(spec, dict) or "kind" not in spec:
        raise Qid2Error(f"config: each source must be an object with a 'kind', got {spec!r}")
    spec = dict(spec)
    if "path" in spec:
        spec["path"] = str(_resolve(spec["path"], base))
    return spec


def build_source(spec: dict) -> tuple[Any, float]:
    """Build a `VolumeSource` and its weight from a source specification.

    Parameters
    ----------
    spec : dict
        ``{"kind": "phantom" | "bids" | "simulated", "weight": float, ...constructor
        arguments}`` (``simulated``: `qid2_bidsapp.sim.SimulatedSource`).

    Returns
    -------
    source : VolumeSource
    weight : float

    Raises
    ------
    Qid2Error
        For an unknown kind or argument.

    """
    from ..sim.source import SimulatedSource

    spec = dict(spec)
    kind = spec.pop("kind")
    weight = float(spec.pop("weight", 1.0))
    kinds = {"phantom": PhantomSource, "bids": BidsSource, "simulated": SimulatedSource}
    if kind not in kinds:
        raise Qid2Error(f"config: unknown source kind {kind!r} (use {' or '.join(kinds)})")
    try:
        return kinds[kind](**spec), weight
    except (TypeError, ValueError) as err:
        raise Qid2Error(f"config: bad {kind} source {spec}: {err}") from err


# --------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """Return the torch device of a configuration value.

    Parameters
    ----------
    name : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    torch.device

    Raises
    ------
    Qid2Error
        For CUDA without a usable GPU.

    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise Qid2Error(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Qid2Error(f"device {name!r} requested but no CUDA GPU is available")
    return device


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the voxels where ``mask`` is 1.

    Parameters
    ----------
    prediction, target : Tensor, shape (B, 1, H, W)
        Network output and its target.
    mask : Tensor, shape (B, 1, H, W)
        0/1 weights.

    Returns
    -------
    Tensor
        Scalar.

    """
    return ((prediction - target).square() * mask).sum() / mask.sum().clamp(min=1.0)


def training_target(
    config: ModelConfig, scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Return what the network learns to output for ``add_noise(x0, noise, timesteps)``.

    Parameters
    ----------
    config : ModelConfig
        Its ``prediction_type`` (epsilon, sample or v_prediction) decides.
    scheduler : DDIMScheduler
        The noise schedule (`sampler.make_scheduler`).
    x0, noise : Tensor, shape (B, 1, H, W)
        Clean target and the noise added to it.
    timesteps : Tensor, shape (B,)
        The timesteps.

    Returns
    -------
    Tensor, shape (B, 1, H, W)

    """
    if config.prediction_type == "epsilon":
        return noise
    if config.prediction_type == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, timesteps)


def nrmse(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Normalised RMSE in a mask: ``||estimate - truth|| / ||truth||``.

    Parameters
    ----------
    estimate, truth : ndarray
        Same shape.
    mask : ndarray
        Boolean (or 0/1) mask of the same shape.

    Returns
    -------
    float

    """
    mask = np.asarray(mask) > 0
    err = np.sum((estimate[mask] - truth[mask]) ** 2)
    ref = np.sum(truth[mask] ** 2)
    return float(np.sqrt(err / ref)) if ref > 0 else float("nan")


def hardware_info(device: torch.device) -> dict[str, Any]:
    """Describe where training runs (for the training record).

    Parameters
    ----------
    device : torch.device
        The training device.

    Returns
    -------
    dict

    """
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _to_torch(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("target", "condition", "tokens", "mask")
    return {k: torch.from_numpy(np.ascontiguousarray(batch[k])).to(device) for k in keys}


# --------------------------------------------------------------------------- trainer


class Trainer:
    """State and steps of one training run (use `train`).

    Parameters
    ----------
    config : TrainConfig
        The configuration.
    log : callable
        Receives one human-readable line per event (default: print).

    """

    def __init__(self, config: TrainConfig, log=print):
        self.config = config
        self.print = log
        self.out = Path(config.output)
        self.model_config = config.model_config()
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(int(config.num_threads))
        torch.manual_seed(config.seed)
        self.network = Qid2Network(self.model_config).to(self.device)
        self.init_info = self._initial_weights()
        self.optimizer = torch.optim.Adam(
            self.network.parameters(),
            lr=config.lr,
            betas=tuple(config.betas),
            weight_decay=config.weight_decay,
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = None
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")
        self.scheduler = make_scheduler(self.model_config)
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.wall_s = 0.0
        self.metrics: dict[str, Any] = {}
        self.n_validations = 0
        self._load_data()

    # ------------------------------------------------------------------ setup

    def _initial_weights(self) -> dict[str, Any] | None:
        """Load ``init_model``'s weights into the network; return its id and checksum."""
        if self.config.init_model is None:
            return None
        network, _, info = load_model(self.config.init_model, device="cpu")
        try:
            self.network.load_state_dict(network.state_dict())
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1].strip()
            raise Qid2Error(
                f"config: init_model {self.config.init_model}: its weights do not fit the "
                f"configured network (a model field changes the architecture): {first}"
            ) from None
        return {"model_id": info["model_id"], "sha256": info["sha256"], "folder": info["folder"]}

    def _amp_dtype(self) -> torch.dtype | None:
        if not self.config.amp or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _example_args(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "n_references": self.model_config.n_references,
            "clip": self.model_config.signal_clip,
            "crop": cfg.crop,
            "min_keep": cfg.min_keep,
            "max_keep": cfg.max_keep,
            "clean_target": cfg.clean_target,
            "prior_lambda": self.model_config.prior_lambda,
        }

    def _load_data(self) -> None:
        cfg = self.config
        built = [build_source(s) for s in cfg.sources]
        self.sources = [s for s, _ in built]
        started = _now()
        volumes = prepare_volumes(self.sources, slice_axis=cfg.slice_axis, min_keep=cfg.min_keep)
        self.train_sampler = ExampleSampler(
            volumes,
            [w for _, w in built],
            self.rng,
            augmentation=cfg.augmentation_settings(),
            **self._example_args(),
        )
        self.val_sources = [build_source(s)[0] for s in cfg.validation_sources]
        val_volumes = volumes
        if self.val_sources:
            val_volumes = prepare_volumes(
                self.val_sources, slice_axis=cfg.slice_axis, min_keep=cfg.min_keep
            )
        self.val_labels = [_source_label(s) for s in (self.val_sources or self.sources)]
        self.val_set = self._validation_set(val_volumes)
        n_train = sum(len(v) for v in volumes)
        n_val = sum(len(v) for v in val_volumes)
        self.print(
            f"qid2-train: {n_train} training volume(s) from {len(volumes)} source(s), "
            f"{len(self.val_set['examples'])} validation examples from {n_val} volume(s) "
            f"({'held out' if self.val_sources else 'in-sample'}); "
            f"data ready in {_now() - started:.1f} s"
        )

    def _validation_set(self, volumes: list) -> dict:
        """Build fixed validation examples (round-robin over sources), noise and timesteps."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 1])
        examples, labels = [], []
        for i in range(cfg.n_val_examples):
            source = i % len(volumes)
            volume = volumes[source][int(rng.integers(len(volumes[source])))]
            examples.append(make_example(volume, rng, **self._example_args()))
            labels.append(self.val_labels[source])
        batch = stack_examples(examples)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        n_t = self._n_timesteps
        return {
            "examples": examples,
            "labels": labels,
            "batch": batch,
            "noise": torch.randn(batch["target"].shape, generator=gen),
            "timesteps": torch.linspace(0, n_t - 1, len(examples)).round().long(),
        }

    @property
    def _n_timesteps(self) -> int:
        """Number of training timesteps drawn from (``0..n - 1``)."""
        if self.config.max_timestep is None:
            return self.model_config.num_train_timesteps
        return self.config.max_timestep + 1

    # ------------------------------------------------------------------ loss and step

    def _training_target(self, x0, noise, timesteps):
        return training_target(self.model_config, self.scheduler, x0, noise, timesteps)

    def _loss(self, tensors, noise, timesteps) -> torch.Tensor:
        x0 = tensors["target"]
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        autocast = contextlib.nullcontext()
        if self.amp_dtype is not None:
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype)
        with autocast:
            out = self.network(x_t, tensors["condition"], timesteps, tensors["tokens"])
        target = self._training_target(x0, noise, timesteps)
        return masked_mse(out.float(), target, tensors["mask"])

    def train_step(self) -> float:
        """Draw a batch, take one optimisation step and return the loss.

        Returns
        -------
        float

        """
        cfg = self.config
        tensors = _to_torch(self.train_sampler.batch(cfg.batch_size), self.device)
        shape = tensors["target"].shape
        noise = torch.randn(shape, generator=self.generator).to(self.device)
        n_t = self._n_timesteps
        timesteps = torch.randint(0, n_t, (shape[0],), generator=self.generator).to(self.device)
        if cfg.warmup_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps)
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(tensors, noise, timesteps)
        if not torch.isfinite(loss):
            raise Qid2Error(f"training diverged at step {self.step + 1} (loss {loss.item()})")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        return float(loss.item())

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self, sample: bool) -> dict[str, Any]:
        """Compute the validation loss and, if `sample`, NRMSE of samples vs the SH prior.

        Parameters
        ----------
        sample : bool
            Also run the truncated DDIM sampler on the first ``n_sample_examples``.

        Returns
        -------
        dict
            ``val_loss``; with `sample`: ``nrmse_network``, ``nrmse_prior`` (pooled over the
            sampled examples, ``S/S0`` in the mask, against the hidden measured volume),
            ``by_source`` and ``n_sampled``.

        """
        cfg, vs = self.config, self.val_set
        self.network.eval()
        tensors = _to_torch(vs["batch"], self.device)
        losses, weights = [], []
        for start in range(0, len(vs["examples"]), cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            part = {k: v[sl] for k, v in tensors.items()}
            loss = self._loss(
                part, vs["noise"][sl].to(self.device), vs["timesteps"][sl].to(self.device)
            )
            losses.append(float(loss))
            weights.append(float(part["mask"].sum()))
        metrics: dict[str, Any] = {"val_loss": float(np.average(losses, weights=weights))}
        if sample and cfg.n_sample_examples:
            metrics.update(self._sample_metrics(tensors))
        self.network.train()
        return metrics

    def _sample_metrics(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        cfg, clip = self.config, self.model_config.signal_clip
        n = cfg.n_sample_examples
        sampler = Qid2Sampler(self.model_config)
        mean, _ = sampler.sample(
            self.network,
            tensors["condition"][:n],
            tensors["tokens"][:n],
            n_steps=cfg.sample_steps,
            t_start=cfg.sample_t_start,
            temperature=cfg.sample_temperature,
            n_samples=cfg.sample_n,
            generator=torch.Generator().manual_seed(cfg.seed + 2),
            amp=bool(self.amp_dtype),
        )
        pred = from_model_space(mean.cpu().numpy(), clip)
        truth = from_model_space(self.val_set["batch"]["target"][:n], clip)
        prior = from_model_space(self.val_set["batch"]["condition"][:n, -1:], clip)
        mask = self.val_set["batch"]["mask"][:n]
        labels = np.array(self.val_set["labels"][:n])
        by_source = {}
        for label in dict.fromkeys(labels.tolist()):
            sel = labels == label
            by_source[label] = {
                "network": nrmse(pred[sel], truth[sel], mask[sel]),
                "prior": nrmse(prior[sel], truth[sel], mask[sel]),
                "n": int(sel.sum()),
            }
        return {
            "nrmse_network": nrmse(pred, truth, mask),
            "nrmse_prior": nrmse(prior, truth, mask),
            "n_sampled": n,
            "by_source": by_source,
        }

    # ------------------------------------------------------------------ state

    def extra_state(self) -> dict[str, Any]:
        """Plain data saved with the training state (config, RNGs, time, metrics)."""
        return {
            "config": self.config.to_dict(),
            "numpy_rng": json.dumps(self.rng.bit_generator.state),
            "torch_generator": self.generator.get_state(),
            "wall_s": float(self.wall_s),
            "metrics": json.dumps(self.metrics),
            "n_validations": int(self.n_validations),
        }

    def save_state(self) -> Path:
        """Write the training state to ``<output>/training_state.pt``."""
        return save_training_state(
            self.out / STATE_NAME,
            self.network,
            self.optimizer,
            self.scaler,
            self.step,
            extra=self.extra_state(),
        )

    def load_state(self) -> None:
        """Restore a saved state (weights, optimiser, RNGs, step, time, metrics).

        Raises
        ------
        Qid2Error
            When the saved configuration differs in a field that cannot change on resume.

        """
        path = self.out / STATE_NAME
        step, extra = load_training_state(
            path, self.network, self.optimizer, self.scaler, map_location=self.device
        )
        _check_resumable(path, extra.get("config", {}), self.config.to_dict())
        self.step = step
        self.rng.bit_generator.state = json.loads(extra["numpy_rng"])
        self.generator.set_state(extra["torch_generator"])
        self.wall_s = float(extra.get("wall_s", 0.0))
        self.metrics = json.loads(extra.get("metrics", "{}"))
        self.n_validations = int(extra.get("n_validations", 0))


def _source_label(source) -> str:
    info = source.describe()
    if info["kind"] == "bids":
        return f"bids:{Path(info['path']).name}"
    return f"{info['kind']}:{info.get('seed', '')}"


def _check_resumable(path: Path, saved: dict, current: dict) -> None:
    changed = sorted(
        k
        for k in set(saved) | set(current)
        if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
    )
    if changed:
        raise Qid2Error(
            f"{path}: the configuration changed since this state was saved "
            f"({', '.join(changed)}); use --no-resume to start over, or another output folder"
        )


# --------------------------------------------------------------------------- the run


class _Log:
    """JSON-lines log plus one printed line per event."""

    def __init__(self, path: Path, echo):
        self.path = path
        self.echo = echo

    def __call__(self, event: str, line: str | None = None, **fields) -> None:
        record = {"event": event, **fields}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if line:
            self.echo(f"qid2-train: {line}")


def train(
    config: TrainConfig, *, resume: bool = True, export_only: bool = False, echo=print
) -> Path:
    """Train (or resume, or export) a QID² model as the configuration says.

    Parameters
    ----------
    config : TrainConfig
        The configuration; ``config.output`` holds the state, log and model.
    resume : bool
        Resume from ``<output>/training_state.pt`` when present; False deletes the state and
        log there and starts over.
    export_only : bool
        Do not train: load the state and write the model folder now.
    echo : callable
        Receives the printed lines.

    Returns
    -------
    Path
        The exported model folder when training finished (or `export_only`), else the saved
        training state (stopped by ``max_minutes`` or a first Ctrl-C, between two steps).

    Raises
    ------
    Qid2Error
        For bad configurations or data, or a state that cannot be resumed.

    """
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_NAME
    if not resume:
        state_path.unlink(missing_ok=True)
        (out / LOG_NAME).unlink(missing_ok=True)
    if export_only and not state_path.exists():
        raise Qid2Error(f"{state_path}: no training state to export")
    log = _Log(out / LOG_NAME, echo)
    trainer = Trainer(config, log=echo)
    (out / CONFIG_COPY_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if state_path.exists():
        trainer.load_state()
        log("resume", f"resumed at step {trainer.step} from {state_path}", step=trainer.step)
    else:
        log(
            "start",
            f"training {config.steps} steps on {trainer.device}",
            step=0,
            config=config.to_dict(),
            model=trainer.model_config.to_dict(),
        )
    if export_only or trainer.step >= config.steps:
        return _export(trainer, log)
    return _run(trainer, log)


class _StopOnInterrupt:
    """Turn the first Ctrl-C into a stop request honoured between two steps (exact resume).

    A second Ctrl-C interrupts at once (no state saved beyond the last checkpoint). Outside the
    main thread signals cannot be caught and nothing changes.
    """

    def __init__(self, echo):
        self.echo = echo
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        self.echo("qid2-train: stopping after this step (Ctrl-C again to abort)")

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and not self.requested:
            signal.signal(signal.SIGINT, self._previous)


def _run(trainer: Trainer, log: _Log) -> Path:
    cfg = trainer.config
    started = _now()
    wall_before = trainer.wall_s
    recent: list[float] = []
    stopped = None
    with _StopOnInterrupt(trainer.print) as interrupt:
        while trainer.step < cfg.steps:
            if cfg.max_minutes is not None and _now() - started >= 60.0 * cfg.max_minutes:
                stopped = f"time limit of {cfg.max_minutes:g} min"
                break
            if interrupt.requested:
                stopped = "interrupted"
                break
            recent.append(trainer.train_step())
            trainer.wall_s = wall_before + (_now() - started)
            _after_step(trainer, log, recent)
    trainer.wall_s = wall_before + (_now() - started)
    if stopped is None:
        return _export(trainer, log)
    path = trainer.save_state()
    log(
        "stop",
        f"{stopped}: saved step {trainer.step}/{cfg.steps} to {path}; rerun the same "
        "command to resume",
        step=trainer.step,
        reason=stopped,
        wall_s=trainer.wall_s,
    )
    return path


def _after_step(trainer: Trainer, log: _Log, recent: list[float]) -> None:
    cfg, step = trainer.config, trainer.step
    if step % cfg.log_every == 0 or step == cfg.steps:
        loss = float(np.mean(recent))
        lr = trainer.optimizer.param_groups[0]["lr"]
        log(
            "train",
            f"step {step}/{cfg.steps} loss {loss:.4f} ({trainer.wall_s:.0f} s)",
            step=step,
            loss=loss,
            lr=lr,
            wall_s=trainer.wall_s,
        )
        recent.clear()
    if step % cfg.validate_every == 0:
        _validate(trainer, log)
    if step % cfg.checkpoint_every == 0:
        trainer.save_state()


def _validate(trainer: Trainer, log: _Log, *, force_sample: bool = False) -> dict:
    cfg = trainer.config
    trainer.n_validations += 1
    sample = force_sample or trainer.n_validations % cfg.sample_every == 0
    metrics = trainer.validate(sample)
    line = f"step {trainer.step} val_loss {metrics['val_loss']:.4f}"
    if "nrmse_network" in metrics:
        line += (
            f" | NRMSE network {metrics['nrmse_network']:.4f} vs SH prior "
            f"{metrics['nrmse_prior']:.4f} ({metrics['n_sampled']} examples)"
        )
    log("val", line, step=trainer.step, wall_s=trainer.wall_s, **metrics)
    trainer.metrics = {"step": trainer.step, **metrics, **_last_sampled(trainer, metrics)}
    return metrics


def _last_sampled(trainer: Trainer, metrics: dict) -> dict:
    """Keep the latest sampled metrics next to a loss-only validation."""
    if "nrmse_network" in metrics or "nrmse_network" not in trainer.metrics:
        return {}
    keys = ("nrmse_network", "nrmse_prior", "n_sampled", "by_source")
    previous = trainer.metrics
    sampled_at = previous.get("sampled_at_step", previous.get("step"))
    return {k: previous[k] for k in keys} | {"sampled_at_step": sampled_at}


def _export(trainer: Trainer, log: _Log) -> Path:
    m = trainer.metrics
    if m.get("step") != trainer.step or "nrmse_network" not in m or "sampled_at_step" in m:
        _validate(trainer, log, force_sample=True)  # the final metrics sample at the final step
    trainer.save_state()
    record = training_record(trainer)
    folder = save_model(
        trainer.out / trainer.config.name,
        trainer.network,
        trainer.model_config,
        training=record,
        card=model_card(record),
        overwrite=True,
    )
    log("export", f"wrote the model folder {folder}", step=trainer.step, folder=str(folder))
    return folder


# --------------------------------------------------------------------------- provenance


def lr_history(log_path: Path) -> list[dict[str, Any]]:
    """Return the learning rate's segments from a training log (it may change on resume).

    Parameters
    ----------
    log_path : Path
        The run's ``train_log.jsonl``.

    Returns
    -------
    list of dict
        ``{"from_step", "to_step", "lr"}`` per run of logged steps at one learning rate (after
        warm-up); empty when the log is missing.

    """
    segments: list[dict[str, Any]] = []
    if not log_path.is_file():
        return segments
    for line in log_path.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") != "train" or "lr" not in event:
            continue
        step, lr = int(event["step"]), float(event["lr"])
        if segments and segments[-1]["lr"] == lr and step > segments[-1]["to_step"]:
            segments[-1]["to_step"] = step
        else:
            segments.append({"from_step": step, "to_step": step, "lr": lr})
    return segments


def training_record(trainer: Trainer) -> dict[str, Any]:
    """Return the ``training`` entry of the model's config.json.

    Parameters
    ----------
    trainer : Trainer
        The finished (or exported) run.

    Returns
    -------
    dict

    """
    cfg = trainer.config
    return {
        "qid2_version": __version__,
        "sources": [s.describe() for s in trainer.sources],
        "source_weights": [float(s.get("weight", 1.0)) for s in cfg.sources],
        "validation_sources": [s.describe() for s in trainer.val_sources],
        "validation": "held out" if trainer.val_sources else "in-sample",
        "steps": trainer.step,
        "steps_planned": cfg.steps,
        "batch_size": cfg.batch_size,
        "crop": cfg.crop,
        "slice_axis": cfg.slice_axis,
        "kept_directions": {"min": cfg.min_keep, "max": cfg.max_keep or "N-1"},
        "target": "clean (where available)" if cfg.clean_target else "measured hidden volume",
        "augmentation": json.loads(json.dumps(dataclasses.asdict(cfg.augmentation_settings()))),
        "optimizer": {
            "name": "Adam",
            "lr": cfg.lr,
            "betas": cfg.betas,
            "weight_decay": cfg.weight_decay,
            "grad_clip": cfg.grad_clip,
            "warmup_steps": cfg.warmup_steps,
        },
        "lr_history": lr_history(Path(cfg.output) / LOG_NAME),
        "loss": f"{trainer.model_config.prediction_type} MSE inside the brain mask, "
        f"timesteps uniform in 0..{trainer._n_timesteps - 1}",
        "sh_prior": {
            "lambda": trainer.model_config.prior_lambda,
            "order": ORDER_RULE,
            "basis": "descoteaux07",
        },
        "init_model": trainer.init_info,
        "direction_frame": "voxel axes of the slice (model.data.model_frame_bvecs)",
        "seed": cfg.seed,
        "wall_time_s": round(trainer.wall_s, 1),
        "hardware": hardware_info(trainer.device),
        "amp": str(trainer.amp_dtype) if trainer.amp_dtype else None,
        "final_metrics": trainer.metrics,
        "sampler_for_metrics": {
            "n_steps": cfg.sample_steps,
            "t_start": cfg.sample_t_start,
            "temperature": cfg.sample_temperature,
            "n_samples": cfg.sample_n,
        },
        "command": " ".join(sys.argv),
    }


def _describe_source(info: dict) -> str:
    if info["kind"] == "bids":
        runs = info.get("runs") or []
        return f"BIDS dataset `{info['path']}`: {len(runs)} run(s) ({', '.join(runs)})"
    if info["kind"] == "simulated":
        return (
            f"simulated brains (`qid2_bidsapp.sim`, seed {info.get('seed')}): "
            f"{info.get('n_volumes')} slab(s), voxel {info.get('voxel_size')} mm, "
            f"b {info.get('bvals')}, {info.get('n_directions')} directions, SNR {info.get('snr')}"
        )
    return (
        f"analytic phantom (`{info.get('generator', info['kind'])}`), {info.get('n_volumes')} "
        f"volume(s), b {info.get('bvals')}, {info.get('n_directions')} directions, "
        f"SNR {info.get('snr')}"
    )


def _metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _verdict(metrics: dict) -> str:
    network, prior = metrics.get("nrmse_network"), metrics.get("nrmse_prior")
    if not all(isinstance(v, float) and math.isfinite(v) for v in (network, prior)):
        return "not measured."
    if network < prior:
        return f"the network beats its SH prior by {100 * (1 - network / prior):.1f} % NRMSE."
    return (
        f"**the network is worse than its SH prior** ({100 * (network / prior - 1):.1f} % higher "
        "NRMSE): this model adds nothing over the `sh` engine."
    )


def _lr_text(record: dict[str, Any]) -> str:
    segments = record.get("lr_history") or []
    if len({seg["lr"] for seg in segments}) < 2:
        return str(record["optimizer"]["lr"])
    return ", then ".join(
        f"{seg['lr']:g} (logged steps {seg['from_step']}-{seg['to_step']})" for seg in segments
    )


def _init_lines(init: dict | None) -> list[str]:
    if not init:
        return ["- Started from random weights."]
    return [f"- Fine-tuned from model `{init['model_id']}` (weights sha256 {init['sha256']})."]


def model_card(record: dict[str, Any]) -> str:
    """Markdown model card from a training record.

    Parameters
    ----------
    record : dict
        `training_record` output.

    Returns
    -------
    str

    """
    m = record["final_metrics"]
    lines = [
        "# QID² model card",
        "",
        "Image-conditioned diffusion model for q-space (angular) up-sampling of one DWI shell:",
        "given the R acquired directions nearest a target direction, the SH prior at the target",
        "and the direction tokens, it synthesises the 2D slice of the target direction.",
        "",
        "## Training data",
        *[f"- {_describe_source(s)}" for s in record["sources"]],
        "",
        f"Validation ({record['validation']}):",
        *[f"- {_describe_source(s)}" for s in record["validation_sources"]],
        "",
        "## Protocol",
        f"- Self-supervised: a target among the acquired directions is hidden with others "
        f"(kept: {record['kept_directions']['min']} to {record['kept_directions']['max']}); "
        f"target = {record['target']}.",
        f"- {record['steps']} steps (planned {record['steps_planned']}), batch "
        f"{record['batch_size']}, {record['crop']}x{record['crop']} crops along voxel axis "
        f"{record['slice_axis']}; Adam lr {_lr_text(record)}, betas "
        f"{record['optimizer']['betas']}; loss: {record['loss']}.",
        f"- Augmentation: {record['augmentation']}.",
        f"- SH prior: λ = {record['sh_prior']['lambda']}, order: {record['sh_prior']['order']}.",
        *_init_lines(record.get("init_model")),
        f"- Wall time {record['wall_time_s']} s on {record['hardware']['device']} "
        f"({record['hardware'].get('gpu', record['hardware']['cpu'])}, torch "
        f"{record['hardware']['torch']}), seed {record['seed']}.",
        "",
        "## Metrics (last validation)",
        f"- Step {m.get('step')}: validation loss {_metric(m.get('val_loss'))}.",
        f"- NRMSE of sampled predictions vs the hidden measured volume (S/S0, brain mask, "
        f"{m.get('n_sampled')} examples): network {_metric(m.get('nrmse_network'))}, "
        f"SH prior alone {_metric(m.get('nrmse_prior'))}.",
        *[
            f"  - {name}: network {_metric(v['network'])}, prior {_metric(v['prior'])} "
            f"({v['n']} examples)"
            for name, v in (m.get("by_source") or {}).items()
        ],
        f"- Verdict: {_verdict(m)}",
        "",
        "## Intended use",
        "Research on q-space up-sampling of single-shell DWI with the `qid2` BIDS app; compare",
        "against the `sh` engine on your own data (the app's self-check) before trusting it.",
        "",
        "## Limits",
        "- Trained briefly on what was at hand (see above), not on a large multi-site",
        "  collection; the measured targets are noisy, so the model learns noisy images.",
        "- If the network NRMSE is not below the SH prior's, the model adds nothing over the",
        "  `sh` engine and should not be used for analysis.",
        "- 2D slices: no consistency along the slice axis is enforced.",
        "- Not a medical device; not for clinical use.",
    ]
    return "\n".join(lines) + "\n"
