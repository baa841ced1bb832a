"""Few-step, truncated DDIM sampling of the QID² network (noise schedule kept apart).

The noise schedule (``alphas_cumprod``, ``add_noise``) comes from MONAI's `DDIMScheduler`.
The update itself is a small DDIM step of our own (`ddim_step`, equations 12 and 16 of Song et
al., 2021) that takes the previous timestep explicitly: MONAI's ``DDIMScheduler.step`` (1.6)
computes it as ``timestep - num_train_timesteps // num_inference_steps``, which is only right
for uniformly spaced chains starting at T (and not even for MONAI's own rounded
``linspace(T - 1, 0, n)`` timesteps), so it cannot run a truncated chain ``t_start -> 0``.
Our step reproduces MONAI's exactly where MONAI's previous timestep is right (tested).

Truncation (FTDDM): the chain starts from the SH prior noised to ``t_start``
(``add_noise(prior, temperature * noise, t_start)``) and runs `n_steps` steps on timesteps
evenly spaced from ``t_start`` down to the clean image (`ddim_timesteps`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from .config import ModelConfig


def make_scheduler(config: ModelConfig, *, clip_sample: bool = True) -> DDIMScheduler:
    """Build the MONAI scheduler holding the noise schedule of a configuration.

    Parameters
    ----------
    config : ModelConfig
        Source of ``num_train_timesteps``, ``schedule``, ``beta_start/end``, ``prediction_type``.
    clip_sample : bool
        Clip the predicted clean image to ``[-1, 1]`` (the model-space range).

    Returns
    -------
    DDIMScheduler
        Also usable in training (``add_noise``, ``alphas_cumprod``).

    """
    schedule_args = {}
    if config.schedule != "cosine":
        schedule_args = {"beta_start": config.beta_start, "beta_end": config.beta_end}
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        schedule=config.schedule,
        clip_sample=clip_sample,
        set_alpha_to_one=True,
        prediction_type=config.prediction_type,
        **schedule_args,
    )


def ddim_timesteps(t_start: int, n_steps: int) -> np.ndarray:
    """Timesteps of a DDIM chain from `t_start` to the clean image.

    ``n_steps + 1`` points are spaced evenly from `t_start` to -1 (the clean image, whose
    ``alpha_cumprod`` is 1) and rounded; the first `n_steps` are the network's timesteps. For
    ``t_start = T - 1`` this is the "trailing" spacing (999, 899, ..., 99 for T=1000, n=10).

    Parameters
    ----------
    t_start : int
        First timestep, ``0 <= t_start``.
    n_steps : int
        Number of steps (network evaluations), ``1 <= n_steps <= t_start + 1``.

    Returns
    -------
    ndarray of int64, shape (n_steps,)
        Strictly decreasing timesteps, first `t_start`, last >= 0.

    """
    if t_start < 0:
        raise ValueError(f"t_start must be >= 0, got {t_start}")
    if not 1 <= n_steps <= t_start + 1:
        raise ValueError(
            f"n_steps must be between 1 and t_start + 1 = {t_start + 1}, got {n_steps}"
        )
    points = np.rint(np.linspace(t_start, -1, n_steps + 1)).astype(np.int64)
    return points[:-1]


def ddim_step(
    alphas_cumprod: torch.Tensor,
    model_output: torch.Tensor,
    timestep: int,
    prev_timestep: int,
    sample: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    clip_sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from `timestep` to an arbitrary earlier `prev_timestep`.

    Parameters
    ----------
    alphas_cumprod : Tensor, shape (T,)
        The schedule's cumulative alpha products.
    model_output : Tensor
        Network output at `timestep` (noise, clean sample or v, per `prediction_type`).
    timestep : int
        Current timestep.
    prev_timestep : int
        Timestep to step to; a negative value means the clean image (``alpha_cumprod = 1``).
    sample : Tensor
        Current sample ``x_t``.
    eta : float
        DDIM stochasticity (0: deterministic; 1: DDPM-like variance).
    noise : Tensor, optional
        Standard-normal noise (already scaled by any temperature), required when ``eta > 0``.
    prediction_type : {"epsilon", "sample", "v_prediction"}
        What `model_output` is.
    clip_sample : bool
        Clip the predicted clean image to ``[-1, 1]``.

    Returns
    -------
    prev_sample : Tensor
        ``x_{prev_timestep}``.
    pred_original : Tensor
        The predicted clean image.

    """
    a_t = alphas_cumprod[timestep].to(sample.device, sample.dtype)
    if prev_timestep >= 0:
        a_prev = alphas_cumprod[prev_timestep].to(sample.device, sample.dtype)
    else:
        a_prev = torch.ones((), device=sample.device, dtype=sample.dtype)
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        pred_original = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original = model_output
        pred_epsilon = (sample - a_t.sqrt() * pred_original) / b_t.sqrt()
    elif prediction_type == "v_prediction":
        pred_original = a_t.sqrt() * sample - b_t.sqrt() * model_output
        pred_epsilon = a_t.sqrt() * model_output + b_t.sqrt() * sample
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if clip_sample:
        pred_original = pred_original.clamp(-1.0, 1.0)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * pred_epsilon
    prev_sample = a_prev.sqrt() * pred_original + direction
    if eta > 0:
        if noise is None:
            raise ValueError("noise is required when eta > 0")
        prev_sample = prev_sample + std * noise
    return prev_sample, pred_original


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Draw standard normal noise on the generator's device and move it to `like`'s device."""
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


class Qid2Sampler:
    """Truncated, few-step DDIM sampler for `Qid2Network`.

    Parameters
    ----------
    config : ModelConfig
        The model's configuration (noise schedule, prediction type).
    clip_sample : bool
        Clip each predicted clean image to the model-space range ``[-1, 1]``.

    Attributes
    ----------
    scheduler : monai.networks.schedulers.DDIMScheduler
        Holds the noise schedule; after `sample`, ``scheduler.timesteps`` is the chain used.

    """

    def __init__(self, config: ModelConfig, *, clip_sample: bool = True):
        self.config = config
        self.clip_sample = clip_sample
        self.scheduler = make_scheduler(config, clip_sample=clip_sample)

    def timesteps(self, n_steps: int, t_start: int | None) -> np.ndarray:
        """Network timesteps of a chain (see `ddim_timesteps`).

        Parameters
        ----------
        n_steps : int
            Number of steps.
        t_start : int or None
            First timestep; None starts at ``num_train_timesteps - 1`` (pure noise).

        Returns
        -------
        ndarray of int64, shape (n_steps,)

        """
        last = self.config.num_train_timesteps - 1
        if t_start is None:
            t_start = last
        if not 0 <= t_start <= last:
            raise ValueError(f"t_start must be between 0 and {last}, got {t_start}")
        return ddim_timesteps(int(t_start), int(n_steps))

    @torch.no_grad()
    def sample(
        self,
        network: nn.Module,
        condition: torch.Tensor,
        tokens: torch.Tensor,
        *,
        prior: torch.Tensor | None = None,
        n_steps: int = 10,
        t_start: int | None = 200,
        temperature: float = 1.0,
        n_samples: int = 1,
        generator: torch.Generator,
        eta: float = 0.0,
        amp: bool = False,
        max_batch: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `n_samples` samples per input and return their per-voxel mean and std.

        Parameters
        ----------
        network : nn.Module
            Called as ``network(x, condition, timesteps, tokens)`` (a `Qid2Network`); it is put
            in eval mode for the call and its mode restored afterwards.
        condition : Tensor, shape (B, R + 1, H, W)
            Reference slices then the SH prior, model space; H, W multiples of
            ``config.spatial_multiple``.
        tokens : Tensor, shape (B, R + 1, TOKEN_FEATURES)
            Direction tokens.
        prior : Tensor, shape (B, 1, H, W), optional
            Model-space estimate the truncated chain starts from; default: the last channel of
            `condition` (the SH prior). Unused when `t_start` is None.
        n_steps : int
            Network evaluations per sample.
        t_start : int or None
            Truncation (FTDDM): start from ``add_noise(prior, temperature * noise, t_start)``
            and run `n_steps` steps from `t_start` to the clean image. None: start from
            ``temperature * noise`` at ``T - 1``.
        temperature : float
            Scale of the initial noise and of the step noise (``eta > 0``). With
            ``temperature = 0`` sampling is deterministic and all samples are equal.
        n_samples : int
            K, samples per input (batched as B·K).
        generator : torch.Generator
            Source of all randomness (on any device; noise is drawn there, then moved), so a
            seed gives the same result on CPU and GPU up to floating-point differences.
        eta : float
            DDIM stochasticity (0: deterministic given the initial noise).
        amp : bool
            Run the network under autocast (bfloat16 on CPU, and on CUDA where supported,
            else float16); the DDIM updates stay in float32.
        max_batch : int, optional
            Largest batch per network call (the B·K batch is split); the noise does not
            depend on it.

        Returns
        -------
        mean : Tensor, shape (B, 1, H, W)
            Per-voxel mean of the K samples, model space (float32).
        std : Tensor, shape (B, 1, H, W)
            Per-voxel standard deviation (unbiased, K - 1); zeros for K = 1.

        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        b, _, h, w = condition.shape
        steps = self.timesteps(n_steps, t_start)
        device = condition.device
        condition = condition.float().repeat_interleave(n_samples, dim=0)
        tokens = tokens.float().to(device).repeat_interleave(n_samples, dim=0)
        shape = (b * n_samples, 1, h, w)
        self.scheduler.timesteps = torch.from_numpy(steps.copy())
        self.scheduler.num_inference_steps = len(steps)
        alphas_cumprod = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

        noise = temperature * _randn(shape, generator, condition)
        if t_start is None:
            x = noise
        else:
            if prior is None:
                prior = condition[:, -1:]
            else:
                if tuple(prior.shape) != (b, 1, h, w):
                    raise ValueError(
                        f"prior must have shape (B, 1, H, W) = {(b, 1, h, w)}, "
                        f"got {tuple(prior.shape)}"
                    )
                prior = prior.float().to(device).repeat_interleave(n_samples, dim=0)
            x = self.scheduler.add_noise(
                prior, noise, torch.full((shape[0],), int(steps[0]), device=device)
            )

        was_training = network.training
        network.eval()
        try:
            for i, t in enumerate(steps):
                t_prev = int(steps[i + 1]) if i + 1 < len(steps) else -1
                out = self._predict(network, x, condition, tokens, int(t), amp, max_batch)
                step_noise = None
                if eta > 0:
                    step_noise = temperature * _randn(shape, generator, x)
                x, _ = ddim_step(
                    alphas_cumprod,
                    out,
                    int(t),
                    t_prev,
                    x,
                    eta=eta,
                    noise=step_noise,
                    prediction_type=self.config.prediction_type,
                    clip_sample=self.clip_sample,
                )
        finally:
            network.train(was_training)

        samples = x.reshape(b, n_samples, 1, h, w)
        mean = samples.mean(dim=1)
        if n_samples > 1:
            std = samples.std(dim=1, correction=1)
        else:
            std = torch.zeros_like(mean)
        return mean, std

    @staticmethod
    def _predict(
        network: nn.Module,
        x: torch.Tensor,
        condition: torch.Tensor,
        tokens: torch.Tensor,
        t: int,
        amp: bool,
        max_batch: int | None,
    ) -> torch.Tensor:
        n = x.shape[0]
        chunk = n if max_batch is None else max(1, int(max_batch))
        outputs = []
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            timesteps = torch.full((x[sl].shape[0],), t, device=x.device, dtype=torch.long)
            with _autocast(x.device, amp):
                out = network(x[sl], condition[sl], timesteps, tokens[sl])
            outputs.append(out.float())
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)
