"""Batched inference of the QID² network over a volume: slices x target directions.

One *pair* is one (slice, target direction): the network synthesises the target's slice from R
reference slices and the SH prior of that slice. A volume has ``slices x targets`` pairs (145 x
60 for an HCP shell), built lazily in batches here so that memory does not grow with the volume.

- **Seeding.** Every pair draws its noise from its own generator, seeded by
  ``(seed, shell, slice, target)`` (`pair_generator`), on the CPU. A pair's samples therefore do
  not depend on the batch it lands in, on the batch size, on an out-of-memory back-off or on the
  device (up to floating-point differences of the network's kernels between batch sizes).
- **Batch size.** Chosen from free memory (`auto_batch_size`): on CUDA from
  ``torch.cuda.mem_get_info`` and one probe forward pass; on the CPU from ``MemAvailable`` and an
  estimate of the activations (`estimate_bytes_per_image`), with a small cap (bigger batches do
  not make a CPU faster).
- **Out of memory.** A batch that runs out of memory is split in halves and retried, and later
  batches keep the smaller size, down to one pair, after which the error is raised
  (`run_pairs`).
- **CPU speed.** The network's attention is fused (`network.set_fused_attention`), and while
  `synthesise_shell` runs on the CPU its convolution weights are channels-last
  (`cpu_channels_last`), which oneDNN runs faster; both change results by float round-off
  only. ``benchmarks/profile_qid2_cpu.py`` measures them.
- **Sampling** (`sample_pairs`) is the truncated DDIM chain of `Qid2Sampler.sample`, step for
  step, with the noise drawn per pair instead of per batch; for a single pair with the same
  generator it gives the same result as `Qid2Sampler.sample`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .field_config import PRECISIONS, check_symmetry_count
from .sampler import Qid2Sampler, ddim_step

Key = TypeVar("Key")

#: Largest batch (pairs) chosen automatically on the CPU: more does not speed a CPU up.
CPU_MAX_PAIRS = 8
#: Largest batch (pairs) chosen automatically on a GPU.
CUDA_MAX_PAIRS = 256
#: Share of the available RAM (CPU) or free GPU memory (CUDA) a batch may use.
CPU_MEMORY_SHARE = 0.25
CUDA_MEMORY_SHARE = 0.7
#: Run the network with channels-last convolution weights on the CPU (`cpu_channels_last`).
CPU_CHANNELS_LAST = True


@dataclass(frozen=True)
class SamplerSettings:
    """Settings of the truncated DDIM sampler (see `Qid2Sampler.sample`).

    Parameters
    ----------
    n_steps : int
        Network evaluations per sample.
    t_start : int or None
        First timestep of the chain, which starts from the SH prior noised to `t_start`; None
        runs the full chain from pure noise.
    temperature : float
        Scale of the initial (and, with ``eta > 0``, the step) noise; 0 is deterministic.
    n_samples : int
        K, samples per pair; their mean is the prediction and their std the uncertainty.
    eta : float
        DDIM stochasticity (0: deterministic given the initial noise).
    symmetries : int
        SH-field models only: the K samples are drawn on this many mirrored
        copies of each slice (1, 2, 4 or 8; `plane_symmetry`), each mapped back; the mean
        and std are over all of them. 1 runs the slice as it is.

    """

    n_steps: int = 10
    t_start: int | None = 200
    temperature: float = 1.0
    n_samples: int = 4
    eta: float = 0.0
    symmetries: int = 1

    def __post_init__(self) -> None:
        if int(self.n_steps) != self.n_steps or self.n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {self.n_steps}")
        if self.t_start is not None and (int(self.t_start) != self.t_start or self.t_start < 0):
            raise ValueError(f"t_start must be an integer >= 0 or None, got {self.t_start}")
        if self.t_start is not None and self.n_steps > self.t_start + 1:
            raise ValueError(
                f"n_steps ({self.n_steps}) must not exceed t_start + 1 ({self.t_start + 1})"
            )
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if int(self.n_samples) != self.n_samples or self.n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {self.n_samples}")
        if not (self.eta >= 0 and math.isfinite(self.eta)):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        check_symmetry_count(self.symmetries)

    def check_against(self, config: ModelConfig) -> None:
        """Check the settings fit a model's noise schedule.

        Parameters
        ----------
        config : ModelConfig
            The model's configuration.

        Raises
        ------
        ValueError
            When `t_start` is past the last training timestep, or `n_steps` exceeds the
            length of a full chain.

        """
        last = config.num_train_timesteps - 1
        if self.t_start is not None and self.t_start > last:
            raise ValueError(f"t_start must be at most {last} for this model, got {self.t_start}")
        if self.t_start is None and self.n_steps > last + 1:
            raise ValueError(f"n_steps must be at most {last + 1} for this model")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-serialisable provenance."""
        return asdict(self)


