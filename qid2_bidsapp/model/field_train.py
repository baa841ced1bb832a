"""Train the SH-field model on simulated coefficient slabs, in resumable chunks.

A run lives in one output folder (keep it outside the repository)::

    <output>/
      train_config.json   the configuration (a copy)
      training_state.pt   weights, optimiser, step, data-sampler state (resumable)
      train_log.jsonl     one JSON line per log event (losses, validation, lr)
      snapshots/          weights every `snapshot_every` steps (for later selection)

Training slabs (`qid2_bidsapp.sim.slabs`) are read from ``slabs`` and re-scanned every
`rescan_every` steps, so a generator may keep adding slabs while training runs. Validation
uses slabs of another series (``val_seed``), made in ``<output>/val_slabs`` on first use.

Loss (inside the brain mask), all on noise-free targets:
``coef_mse`` (model-space coefficients) + ``signal_weight * 1000 * signal_mse`` (the
coefficients' signal error: the basis is orthonormal) + ``fa_weight * |FA - FA_true|``
(`field_network.TensorFA`; keeps the prediction from shrinking anisotropy)
+ ``fa_bias_weight * mean_b |mean_mask(FA - FA_true)|`` (the signed FA error of each example
averaged over its brain voxels: a prior learnt on many brains pulls every FA of a brain
towards the population's; this term asks the network to read the brain's anisotropy level
from the crop's own data instead). With ``fa_bias_split`` the bias is taken separately in the
voxels whose true FA is below and at or above that value (grey and white matter, roughly) and
the two are added, weighted by their share of the mask: a brain whose grey matter is pulled up
while its white matter is pulled down no longer scores 0. With ``wm_weight`` the per-voxel
terms (coefficients, signal, FA) count ``1 + wm_weight`` times in voxels whose true FA is at
least `WM_FA_THRESHOLD` (white matter), where the model gained least (docs/results.md).

Models with ``log_mean_from_prior`` are trained as they are run: the network's output is
rescaled to the prior's mean log signal (`rescale_to_prior_log_mean`) before the loss, in
training and validation alike.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import Qid2Error
from ..sim.slabs import CoefficientSlab, generate_slabs, read_slab
from .checkpoint import load_training_state, save_training_state
from .field_config import FieldConfig
from .field_data import Protocol, make_field_example, stack_field_examples
from .field_features import (
    LOG_MEAN_FLOOR,
    LOG_MEAN_SCALE_RANGE,
    coefficient_scales,
    log_mean_matrix,
)
from .field_inference import field_scheduler, sample_coefficients
from .field_network import INPUT_CONV_WEIGHT, ShFieldNetwork, TensorFA, widen_input_weights
from .inference import SamplerSettings, _autocast, cpu_has_bfloat16, pair_generator

STATE_NAME = "training_state.pt"
#: Smallest prior FA error used by ``prior_relative`` weights (bounds the largest weight).
RELATIVE_FA_FLOOR = 0.005
LOG_NAME = "train_log.jsonl"


@dataclass
class FieldTrainConfig:
    """Settings of an SH-field training run (JSON file; unknown keys are refused).

    Parameters
    ----------
    slabs : str
        Folder of training slabs (``slab-*.npz``).
    output : str
        Run folder.
    model : dict
        `FieldConfig` fields.
    protocol : dict
        `field_data.Protocol` fields.
    batch_size, crop : int
        Examples per step and their in-plane size.
    steps : int
        Planned steps (the cosine learning-rate schedule spans them).
    lr, lr_min, weight_decay, warmup_steps, grad_clip : float, float, float, int, float
        AdamW with linear warm-up and cosine decay to `lr_min`.
    prior_start_fraction : float
        Share of training inputs ``x_t`` noised from the prior rather than from the truth
        (the truncated sampler starts from the noised prior).
    signal_weight, fa_weight, fa_bias_weight : float
        Loss weights (see the module docstring).
    fa_bias_split : float, optional
        True-FA value splitting the per-example FA-bias term in two strata (None: one).
    prior_relative : bool
        Weigh each simulated example by the inverse FA error of its prior, so that examples
        the prior already does well on (many directions, high SNR) are not drowned out.
    wm_weight : float
        Extra weight of the per-voxel loss terms in white matter (true FA at least
        `WM_FA_THRESHOLD`): such a voxel counts ``1 + wm_weight`` times. 0 leaves the loss as
        it was.
    small_field_fraction : float
        Share of simulated examples that are tiny fields of view (`make_field_example`'s
        ``small_field``): a square of `small_field_sizes` voxels inside the mirrored window
        the app runs the network on for such scans. 0 (the default) draws none.
    small_field_sizes : list of int
        Smallest and largest side of those squares (inclusive; below ``crop // 2``).
    mirror_fraction : float
        Share of training examples (simulated and real) mirrored by a random symmetry of
        `plane_symmetry.SYMMETRIES` other than the identity (`plane_symmetry.mirror_example`),
        so the network sees slices the way the app's ``symmetries`` averaging shows them. 0
        (the default) mirrors none.
    max_slabs : int
        Largest number of slabs held in memory.
    val_seed, n_val_slabs, n_val_examples : int
        Validation series seed, slabs and fixed examples.
    validate_every, snapshot_every, rescan_every, log_every : int
        Periods in steps.
    checkpoint_minutes : float
        Save the training state at least this often.
    seed : int
        Seed of the data sampler and the weights.
    num_threads : int
        torch CPU threads.
    real_sources : list of dict
        Real scans for self-supervised examples (`field_data.make_real_example`): each
        ``{"path": BIDS dir, "participant_label": [...], "exclude_participant_label": [...]}``.
    real_fraction : float
        Share of each batch drawn from the real scans.
    real_weight : float
        Weight of the real examples' loss (``1000 x`` the masked MSE of the predicted ``S/S0``
        at the hidden directions against the measured, Rician-corrected values).
    init_weights : str, optional
        Start from these weights (a model folder, a run's ``training_state.pt`` or a
        snapshot): a fine-tune.
    kind : str
        ``"sh-field"``: tells ``qid2-train`` that this is an SH-field configuration.
    name : str
        Name of the model folder ``qid2-train --export`` writes into ``output``.
    target : {"clean", "rician-mean"}
        Simulated targets (`field_data.make_field_example`); with ``rician-mean`` the real
        scans' measured magnitudes are the targets as they are, otherwise Rician-corrected.
    device : {"cpu", "cuda", "auto"}
        Where the network trains (``auto``: a CUDA GPU when torch sees one). The examples are
        always made on the CPU.
    amp : bool
        On CUDA GPUs with bfloat16, run the network's forward pass in bfloat16 autocast (the
        weights, the optimiser and the loss stay float32); float32 elsewhere.
    cpu_amp : bool
        The same on the CPU, where the CPU has native bfloat16 (AVX512-BF16 or AMX, as oneDNN
        reports; there, forward and backward passes of a 48/96/192 network are about 1.8x
        faster). Off by default, so that CPU runs stay reproducible as they were; requested on
        a CPU without it, training says so and runs in float32.
    data_workers : int
        Processes that make the training batches while the network trains (0: made in the
        training process, between steps). Each worker draws from its own generator, seeded
        by (``seed``, the step the chunk started at, the worker's index): a run resumed at
        the same steps draws the same data, but not the data of a run with another number
        of workers. Slabs added to the folder after the workers start are not seen by them.
    data_echo : int
        Steps each drawn batch serves, with fresh timesteps and noise each time (1: every
        step draws new examples). For a GPU that trains faster than the CPU cores make
        examples; a resumed run draws a new batch first.
    ema_decay : float
        Keep an exponential moving average of the weights with this decay per step (0: none;
        0.999 averages over about the last thousand steps; torch's ``AveragedModel``). With
        it, validation also scores the average (``ema_*``), snapshots also hold it
        (``snapshots/ema-step-*.pt``), it is saved in the training state, and the exported
        model holds the average instead of the last weights. Switched on when a run resumes,
        the average starts from the weights of that step.

    """

    slabs: str
    output: str
    model: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    batch_size: int = 8
    crop: int = 64
    steps: int = 30000
    lr: float = 3e-4
    lr_min: float = 2e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 1.0
    prior_start_fraction: float = 0.5
    signal_weight: float = 1.0
    fa_weight: float = 4.0
    fa_bias_weight: float = 0.0
    fa_bias_split: float | None = None
    prior_relative: bool = False
    wm_weight: float = 0.0
    small_field_fraction: float = 0.0
    small_field_sizes: list = field(default_factory=lambda: [8, 31])
    mirror_fraction: float = 0.0
    max_slabs: int = 4000
    val_seed: int = 1
    n_val_slabs: int = 16
    n_val_examples: int = 64
    validate_every: int = 500
    snapshot_every: int = 2000
    rescan_every: int = 250
    log_every: int = 50
    checkpoint_minutes: float = 10.0
    seed: int = 0
    num_threads: int = 2
    real_sources: list = field(default_factory=list)
    real_fraction: float = 0.0
    real_weight: float = 1.0
    init_weights: str | None = None
    kind: str = "sh-field"
    name: str = "qid2-field"
    target: str = "clean"
    device: str = "cpu"
    amp: bool = True
    cpu_amp: bool = False
    data_workers: int = 0
    data_echo: int = 1
    ema_decay: float = 0.0

    @classmethod
    def from_file(cls, path: str | Path) -> FieldTrainConfig:
        """Read a JSON configuration (relative paths are taken from the file's folder).

        Parameters
        ----------
        path : str or Path
            The file.

        Returns
        -------
        FieldTrainConfig

        """
        path = Path(path)
        values = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise Qid2Error(f"{path}: unknown training setting(s): {', '.join(unknown)}")
        for key in ("slabs", "output", "init_weights"):
            if values.get(key) and not Path(values[key]).is_absolute():
                values[key] = str((path.parent / values[key]).resolve())
        for source in values.get("real_sources", []):
            if not Path(source["path"]).is_absolute():
                source["path"] = str((path.parent / source["path"]).resolve())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return asdict(self)


WM_FA_THRESHOLD = 0.3
"""True FA at or above which a voxel counts as white matter for ``wm_weight``."""


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, ..., H, W) over the pixels where ``mask`` (B, H, W) is set."""
    weights = mask.to(values.dtype)
    while weights.ndim < values.ndim:
        weights = weights.unsqueeze(1)
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


class FieldLoss(torch.nn.Module):
    """The training loss and its parts (see the module docstring).

    Parameters
    ----------
    config : FieldConfig
        The model configuration.
    signal_weight, fa_weight, fa_bias_weight : float
        Weights of the signal, FA and per-example FA-bias terms.
    fa_bias_split : float, optional
        Take the per-example FA bias separately below and at or above this true FA, and add
        the two absolute biases weighted by their share of the example's mask.
    prior_relative : bool
        Weigh each example by the inverse FA error of its prior (see `forward`).
    wm_weight : float
        Voxels whose true FA is at least `WM_FA_THRESHOLD` count ``1 + wm_weight`` times in
        the coefficient, signal and FA terms (the bias term is unchanged).

    """

    def __init__(
        self,
        config: FieldConfig,
        signal_weight: float,
        fa_weight: float,
        fa_bias_weight: float = 0.0,
        fa_bias_split: float | None = None,
        prior_relative: bool = False,
        wm_weight: float = 0.0,
    ):
        super().__init__()
        scales = torch.as_tensor(coefficient_scales(config), dtype=torch.float32)
        self.register_buffer("inverse_scales", (1.0 / scales)[None, :, None, None])
        self.fa = TensorFA(config)
        self.signal_weight = float(signal_weight)
        self.fa_weight = float(fa_weight)
        self.fa_bias_weight = float(fa_bias_weight)
        self.fa_bias_split = None if fa_bias_split is None else float(fa_bias_split)
        self.prior_relative = bool(prior_relative)
        self.wm_weight = float(wm_weight)

    def forward(
        self, pred, target, mask, bval, prior=None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the loss and its parts (``coef_mse``, ``signal_mse``, ``fa_mae``, ``fa_bias``).

        The parts are plain means over the batch's brain voxels, whatever the weighting.

        Parameters
        ----------
        pred, target : Tensor, shape (B, C, H, W)
            Model-space coefficients.
        mask : Tensor, shape (B, H, W)
            Brain mask (0/1).
        bval : Tensor, shape (B,)
            b-values.
        prior : Tensor, shape (B, C, H, W), optional
            The prior's coefficients: with ``prior_relative`` each example's loss is weighed
            by ``1 / (FA error of its prior)`` (normalised to a mean weight of 1 in the
            batch), so that an example whose input already tells its FA well (many
            directions, high SNR) counts as much as a noisy one, where the gains are large.

        Returns
        -------
        loss : Tensor
        parts : dict of float

        """
        diff = pred - target
        coef = masked_mean(diff.square(), mask)
        signal = masked_mean((diff * self.inverse_scales).square(), mask)
        fa_true = self.fa(target, bval)
        fa_error = self.fa(pred, bval) - fa_true
        fa = masked_mean(fa_error.abs(), mask)
        weights = mask.to(fa_error.dtype)
        strata = [weights]
        if self.fa_bias_split is not None:
            high = (fa_true >= self.fa_bias_split).to(weights.dtype)
            strata = [weights * (1 - high), weights * high]
        total = weights.sum(dim=(1, 2)).clamp(min=1.0)
        per_example_bias = 0.0
        for stratum in strata:  # |mean error| of each stratum, weighted by its share
            per_example_bias = per_example_bias + (fa_error * stratum).sum(dim=(1, 2)).abs() / total
        fa_bias = per_example_bias.mean()
        voxel = weights
        if self.wm_weight:  # white-matter voxels count 1 + wm_weight times
            white = (fa_true >= WM_FA_THRESHOLD).to(weights.dtype)
            voxel = weights * (1.0 + self.wm_weight * white)
        if prior is None or not self.prior_relative:
            if self.wm_weight:
                loss = (
                    masked_mean(diff.square(), voxel)
                    + self.signal_weight
                    * 1000.0
                    * masked_mean((diff * self.inverse_scales).square(), voxel)
                    + self.fa_weight * masked_mean(fa_error.abs(), voxel)
                )
            else:
                loss = coef + self.signal_weight * 1000.0 * signal + self.fa_weight * fa
            if self.fa_bias_weight:
                loss = loss + self.fa_bias_weight * fa_bias
        else:  # every example weighed by 1 / its prior's FA error (mean weight 1)
            with torch.no_grad():
                prior_error = (self.fa(prior, bval) - fa_true).abs()
                prior_fa = (prior_error * weights).sum(dim=(1, 2)) / total
                example_weight = 1.0 / prior_fa.clamp(min=RELATIVE_FA_FLOOR)
                example_weight = example_weight / example_weight.mean()
            n_coef = diff.shape[1]
            voxel_total = voxel.sum(dim=(1, 2)).clamp(min=1.0)
            coef_b = (diff.square() * voxel[:, None]).sum(dim=(1, 2, 3)) / (n_coef * voxel_total)
            signal_b = ((diff * self.inverse_scales).square() * voxel[:, None]).sum(dim=(1, 2, 3))
            signal_b = signal_b / (n_coef * voxel_total)
            fa_b = (fa_error.abs() * voxel).sum(dim=(1, 2)) / voxel_total
            per_example = coef_b + self.signal_weight * 1000.0 * signal_b + self.fa_weight * fa_b
            if self.fa_bias_weight:
                per_example = per_example + self.fa_bias_weight * per_example_bias
            loss = (example_weight * per_example).mean()
        parts = {
            "coef_mse": coef.item(),
            "signal_mse": signal.item(),
            "fa_mae": fa.item(),
            "fa_bias": fa_bias.item(),
        }
        return loss, parts


def rescale_to_prior_log_mean(
    pred: torch.Tensor, prior: torch.Tensor, evaluate: torch.Tensor
) -> torch.Tensor:
    """Scale each voxel's coefficients to the prior's mean log signal (differentiable).

    The torch twin of `field_features.log_mean_scale` (applied at inference to the sampled
    coefficients), so that a ``log_mean_from_prior`` model is trained on what it outputs.

    Parameters
    ----------
    pred, prior : Tensor, shape (B, C, H, W)
        Model-space coefficients of the prediction and of the prior.
    evaluate : Tensor, shape (P, C)
        `field_features.log_mean_matrix`.

    Returns
    -------
    Tensor, shape (B, C, H, W)

    """
    log_mean = [
        torch.log(torch.einsum("pc,bchw->bphw", evaluate, c).clamp(min=LOG_MEAN_FLOOR)).mean(1)
        for c in (prior, pred)
    ]
    scale = torch.exp(log_mean[0] - log_mean[1]).clamp(*LOG_MEAN_SCALE_RANGE)
    return pred * scale[:, None]


def real_signal_loss(pred: torch.Tensor, real: dict) -> torch.Tensor:
    """``1000 x`` masked MSE of predicted ``S/S0`` at the hidden directions of real examples.

    Parameters
    ----------
    pred : Tensor, shape (B, C, H, W)
        Model-space coefficients.
    real : dict
        `field_data.stack_real_examples` output (numpy arrays).

    Returns
    -------
    Tensor

    """
    evaluate, target, weight, mask = (
        torch.as_tensor(real[key]).to(pred.device)
        for key in ("real_eval", "real_target", "real_weight", "mask")
    )
    weight, mask = weight[:, :, None, None], mask[:, None]
    signal = torch.einsum("bmc,bchw->bmhw", evaluate, pred)
    w = weight * mask
    return 1000.0 * ((signal - target).square() * w).sum() / w.sum().clamp(min=1.0)


class SlabPool:
    """The training slabs in memory, topped up from their folder as a generator adds some.

    Parameters
    ----------
    folder : Path
        Folder of ``slab-*.npz`` files.
    max_slabs : int
        Largest number kept.

    """

    def __init__(self, folder: Path, max_slabs: int):
        self.folder = Path(folder)
        self.max_slabs = int(max_slabs)
        self.slabs: list[CoefficientSlab] = []
        self._seen: set[str] = set()

    def rescan(self) -> int:
        """Load new slabs (sorted by name) up to `max_slabs`; return how many were added."""
        added = 0
        for path in sorted(self.folder.glob("slab-*.npz")):
            if len(self.slabs) >= self.max_slabs:
                break
            if path.name in self._seen or path.name.endswith(".part.npz"):
                continue
            try:
                self.slabs.append(read_slab(path))
            except (OSError, ValueError, KeyError):  # a file being written: next time
                continue
            self._seen.add(path.name)
            added += 1
        return added


def training_autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """Autocast dtype of the training forward pass: bfloat16 where it is native, else none.

    Only bfloat16 is used (it needs no loss scaling); float16-only GPUs train in float32.

    Parameters
    ----------
    device : torch.device
        Where the network trains.
    amp : bool
        Whether mixed precision is wanted (``FieldTrainConfig.amp`` on CUDA, ``cpu_amp`` on
        the CPU).

    Returns
    -------
    torch.dtype or None
        ``torch.bfloat16``, or None for float32.

    """
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bfloat16() else None
    return None


class FieldTrainer:
    """The SH-field training loop state: network, optimiser, data, validation set.

    Parameters
    ----------
    config : FieldTrainConfig
        The settings.
    echo : callable
        Receives printed lines.

    """

    def __init__(self, config: FieldTrainConfig, echo=print):
        from .inference import resolve_device

        self.config = config
        self.echo = echo
        if int(config.data_workers) < 0:
            raise Qid2Error(f"data_workers must be >= 0, got {config.data_workers}")
        if int(config.data_echo) < 1:
            raise Qid2Error(f"data_echo must be >= 1, got {config.data_echo}")
        try:
            self.device = resolve_device(config.device)
        except RuntimeError as err:
            raise Qid2Error(f"device {config.device!r}: {err}") from None
        wanted = config.cpu_amp if self.device.type == "cpu" else config.amp
        self.amp_dtype = training_autocast_dtype(self.device, bool(wanted))
        if config.cpu_amp and self.device.type == "cpu" and self.amp_dtype is None:
            echo("cpu_amp: this CPU has no native bfloat16; training in float32")
        torch.set_num_threads(int(config.num_threads))
        torch.manual_seed(config.seed)
        self.model_config = FieldConfig(**config.model)
        self.protocol = Protocol(**config.protocol)
        self.network = ShFieldNetwork(self.model_config)
        self.loss = FieldLoss(
            self.model_config,
            config.signal_weight,
            config.fa_weight,
            config.fa_bias_weight,
            config.fa_bias_split,
            config.prior_relative,
            config.wm_weight,
        )
        self.optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = field_scheduler(self.model_config)
        self.log_mean_matrix = (
            torch.from_numpy(log_mean_matrix(self.model_config).astype(np.float32))
            if self.model_config.log_mean_from_prior
            else None
        )
        self.step = 0
        self.wall_s = 0.0
        self.rng = np.random.default_rng(config.seed)
        self.pool = SlabPool(Path(config.slabs), config.max_slabs)
        if self.pool.rescan() == 0:
            raise Qid2Error(f"{config.slabs}: no training slabs (slab-*.npz)")
        self.real = self._real_shells()
        if config.real_fraction > 0 and not self.real:
            raise Qid2Error("real_fraction > 0 but real_sources gave no usable shell")
        if config.init_weights:
            self._load_initial_weights(Path(config.init_weights))
        self.network.to(self.device)
        self.loss.to(self.device)
        self.ema = None
        if config.ema_decay:
            if not 0.0 < float(config.ema_decay) < 1.0:
                raise Qid2Error(f"ema_decay must be in (0, 1), got {config.ema_decay}")
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(
                self.network,
                multi_avg_fn=get_ema_multi_avg_fn(float(config.ema_decay)),
                use_buffers=True,
            )  # its first update copies the weights of that step
        if self.log_mean_matrix is not None:
            self.log_mean_matrix = self.log_mean_matrix.to(self.device)
        self.validation = self._validation_set()
        self.real_validation = self._real_validation_set()
        self._stream = None  # batches from the data workers, started at the first step
        self._echo = (None, 0)  # the last batches drawn, and the steps they may still serve

    # ------------------------------------------------------------------ data

    def _validation_set(self) -> dict:
        folder = Path(self.config.output) / "val_slabs"
        generate_slabs(folder, 0, self.config.n_val_slabs, seed=self.config.val_seed)
        slabs = [read_slab(p) for p in sorted(folder.glob("slab-*.npz"))]
        rng = np.random.default_rng([self.config.val_seed, 12345])
        examples = [
            make_field_example(
                slabs[i % len(slabs)], rng, self.model_config, crop=self.config.crop,
                protocol=self.protocol, target=self.config.target,
            )
            for i in range(self.config.n_val_examples)
        ]  # fmt: skip
        return stack_field_examples(examples)

    def _real_shells(self) -> list:
        from .data import BidsSource
        from .field_data import real_shells

        shells = []
        for spec in self.config.real_sources:
            source = BidsSource(
                spec["path"],
                participant_label=spec.get("participant_label"),
                exclude_participant_label=spec.get("exclude_participant_label"),
            )
            shells.extend(real_shells(source.volumes()))
        return shells

    def _load_initial_weights(self, path: Path) -> None:
        """Start from earlier weights; they may lack the summary maps or context slices.

        A model folder may have fewer ``context_slices`` than this run (its weights are
        widened, `widen_input_weights`); a state file or snapshot must have the same.
        """
        old_context = None
        if path.is_dir():  # a model folder (verified, and its architecture must match)
            from .checkpoint import load_model

            network, config, _ = load_model(path)
            theirs, ours = config.to_dict(), self.model_config.to_dict()
            if not theirs["summary_input"] and ours["summary_input"]:
                theirs["summary_input"] = True  # widened below
            if theirs["context_slices"] < ours["context_slices"]:
                old_context = theirs["context_slices"]
                theirs["context_slices"] = ours["context_slices"]  # widened below
            if theirs != ours:
                raise Qid2Error(f"{path}: its model configuration differs from this run's")
            tensors = network.state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            tensors = state["model"] if isinstance(state, dict) and "model" in state else state
        ours = self.network.state_dict()[INPUT_CONV_WEIGHT].shape[1]
        if tensors[INPUT_CONV_WEIGHT].shape[1] < ours:
            try:
                tensors = widen_input_weights(tensors, self.network, old_context)
            except ValueError as err:
                raise Qid2Error(f"{path}: {err}") from None
        self.network.load_state_dict(tensors)

    def _real_validation_set(self) -> dict | None:
        if not self.real:
            return None
        from .field_data import make_real_example, stack_real_examples

        rng = np.random.default_rng([self.config.val_seed, 54321])
        examples = [
            make_real_example(self.real[i % len(self.real)], rng, self.model_config,
                              crop=self.config.crop,
                              correct_rician=self.config.target == "clean")
            for i in range(min(32, self.config.n_val_examples))
        ]  # fmt: skip
        return stack_real_examples(examples)

    def _real_batch(self, size: int) -> dict:
        from .field_data import make_real_example, stack_real_examples

        examples = [
            self._mirrored(make_real_example(
                self.real[int(self.rng.integers(len(self.real)))], self.rng, self.model_config,
                crop=self.config.crop, correct_rician=self.config.target == "clean",
            ))
            for _ in range(size)
        ]  # fmt: skip
        return stack_real_examples(examples)

    def _small_field(self) -> int | None:
        """Side of a tiny-field example, or None (draws nothing when the share is 0)."""
        if not self.config.small_field_fraction:
            return None
        if self.rng.uniform() >= self.config.small_field_fraction:
            return None
        low, high = self.config.small_field_sizes
        return int(self.rng.integers(low, high + 1))

    def _mirrored(self, example: dict) -> dict:
        """Return `example` mirrored with probability ``mirror_fraction`` (no draw at 0)."""
        if not self.config.mirror_fraction or self.rng.uniform() >= self.config.mirror_fraction:
            return example
        from .plane_symmetry import SYMMETRIES, mirror_example

        index = int(self.rng.integers(1, len(SYMMETRIES)))
        return mirror_example(example, index, self.model_config)

    def _batch(self, size: int | None = None) -> dict:
        slabs = self.pool.slabs
        examples = [
            self._mirrored(make_field_example(
                slabs[int(self.rng.integers(len(slabs)))], self.rng, self.model_config,
                crop=self.config.crop, protocol=self.protocol, target=self.config.target,
                small_field=self._small_field(),
            ))
            for _ in range(self.config.batch_size if size is None else size)
        ]  # fmt: skip
        return stack_field_examples(examples)

    # ------------------------------------------------------------------ steps

    def learning_rate(self, step: int) -> float:
        """Warm-up then cosine decay from ``lr`` to ``lr_min`` over ``steps``."""
        cfg = self.config
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))

    def _as_run(self, pred: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Return the coefficients as inference outputs them (``log_mean_from_prior``)."""
        if self.log_mean_matrix is None:
            return pred
        prior = condition[:, self.network.prior_channels]
        return rescale_to_prior_log_mean(pred, prior, self.log_mean_matrix)

    def batch_sizes(self) -> tuple[int, int]:
        """Return the simulated and real examples per step."""
        n_real = int(round(self.config.batch_size * self.config.real_fraction)) if self.real else 0
        return self.config.batch_size - n_real, n_real

    def draw_batches(self) -> tuple[dict, dict | None]:
        """Make one step's simulated batch and real batch (None without real examples)."""
        n_sim, n_real = self.batch_sizes()
        batch = self._batch(n_sim)
        return batch, (self._real_batch(n_real) if n_real else None)

    def _next_batches(self) -> tuple[dict, dict | None]:
        batches, left = self._echo
        if left > 0:
            self._echo = (batches, left - 1)
            return batches
        batches = self._new_batches()
        self._echo = (batches, int(self.config.data_echo) - 1)
        return batches

    def _new_batches(self) -> tuple[dict, dict | None]:
        if int(self.config.data_workers) == 0:
            return self.draw_batches()
        if self._stream is None:
            loader = torch.utils.data.DataLoader(
                _BatchStream(self, self.step),
                batch_size=None,
                num_workers=int(self.config.data_workers),
                collate_fn=_as_drawn,
                multiprocessing_context="fork",
                prefetch_factor=4,
                persistent_workers=True,
            )
            self._stream = iter(loader)
        return next(self._stream)

    def close(self) -> None:
        """Stop the data workers (they start again, from the current step, when needed)."""
        self._stream = None

    def _on_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns the loss and its parts."""
        n_sim, n_real = self.batch_sizes()
        batch, real = self._next_batches()
        device = self.device
        condition, target, mask, bval = (
            self._on_device(batch[key]) for key in ("condition", "target", "mask", "bval")
        )
        timesteps = torch.randint(0, self.model_config.max_timestep + 1, (n_sim,)).to(device)
        start = target.clone()
        from_prior = (torch.rand(n_sim) < self.config.prior_start_fraction).to(device)
        start[from_prior] = condition[from_prior][:, self.network.prior_channels]
        x_t = self.scheduler.add_noise(start, torch.randn(target.shape).to(device), timesteps)
        if n_real:
            real_condition = self._on_device(real["condition"])
            real_t = torch.randint(0, self.model_config.max_timestep + 1, (n_real,)).to(device)
            prior = real_condition[:, self.network.prior_channels]
            real_x = self.scheduler.add_noise(prior, torch.randn(prior.shape).to(device), real_t)
            condition = torch.cat([condition, real_condition])
            x_t = torch.cat([x_t, real_x])
            timesteps = torch.cat([timesteps, real_t])
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.network.train()
        with _autocast(device, self.amp_dtype):
            out = self.network(x_t, condition, timesteps)
        pred = self._as_run(out.float(), condition)
        prior = condition[:n_sim, self.network.prior_channels]
        loss, parts = self.loss(pred[:n_sim], target, mask, bval, prior) if n_sim else (0.0, {})
        if real is not None:
            real_loss = real_signal_loss(pred[n_sim:], real)
            loss = loss + self.config.real_weight * real_loss
            parts["real_mse"] = real_loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.network)
        self.step += 1
        return {"loss": loss.item(), **parts}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Score the network (default CPU sampler, fixed noise) and the prior on validation.

        Returns
        -------
        dict
            Loss parts of the network (``net_*``), of the prior (``prior_*``), and the FA error
            of the order-2 least-squares fit of the noisy input (``fit2_fa_mae``, a stand-in
            for DTI on the acquired directions); with ``ema_decay``, those of the weights'
            moving average (``ema_*``) once it has been updated.

        """
        val = self.validation
        condition, target, mask, bval = (
            self._on_device(val[key]) for key in ("condition", "target", "mask", "bval")
        )
        prior = condition[:, self.network.prior_channels]
        _, pri = self.loss(prior, target, mask, bval)
        fa = self.loss.fa
        if self.model_config.prior == "sh":  # the order-2 fit stands in for DTI
            centre = self.model_config.context_slices * self.model_config.features_per_slice
            fit2 = torch.zeros_like(target)
            fit2[:, :6] = condition[:, centre : centre + 6]
            fit2_fa = masked_mean((fa(fit2, bval) - fa(target, bval)).abs(), mask).item()
        else:  # the prior is the tensor fit itself
            fit2_fa = pri["fa_mae"]
        real_condition = None
        if self.real_validation is not None:
            real_condition = self._on_device(self.real_validation["condition"])
        inputs = (condition, target, mask, bval, real_condition)
        out = self._network_scores(self.network, "net", inputs)
        out.update({f"prior_{k}": v for k, v in pri.items()})
        out["fit2_fa_mae"] = fit2_fa
        if real_condition is not None:
            prior_real = real_condition[:, self.network.prior_channels]
            out["prior_real_mse"] = real_signal_loss(prior_real, self.real_validation).item()
        average = self._average()
        if average is not None:
            out.update(self._network_scores(average, "ema", inputs))
        return out

    def _network_scores(
        self, network: torch.nn.Module, name: str, inputs: tuple
    ) -> dict[str, float]:
        """Return the loss parts of `network` on the validation examples (and real crops).

        ``inputs`` are the validation tensors on the device, as `validate` made them:
        condition, target, mask, bval and the real crops' condition (or None).
        """
        network.eval()
        condition, target, mask, bval, cond = inputs
        sampler = SamplerSettings(**_sampler_settings(self.model_config, "cpu"))
        generators = [pair_generator(0, i) for i in range(len(target))]
        samples = sample_coefficients(network, self.scheduler, condition, generators, sampler)
        pred = self._as_run(samples.mean(dim=1), condition)
        _, parts = self.loss(pred, target, mask, bval)
        out = {f"{name}_{k}": v for k, v in parts.items()}
        if cond is not None:
            gens = [pair_generator(1, i) for i in range(len(cond))]
            pred = sample_coefficients(network, self.scheduler, cond, gens, sampler).mean(1)
            pred = self._as_run(pred, cond)
            out[f"{name}_real_mse"] = real_signal_loss(pred, self.real_validation).item()
        return out

    def _average(self) -> torch.nn.Module | None:
        """Return the moving average of the weights once it has been updated, else None."""
        if self.ema is None or int(self.ema.n_averaged) == 0:
            return None
        return self.ema.module

    # ------------------------------------------------------------------ state

    def save_state(self) -> Path:
        """Write the resumable state (atomically)."""
        extra = {
            "config": self.config.to_dict(),
            "model": self.model_config.to_dict(),
            "rng": json.dumps(self.rng.bit_generator.state),
            "wall_s": self.wall_s,
            "device": self.device.type,
        }
        if self.device.type == "cuda":
            extra["gpu"] = torch.cuda.get_device_name(self.device)
        if self._average() is not None:
            extra["ema"] = _cpu_tensors(self.ema)
            extra["ema_decay"] = float(self.config.ema_decay)
        path = Path(self.config.output) / STATE_NAME
        return save_training_state(path, self.network, self.optimizer, None, self.step, extra)

    def load_state(self) -> None:
        """Resume from the state in the output folder."""
        path = Path(self.config.output) / STATE_NAME
        self.step, extra = load_training_state(path, self.network, self.optimizer)
        if extra.get("model") != self.model_config.to_dict():
            raise Qid2Error(f"{path}: the model configuration changed; start a new output")
        self.rng.bit_generator.state = json.loads(extra["rng"])
        self.wall_s = float(extra.get("wall_s", 0.0))
        if self.ema is not None:
            if "ema" in extra:
                self.ema.load_state_dict(extra["ema"])
            else:
                self.echo(f"ema: the moving average starts from the weights of step {self.step}")

    def snapshot(self) -> Path:
        """Save the weights of this step under ``snapshots/``."""
        folder = Path(self.config.output) / "snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{self.step:07d}.pt"
        torch.save(_cpu_tensors(self.network), path)
        average = self._average()
        if average is not None:
            torch.save(_cpu_tensors(average), folder / f"ema-step-{self.step:07d}.pt")
        return path


def _cpu_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return a module's state dict detached and on the CPU (for ``torch.save``)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class _BatchStream(torch.utils.data.IterableDataset):
    """Endless ``FieldTrainer.draw_batches`` in a data worker (a fork of the trainer).

    Each worker replaces its copy of the trainer's generator with one seeded by the run's
    seed, the step the stream started at and the worker's index.
    """

    def __init__(self, trainer: FieldTrainer, start_step: int):
        super().__init__()
        self.trainer = trainer
        self.start_step = int(start_step)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else int(info.id)
        torch.set_num_threads(1)
        self.trainer.rng = np.random.default_rng(
            [int(self.trainer.config.seed), self.start_step, worker]
        )
        while True:
            yield self.trainer.draw_batches()


def _as_drawn(batches):
    """DataLoader ``collate_fn``: the worker's batches as they are (numpy arrays)."""
    return batches


def _sampler_settings(config: FieldConfig, kind: str) -> dict:
    values = config.sampler_defaults[kind]
    return {
        "n_steps": int(values["n_steps"]),
        "n_samples": int(values["n_samples"]),
        "t_start": int(values["t_start"]),
    }


def train_field(config: FieldTrainConfig, *, max_minutes: float | None = None, echo=print) -> Path:
    """Train (or resume) until ``config.steps`` or `max_minutes`; returns the state path.

    Parameters
    ----------
    config : FieldTrainConfig
        The settings.
    max_minutes : float, optional
        Stop (after saving the state) once this much wall time has passed.
    echo : callable
        Receives printed lines.

    Returns
    -------
    Path
        The training state.

    """
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    trainer = FieldTrainer(config, echo=echo)
    log_path = out / LOG_NAME

    def log(event: str, **fields) -> None:
        with open(log_path, "a") as handle:
            handle.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")

    if (out / STATE_NAME).exists():
        trainer.load_state()
        echo(f"resumed at step {trainer.step}")
    else:
        n_params = sum(p.numel() for p in trainer.network.parameters())
        log("start", model=trainer.model_config.to_dict(), parameters=n_params)
        log("validate", step=0, **trainer.validate())
    started = time.monotonic()
    last_save = started
    recent: list[dict] = []
    stop = _StopRequest()
    while trainer.step < config.steps and not stop.requested:
        t0 = time.monotonic()
        recent.append(trainer.train_step())
        trainer.wall_s += time.monotonic() - t0
        step = trainer.step
        if step % config.log_every == 0:
            means = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]}
            lr = trainer.learning_rate(step - 1)
            log("train", step=step, lr=lr, slabs=len(trainer.pool.slabs), **means)
            echo(f"step {step} loss {means['loss']:.4f} fa {means['fa_mae']:.4f} lr {lr:.2e}")
            recent = []
        if step % config.rescan_every == 0:
            trainer.pool.rescan()
        if step % config.validate_every == 0:
            metrics = trainer.validate()
            log("validate", step=step, **metrics)
            ema = f" (average {metrics['ema_fa_mae']:.4f})" if "ema_fa_mae" in metrics else ""
            real = ""
            if "net_real_mse" in metrics:
                real = (
                    f"; real MSE net {metrics['net_real_mse']:.4f} "
                    f"prior {metrics['prior_real_mse']:.4f}"
                )
            echo(
                f"validate {step}: FA MAE net {metrics['net_fa_mae']:.4f}{ema} prior "
                f"{metrics['prior_fa_mae']:.4f} fit2 {metrics['fit2_fa_mae']:.4f}{real}"
            )
        if step % config.snapshot_every == 0:
            trainer.snapshot()
        now = time.monotonic()
        if now - last_save > 60 * config.checkpoint_minutes:
            trainer.save_state()
            last_save = now
        if max_minutes is not None and now - started > 60 * max_minutes:
            break
    stop.restore()
    trainer.close()
    if stop.requested:
        echo(f"stopped by signal at step {trainer.step}; state saved, rerun to resume")
    return trainer.save_state()


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step (the state is then saved)."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def training_record(output: str | Path) -> dict[str, Any]:
    """Summarise a run folder for the model's config.json (protocol, steps, time, metrics).

    Parameters
    ----------
    output : str or Path
        The run folder.

    Returns
    -------
    dict

    """
    import os
    import platform

    from .. import __version__

    output = Path(output)
    config = json.loads((output / "train_config.json").read_text())
    events = [json.loads(line) for line in (output / LOG_NAME).read_text().splitlines() if line]
    validations = [e for e in events if e["event"] == "validate"]
    state = torch.load(output / STATE_NAME, map_location="cpu", weights_only=True)
    slabs = sorted(Path(config["slabs"]).glob("slab-*.npz"))
    return {
        "kind": "sh-field",
        "qid2_version": __version__,
        "data": {
            "source": "qid2_bidsapp.sim.slabs (simulated brains, noise-free SH coefficients; "
            "random protocols and Rician noise drawn per example by model.field_data)",
            "slabs_available": len(slabs),
            "protocol": {**asdict(Protocol()), **config.get("protocol", {})},
            "real_data": (
                "self-supervised on "
                + ", ".join(
                    f"{r['path']} ({', '.join(r.get('participant_label') or ['all'])})"
                    for r in config.get("real_sources", [])
                )
                + f", {config.get('real_fraction', 0):.0%} of each batch"
                if config.get("real_sources")
                else "none (every real scan is held out)"
            ),
        },
        "steps": int(state["step"]),
        "steps_planned": int(config["steps"]),
        "wall_time_s": float(state["extra"].get("wall_s", 0.0)),
        "cpu_hours": float(state["extra"].get("wall_s", 0.0)) * config["num_threads"] / 3600,
        "hardware": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": config["num_threads"],
            "device": state["extra"].get("device", "cpu"),
            **({"gpu": state["extra"]["gpu"]} if "gpu" in state["extra"] else {}),
            "data_workers": int(config.get("data_workers", 0)),
            "data_echo": int(config.get("data_echo", 1)),
            "cpu_amp": bool(config.get("cpu_amp", False)),
        },
        "optimizer": {
            "name": "AdamW",
            "lr": config["lr"],
            "lr_min": config["lr_min"],
            "schedule": "linear warm-up, cosine decay",
            "weight_decay": config["weight_decay"],
            "batch_size": config["batch_size"],
            "crop": config["crop"],
            "small_field_fraction": float(config.get("small_field_fraction", 0.0)),
            "small_field_sizes": config.get("small_field_sizes", [8, 31]),
            "mirror_fraction": float(config.get("mirror_fraction", 0.0)),
            "ema_decay": float(config.get("ema_decay", 0.0)),
        },
        "loss": {
            "terms": "coef_mse + signal_weight * 1000 * signal_mse + fa_weight * |FA - FA_true|"
            + (
                (
                    " + fa_bias_weight * mean_b |mean_mask(FA - FA_true)|"
                    if config.get("fa_bias_split") is None
                    else " + fa_bias_weight * mean_b sum_s share_s |mean_s(FA - FA_true)|"
                    f" (strata s: FA_true below / at or above {config['fa_bias_split']})"
                )
                if config.get("fa_bias_weight")
                else ""
            ),
            "simulated_target": config.get("target", "clean"),
            "signal_weight": config["signal_weight"],
            "fa_weight": config["fa_weight"],
            "fa_bias_weight": config.get("fa_bias_weight", 0.0),
            "fa_bias_split": config.get("fa_bias_split"),
            "prior_relative": bool(config.get("prior_relative", False)),
            "wm_weight": float(config.get("wm_weight", 0.0)),
            "target": (
                "noise-free coefficients"
                if config.get("target", "clean") == "clean"
                else "coefficients of the expected Rician magnitude of the noise-free signal"
            ),
            "prior_start_fraction": config["prior_start_fraction"],
        },
        "final_validation": validations[-1] if validations else None,
        "seed": config["seed"],
        "init_weights": config.get("init_weights"),
        "real_sources": config.get("real_sources", []),
        "real_fraction": config.get("real_fraction", 0.0),
    }


def model_card(record: dict[str, Any], name: str) -> str:
    """Markdown model card of an SH-field model from its training record.

    Parameters
    ----------
    record : dict
        `training_record`.
    name : str
        Model name.

    Returns
    -------
    str

    """
    val = record.get("final_validation") or {}

    def num(key: str) -> str:
        value = val.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    protocol = record["data"]["protocol"]
    return "\n".join(
        [
            f"# {name}: qid2 SH-field diffusion model",
            "",
            "**What it does.** For one shell of a DWI scan, predicts the spherical-harmonic "
            "coefficients (order 6) of the whole angular signal S/S0 of every slice, from the "
            "acquired directions' SH fits of that slice and its two neighbours, in one network "
            "pass per slice and sampling step (truncated DDIM from the regularised SH fit); any "
            "target direction is evaluated from the coefficients.",
            "",
            "## Training",
            f"- Data: {record['data']['source']}; {record['data']['slabs_available']} slabs; "
            f"protocols: {protocol['n_directions'][0]}-{protocol['n_directions'][1]} "
            f"directions, SNR {protocol['snr'][0]:g}-{protocol['snr'][1]:g}, "
            f"{protocol['n_b0'][0]}-{protocol['n_b0'][1]} b=0 volumes.",
            f"- Real scans: {record['data']['real_data']}.",
            f"- Steps: {record['steps']} (planned {record['steps_planned']}); wall time "
            f"{record['wall_time_s'] / 3600:.1f} h, " + _hardware_text(record) + ".",
            f"- Optimiser: {record['optimizer']['name']}, lr {record['optimizer']['lr']:g} -> "
            f"{record['optimizer']['lr_min']:g} ({record['optimizer']['schedule']}), batch "
            f"{record['optimizer']['batch_size']} crops of {record['optimizer']['crop']}^2.",
            f"- Loss: {record['loss']['terms']} (fa_weight {record['loss']['fa_weight']:g}); "
            f"targets: {record['loss']['target']}.",
            *(
                [f"- Fine-tuned from: {record['init_weights']}."]
                if record.get("init_weights")
                else []
            ),
            "",
            "## Validation during training (held-out simulated slabs, mixed protocols)",
            f"- FA MAE of the predicted field vs the truth: network {num('net_fa_mae')}"
            + (
                f" (moving average of its weights {num('ema_fa_mae')})"
                if "ema_fa_mae" in val
                else ""
            )
            + f", its SH prior {num('prior_fa_mae')}, order-2 fit of the input "
            f"{num('fit2_fa_mae')} (step {val.get('step', 'n/a')}).",
            "",
            "## Evaluation",
            "See docs/results.md (commands there) for the held-out simulated brains and real "
            "scans; the numbers there, not the validation above, say what a user gains.",
            "",
            "## Limits",
            "- Trained on simulated brains driven by ONE real subject's fibre peaks (TractSeg), "
            "deformed and rotated; real anatomy and artefacts differ.",
            "- Single-shell model applied shell by shell; b-values outside 700-3000 s/mm² and "
            "more than 64 directions are outside its training range.",
            "",
        ]
    )


def _hardware_text(record: dict[str, Any]) -> str:
    hardware = record["hardware"]
    if hardware.get("device", "cpu") == "cuda":
        return (
            f"on one GPU ({hardware.get('gpu', 'CUDA')}), the examples made by "
            f"{hardware.get('data_workers', 0)} CPU worker(s), each batch serving "
            f"{hardware.get('data_echo', 1)} step(s)"
        )
    precision = ", bfloat16 autocast" if hardware.get("cpu_amp") else ""
    return (
        f"about {record['cpu_hours']:.1f} CPU-hours on {hardware['cpu']} "
        f"({hardware['torch_threads']} torch thread(s){precision}, no GPU)"
    )


def export_model(
    output: str | Path,
    folder: str | Path,
    *,
    card: str | None = None,
    weights: str | Path | None = None,
    weights_dtype: str = "float32",
    cpu_precision: str | None = None,
) -> Path:
    """Write a model folder from a run: the state's (or a snapshot's) weights, config, card.

    Parameters
    ----------
    output : str or Path
        The run folder.
    folder : str or Path
        Destination model folder (replaced if it holds a model).
    card : str, optional
        Markdown of MODEL_CARD.md (default: `model_card` of the training record).
    weights : str or Path, optional
        A snapshot (``snapshots/step-*.pt`` or ``ema-step-*.pt``) to export instead of the
        state's weights (by default the moving average of the weights when the run keeps
        one, else the last weights).
    weights_dtype : {"float32", "float16"}
        How the weights are stored (`checkpoint.save_model`).
    cpu_precision : {"float32", "bfloat16"}, optional
        The precision the model was validated with on the CPU, written as
        ``sampler_defaults["cpu"]["precision"]`` (the engine's ``--precision auto`` follows
        it where the CPU runs bfloat16 natively); default: the run's setting.

    Returns
    -------
    Path

    """
    from .checkpoint import save_model

    output = Path(output)
    state = torch.load(output / STATE_NAME, map_location="cpu", weights_only=True)
    config = FieldConfig(**state["extra"]["model"])
    if cpu_precision is not None:
        defaults = {kind: dict(values) for kind, values in config.sampler_defaults.items()}
        defaults["cpu"]["precision"] = cpu_precision
        config = replace(config, sampler_defaults=defaults)
    network = ShFieldNetwork(config)
    tensors, exported = state["model"], None
    if "ema" in state["extra"]:  # the moving average of the weights
        prefix = "module."
        tensors = {
            k[len(prefix) :]: v for k, v in state["extra"]["ema"].items() if k.startswith(prefix)
        }
        exported = f"moving average of the weights (decay {state['extra']['ema_decay']:g})"
    if weights is not None:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
        exported = Path(weights).name
    network.load_state_dict(tensors)
    record = training_record(output)
    if exported is not None:
        record["exported_weights"] = exported
    if card is None:
        card = model_card(record, Path(folder).name)
    if weights_dtype != "float32":
        record["weights_dtype"] = weights_dtype
    return save_model(
        folder, network, config, training=record, card=card, overwrite=True,
        weights_dtype=weights_dtype,
    )  # fmt: skip


if __name__ == "__main__":  # python -m qid2_bidsapp.model.field_train CONFIG [MAX_MINUTES]
    import sys

    minutes = float(sys.argv[2]) if len(sys.argv) > 2 else None
    train_field(FieldTrainConfig.from_file(sys.argv[1]), max_minutes=minutes)