# --------------------------------------------------------------------------- devices


def cuda_device_count() -> int:
    """Count CUDA devices, without initialising CUDA where NVML can tell.

    ``torch.cuda.is_available()`` initialises the CUDA driver, after which processes forked
    from this one (Nipype's MultiProc workers) cannot use CUDA; ``device_count`` asks NVML.

    Returns
    -------
    int

    """
    try:
        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - a broken driver means no usable GPU
        return 0


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"auto"`` into ``cuda`` when a GPU is present, else ``cpu``.

    Parameters
    ----------
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:<n>"``.

    Returns
    -------
    torch.device

    Raises
    ------
    RuntimeError
        When CUDA is asked for and there is none.

    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA device is available")
    return device


def cpu_has_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 natively (oneDNN: AVX512-BF16 or AMX).

    Returns
    -------
    bool

    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def autocast_dtype(
    device: torch.device, precision: str = "auto", cpu_bfloat16: bool = False
) -> torch.dtype | None:
    """Return the autocast dtype of inference on a device.

    Parameters
    ----------
    device : torch.device
        Where the network runs.
    precision : {"auto", "float32", "bfloat16"}
        ``auto``: bfloat16 (float16 where bfloat16 is not supported) on CUDA; on the CPU
        bfloat16 when ``cpu_bfloat16`` is set and the CPU runs it natively, else float32.
        ``float32``: no autocast. ``bfloat16``: bfloat16 autocast on any device.
    cpu_bfloat16 : bool
        Whether the model was validated with bfloat16 on the CPU (its
        ``sampler_defaults["cpu"]["precision"]``).

    Returns
    -------
    torch.dtype or None
        None means full float32.

    Raises
    ------
    ValueError
        An unknown ``precision``, or ``bfloat16`` on a CUDA GPU without bfloat16.

    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return None
    cuda = device.type == "cuda"
    if precision == "bfloat16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bfloat16; use --precision auto")
        return torch.bfloat16
    if cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_bfloat16 and cpu_has_bfloat16():
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def cpu_channels_last(network: nn.Module, device: torch.device, enabled: bool | None = None):
    """Give the network channels-last convolution weights on the CPU for the ``with`` block.

    oneDNN (``mkldnn_convolution``) then runs the convolutions, group norms and activations in
    NHWC, about 10-20 % faster for this U-Net than in NCHW, and the result is the same up to
    float round-off. The weights get their usual layout back afterwards (nothing else about
    the module changes). Nothing happens on other devices, when disabled, or when the weights
    are not all in the default layout to begin with.

    Parameters
    ----------
    network : nn.Module
        The network (its 4-D parameters are converted in place, then back).
    device : torch.device
        Where it runs.
    enabled : bool, optional
        Default: `CPU_CHANNELS_LAST`.

    """
    if enabled is None:
        enabled = CPU_CHANNELS_LAST
    weights = [p for p in network.parameters() if p.dim() == 4]
    if (
        not enabled
        or device.type != "cpu"
        or not weights
        or not all(p.is_contiguous() for p in weights)
    ):
        yield
        return
    network.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        network.to(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- memory


def available_memory_bytes() -> int:
    """RAM available to new allocations (``MemAvailable``), without psutil.

    Returns
    -------
    int
        Bytes; falls back to the free physical pages, then to 4 GiB when neither is known.

    """
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 4 << 30


def estimate_bytes_per_image(config: ModelConfig, height: int, width: int) -> int:
    """Rough peak memory of one image through the network without gradients (float32).

    Counts the U-Net's kept skip connections, a working set at full resolution, and the
    self-attention matrices of the attention levels and the middle block; then doubles it.

    Parameters
    ----------
    config : ModelConfig
        Architecture.
    height, width : int
        Padded image size.

    Returns
    -------
    int
        Bytes.

    """
    pixels = height * width
    floats = 0.0
    for level, channels in enumerate(config.channels):
        level_pixels = pixels / 4**level
        floats += (config.num_res_blocks + 2) * channels * level_pixels  # skips, down-sample
        attends = config.attention_levels[level] or level == len(config.channels) - 1
        if attends:
            heads = channels // config.num_head_channels
            floats += 2 * heads * level_pixels**2  # scores and softmax
    floats += 8 * max(config.channels) * pixels  # working tensors, up-path concatenations
    floats += (config.in_channels + 4) * pixels  # inputs, sample, output, noise
    return int(2 * 4 * floats)


def _probe_cuda_bytes_per_image(
    network: nn.Module,
    config: ModelConfig,
    height: int,
    width: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> int:
    """Measure the peak CUDA memory of one forward pass of one image."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    n = 2
    x = torch.zeros((n, 1, height, width), device=device)
    condition = torch.zeros((n, config.condition_channels, height, width), device=device)
    tokens = torch.zeros((n, config.n_tokens, 9), device=device)
    timesteps = torch.zeros((n,), dtype=torch.long, device=device)
    with torch.inference_mode(), _autocast(device, dtype):
        network(x, condition, timesteps, tokens)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del x, condition, tokens, timesteps
    torch.cuda.empty_cache()
    return max(1, int(peak / n))


def auto_batch_size(
    network: nn.Module,
    config: ModelConfig,
    height: int,
    width: int,
    n_samples: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> int:
    """Choose how many (slice, target) pairs to run at once from the free memory.

    Parameters
    ----------
    network : nn.Module
        The network (probed once on CUDA).
    config : ModelConfig
        Its configuration.
    height, width : int
        Padded slice size.
    n_samples : int
        K: every pair is K images in the network's batch.
    device : torch.device
        Where it runs.
    dtype : torch.dtype, optional
        Autocast dtype of the network (None: float32).

    Returns
    -------
    int
        At least 1; at most `CPU_MAX_PAIRS` on the CPU and `CUDA_MAX_PAIRS` on CUDA.

    """
    state = (config.condition_channels + 6) * height * width * 4  # DDIM tensors per image
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        try:
            per_image = _probe_cuda_bytes_per_image(network, config, height, width, device, dtype)
        except torch.cuda.OutOfMemoryError:
            return 1
        budget, cap = CUDA_MEMORY_SHARE * free, CUDA_MAX_PAIRS
    else:
        per_image = estimate_bytes_per_image(config, height, width)
        budget, cap = CPU_MEMORY_SHARE * available_memory_bytes(), CPU_MAX_PAIRS
    per_pair = n_samples * (per_image + state)
    return int(min(cap, max(1, budget // per_pair)))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is a (CUDA or CPU) out-of-memory error.

    Parameters
    ----------
    error : BaseException
        The exception.

    Returns
    -------
    bool

    """
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


# --------------------------------------------------------------------------- seeding


def pair_generator(seed: int, *key: int) -> torch.Generator:
    """Make a CPU generator seeded by ``(seed, *key)``, e.g. ``(seed, shell, slice, target)``.

    Parameters
    ----------
    seed : int
        The run's seed (negative values are taken modulo 2**64).
    *key : int
        Integers identifying the pair.

    Returns
    -------
    torch.Generator

    """
    entropy = [int(v) % (1 << 64) for v in (seed, *key)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    value = (int(state[0]) << 31) ^ int(state[1])  # < 2**63
    return torch.Generator(device="cpu").manual_seed(value)


# --------------------------------------------------------------------------- sampling


def _draw(generators: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor):
    noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(noise, dim=0).to(device=like.device, dtype=like.dtype)


@torch.inference_mode()
def sample_pairs(
    network: nn.Module,
    sampler: Qid2Sampler,
    condition: torch.Tensor,
    tokens: torch.Tensor,
    generators: list[torch.Generator],
    settings: SamplerSettings,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample K images per pair with the truncated DDIM chain; noise drawn pair by pair.

    Parameters
    ----------
    network : nn.Module
        The network, in eval mode, on ``condition.device``.
    sampler : Qid2Sampler
        Holds the noise schedule and prediction type.
    condition : Tensor, shape (B, R + 1, H, W)
        References then SH prior, model space; H, W multiples of ``spatial_multiple``.
    tokens : Tensor, shape (B, R + 1, TOKEN_FEATURES)
        Direction tokens.
    generators : list of torch.Generator
        One CPU generator per pair; pair i's noise comes from ``generators[i]`` only.
    settings : SamplerSettings
        Steps, truncation, temperature, K, eta.
    dtype : torch.dtype, optional
        Autocast dtype of the network (None: float32).

    Returns
    -------
    mean, std : Tensor, shape (B, 1, H, W)
        Mean and unbiased standard deviation over the K samples, model space; std is 0 for
        K = 1.

    """
    b, _, h, w = condition.shape
    if len(generators) != b:
        raise ValueError(f"need one generator per pair ({b}), got {len(generators)}")
    k = settings.n_samples
    device = condition.device
    steps = sampler.timesteps(settings.n_steps, settings.t_start)
    alphas_cumprod = sampler.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    condition = condition.float().repeat_interleave(k, dim=0)
    tokens = tokens.float().to(device).repeat_interleave(k, dim=0)
    one = (k, 1, h, w)
    noise = settings.temperature * _draw(generators, one, condition)
    if settings.t_start is None:
        x = noise
    else:
        start = torch.full((b * k,), int(steps[0]), device=device)
        x = sampler.scheduler.add_noise(condition[:, -1:], noise, start)
    for i, t in enumerate(steps):
        t_prev = int(steps[i + 1]) if i + 1 < len(steps) else -1
        timesteps = torch.full((b * k,), int(t), device=device, dtype=torch.long)
        with _autocast(device, dtype):
            out = network(x, condition, timesteps, tokens).float()
        step_noise = None
        if settings.eta > 0:
            step_noise = settings.temperature * _draw(generators, one, x)
        x, _ = ddim_step(
            alphas_cumprod,
            out,
            int(t),
            t_prev,
            x,
            eta=settings.eta,
            noise=step_noise,
            prediction_type=sampler.config.prediction_type,
            clip_sample=sampler.clip_sample,
        )
    samples = x.reshape(b, k, 1, h, w)
    mean = samples.mean(dim=1)
    std = samples.std(dim=1, correction=1) if k > 1 else torch.zeros_like(mean)
    return mean, std


def run_pairs(
    keys: Iterable[Key],
    process: Callable[[list[Key]], None],
    *,
    batch_size: int,
    total: int | None = None,
    desc: str = "qid2",
    unit: str = "pair",
    on_oom: Callable[[], None] | None = None,
) -> int:
    """Feed keys to `process` in batches built lazily; halve the batch on out-of-memory.

    Parameters
    ----------
    keys : iterable
        The pairs, in order (consumed lazily: never held in memory all at once).
    process : callable
        Called with a list of at most `batch_size` consecutive keys; it must compute and
        store their results, and be safe to call again on a part of a batch that failed.
    batch_size : int
        Pairs per batch to start with.
    total : int, optional
        Number of keys, for the progress bar's ETA.
    desc : str
        Progress bar label.
    unit : str
        Name of one key in the progress bar and the log lines.
    on_oom : callable, optional
        Called after an out-of-memory error, before retrying (e.g. to empty a GPU cache).

    Returns
    -------
    int
        The batch size in use at the end (smaller than `batch_size` after a back-off).

    Raises
    ------
    RuntimeError
        An out-of-memory error with a batch of one pair, or any other error of `process`.

    """
    from tqdm import tqdm

    size = max(1, int(batch_size))
    iterator: Iterator[Key] = iter(keys)
    with tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr) as bar:
        report = ProgressLog(desc, total, unit)
        while chunk := list(itertools.islice(iterator, size)):
            pending = [chunk]
            while pending:
                part = pending.pop(0)
                try:
                    process(part)
                    failed = False
                except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
                    if not is_out_of_memory(error) or len(part) == 1:
                        raise
                    failed = True
                if failed:  # outside the handler: the failed batch's tensors are freed
                    size = min(size, max(1, len(part) // 2))
                    if on_oom is not None:
                        on_oom()
                    pending[:0] = [part[i : i + size] for i in range(0, len(part), size)]
                    continue
                bar.update(len(part))
                report.update(len(part))
    report.finish()
    return size


#: Seconds between two progress lines in the log when there is no terminal progress bar.
PROGRESS_LOG_SECONDS = 30.0


class ProgressLog:
    """Plain progress lines (done/total, ETA) in the ``qid2`` log, every ~30 s.

    For the log file, and for runs without a terminal (batch jobs, SLURM), where tqdm draws
    nothing. The records carry ``progress=True`` so that the app's terminal handler can leave
    them out while a progress bar is on the screen.

    Parameters
    ----------
    desc : str
        What is running (e.g. ``qid2 b=1000``).
    total : int or None
        Items to do.
    unit : str
        Name of an item.
    enabled : bool
        Log at all (False when a progress bar is shown).
    every : float
        Seconds between lines.

    """

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str,
        *,
        enabled: bool = True,
        every: float = PROGRESS_LOG_SECONDS,
    ):
        import logging
        import time

        self.logger = logging.getLogger("qid2")
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled, self.every = bool(enabled), float(every)
        self._clock = time.monotonic
        self.start = self.last = self._clock()
        self.done = 0

    def update(self, n: int) -> None:
        """Count `n` finished items; log a line when `every` seconds have passed."""
        self.done += int(n)
        now = self._clock()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self.logger.info("%s", self.line(now), extra={"progress": True})

    def line(self, now: float | None = None) -> str:
        """Return the progress line, e.g. ``qid2 b=1000: 40/145 slice (28 %), ETA 2.1 min``."""
        elapsed = (self._clock() if now is None else now) - self.start
        if not self.total:
            return f"{self.desc}: {self.done} {self.unit} in {elapsed:.0f} s"
        share = self.done / self.total
        eta = elapsed / share - elapsed if share > 0 else float("nan")
        eta_text = f"{eta / 60:.1f} min" if eta >= 60 else f"{eta:.0f} s"
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * share:.0f} %), "
            f"elapsed {elapsed:.0f} s, ETA {eta_text}"
        )

    def finish(self) -> None:
        """Log the final count when lines were logged during the run."""
        if self.enabled and self.last != self.start:
            self.logger.info("%s (done)", self.line(), extra={"progress": True})


# --------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class SliceGrid:
    """Where the network runs in a volume whose slice axis is last.

    Attributes
    ----------
    rows, cols : tuple of int
        ``(start, stop)`` of the in-plane crop: the brain mask's bounding box over all
        slices, widened by a margin (the same crop for every slice, so slices batch together).
    slices : ndarray of int
        Slices with at least one mask voxel (the others are not run).

    """

    rows: tuple[int, int]
    cols: tuple[int, int]
    slices: np.ndarray

    @classmethod
    def from_mask(cls, mask: np.ndarray, margin: int) -> SliceGrid:
        """Crop and slices of a (A, B, S) mask.

        Parameters
        ----------
        mask : ndarray of bool, shape (A, B, S)
            Brain mask, slice axis last.
        margin : int
            Voxels added around the bounding box (clamped to the image).

        Returns
        -------
        SliceGrid
            With no slices when the mask is empty.

        """
        mask = np.asarray(mask, dtype=bool)
        slices = np.flatnonzero(mask.any(axis=(0, 1)))
        if slices.size == 0:
            return cls((0, 0), (0, 0), slices)
        rows = np.flatnonzero(mask.any(axis=(1, 2)))
        cols = np.flatnonzero(mask.any(axis=(0, 2)))
        margin = max(0, int(margin))
        return cls(
            (max(0, rows[0] - margin), min(mask.shape[0], rows[-1] + 1 + margin)),
            (max(0, cols[0] - margin), min(mask.shape[1], cols[-1] + 1 + margin)),
            slices,
        )

    @property
    def shape(self) -> tuple[int, int]:
        """In-plane size of the crop (before padding)."""
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


def padded_shape(shape: tuple[int, int], multiple: int) -> tuple[int, int]:
    """``shape`` rounded up to multiples of `multiple` (what `pad_to_multiple` makes)."""
    return tuple(-(-n // multiple) * multiple for n in shape)


def synthesise_shell(
    network: nn.Module,
    sampler: Qid2Sampler,
    signal: np.ndarray,
    b0: np.ndarray,
    mask: np.ndarray,
    bvecs_in: np.ndarray,
    bvecs_out: np.ndarray,
    bval: float,
    prior_matrix: np.ndarray,
    settings: SamplerSettings,
    *,
    seed: int = 0,
    slice_axis: int = 2,
    margin: int = 4,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Synthesise every target direction of one shell, slice by slice, in batches of pairs.

    Parameters
    ----------
    network : nn.Module
        The `Qid2Network`, in eval mode, on the device to use.
    sampler : Qid2Sampler
        The model's sampler (schedule).
    signal : ndarray, shape (X, Y, Z, N)
        Acquired volumes of the shell.
    b0 : ndarray, shape (X, Y, Z)
        Mean b=0 image.
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels the network predicts; elsewhere the output is the SH prior and the std 0.
    bvecs_in : ndarray, shape (N, 3)
        Acquired directions in the model frame (`data.model_frame_bvecs`).
    bvecs_out : ndarray, shape (M, 3)
        Target directions in the model frame.
    bval : float
        The shell's b-value (a token feature, and part of every pair's seed).
    prior_matrix : ndarray, shape (M, N)
        Linear map from the acquired signal to the SH prior at the targets
        (`data.sh_prior_matrix`); the condition is built by `data.model_inputs`, as in
        training.
    settings : SamplerSettings
        Sampler settings.
    seed : int
        Seed of the run; pair (slice s, target m) draws from ``(seed, round(bval), s, m)``.
    slice_axis : int
        Axis of `signal` along which the acquisition's slices lie (0, 1 or 2).
    margin : int
        Voxels kept around the mask's bounding box in each slice.
    batch_size : int, optional
        Pairs per batch; default from the free memory (`auto_batch_size`).
    dtype : torch.dtype, optional
        Autocast dtype of the network (None: float32).

    Returns
    -------
    mean : ndarray, shape (X, Y, Z, M), float32
        Predicted signal (mean of the K samples) in the units of `signal`, >= 0; the SH prior
        outside the mask.
    std : ndarray, shape (X, Y, Z, M), float32
        Standard deviation of the K samples in signal units; 0 outside the mask.
    batch_size : int
        Batch size used at the end (after any out-of-memory back-off).

    """
    from .conditioning import direction_tokens, from_model_space, select_references
    from .data import model_inputs
    from .network import crop_pad, pad_to_multiple

    config: ModelConfig = sampler.config
    clip = config.signal_clip
    device = next(network.parameters()).device
    bvecs_in = np.asarray(bvecs_in, dtype=np.float64)
    bvecs_out = np.asarray(bvecs_out, dtype=np.float64).reshape(-1, 3)
    prior_matrix = np.asarray(prior_matrix, dtype=np.float64)
    n_targets = len(bvecs_out)

    # slice axis last: every array below is a view of the caller's or of the outputs
    sig = np.moveaxis(np.asarray(signal), slice_axis, 2)
    s0 = np.moveaxis(np.asarray(b0, dtype=np.float32), slice_axis, 2)
    inside = np.moveaxis(np.asarray(mask, dtype=bool), slice_axis, 2)
    mean = np.zeros(signal.shape[:3] + (n_targets,), dtype=np.float32)
    std = np.zeros_like(mean)
    mean_v, std_v = np.moveaxis(mean, slice_axis, 2), np.moveaxis(std, slice_axis, 2)
    for s in range(sig.shape[2]):  # the SH prior everywhere; the network overwrites the mask
        mean_v[:, :, s] = np.clip(sig[:, :, s].astype(np.float64) @ prior_matrix.T, 0, None)
    grid = SliceGrid.from_mask(inside, margin)
    if grid.slices.size == 0 or n_targets == 0:
        return mean, std, int(batch_size or 1)

    references = np.stack([select_references(g, bvecs_in, config.n_references) for g in bvecs_out])
    tokens = np.stack(
        [direction_tokens(g, bvecs_in[r], bval) for g, r in zip(bvecs_out, references, strict=True)]
    )
    (r0, r1), (c0, c1) = grid.rows, grid.cols
    shell_key = int(round(float(bval)))

    def slice_inputs(s: int) -> dict[str, np.ndarray]:
        acquired = sig[r0:r1, c0:c1, s].astype(np.float64)
        return {
            "acquired": np.moveaxis(acquired, -1, 0),  # (N, H, W)
            "prior": np.moveaxis(acquired @ prior_matrix.T, -1, 0),  # (M, H, W), raw
            "b0": s0[r0:r1, c0:c1, s],
            "mask": inside[r0:r1, c0:c1, s],
        }

    def process(pairs: list[tuple[int, int]]) -> None:
        inputs = {s: slice_inputs(s) for s in dict.fromkeys(s for s, _ in pairs)}
        condition = np.stack(
            [
                model_inputs(
                    inputs[s]["acquired"][references[m]],
                    inputs[s]["prior"][m],
                    inputs[s]["b0"],
                    clip,
                )
                for s, m in pairs
            ]
        )
        cond = torch.from_numpy(np.ascontiguousarray(condition, dtype=np.float32)).to(device)
        cond, pad = pad_to_multiple(cond, config.spatial_multiple)
        tok = torch.from_numpy(tokens[[m for _, m in pairs]]).to(device)
        generators = [pair_generator(seed, shell_key, s, m) for s, m in pairs]
        mu, sigma = sample_pairs(network, sampler, cond, tok, generators, settings, dtype=dtype)
        mu = crop_pad(mu, pad)[:, 0].cpu().numpy()
        sigma = crop_pad(sigma, pad)[:, 0].cpu().numpy()
        for i, (s, m) in enumerate(pairs):
            base, keep = inputs[s]["b0"], inputs[s]["mask"]
            predicted = np.clip(from_model_space(mu[i], clip) * base, 0, None)
            spread = sigma[i] * (clip / 2.0) * base
            mean_v[r0:r1, c0:c1, s, m][keep] = predicted[keep]
            std_v[r0:r1, c0:c1, s, m][keep] = np.clip(spread[keep], 0, None)

    if batch_size is None:
        height, width = padded_shape(grid.shape, config.spatial_multiple)
        batch_size = auto_batch_size(
            network, config, height, width, settings.n_samples, device, dtype
        )
    pairs = ((int(s), m) for s in grid.slices for m in range(n_targets))
    empty_cache = torch.cuda.empty_cache if device.type == "cuda" else None
    with cpu_channels_last(network, device):
        final = run_pairs(
            pairs,
            process,
            batch_size=batch_size,
            total=grid.slices.size * n_targets,
            desc=f"qid2 b={shell_key}",
            on_oom=empty_cache,
        )
    return mean, std, final
