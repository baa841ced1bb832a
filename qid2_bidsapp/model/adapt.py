"""Per-subject adaptation: a short self-supervised fine-tune on the subject before sampling.

The issue's optional ``--adapt-steps``, kept out of the app because it did not measurably help
the shipped model (docs/results.md: at a learning rate of 1e-4 the FA error grows 8-13 %, at
1e-5 or below it changes by 1 % or less). It stays reachable as the qid2 engine's
``adapt_steps``/``adapt_lr`` options and as ``qid2-eval --qid2-variant NAME:adapt=N,adapt_lr=LR``
so that it can be measured again with each new model.

The subject's own acquired directions are the training data, exactly as in ``qid2-train``'s
self-supervised BIDS examples (`data.make_example`): an acquired direction is hidden, some others
too, and the network learns to predict it from the kept ones. Only what the engine was given is
used, so adapting inside the hidden-direction self-check (or the evaluation harness) never sees
the directions it is scored on.

Settings that are not options are fixed here and recorded in the provenance (`AdaptSettings`):
the kept count is drawn between half of the shell and all but one of its directions (the
regime of inference, where the network sees every acquired direction), timesteps are drawn from
the ones the truncated sampler visits, and the augmentation is the training default without the
added noise.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .data import (
    DEFAULT_MIN_KEEP,
    Augmentation,
    PreparedVolume,
    Volume,
    make_example,
    stack_examples,
)
from .sampler import make_scheduler
from .train import masked_mse, training_target

#: Crop of the adaptation examples (H = W; a multiple of every preset's spatial multiple).
ADAPT_CROP = 64


@dataclass(frozen=True)
class AdaptSettings:
    """How a network is fine-tuned on one subject.

    Parameters
    ----------
    steps : int
        Optimisation steps (0: no adaptation).
    lr : float
        Adam learning rate (constant).
    batch_size : int
        Examples per step.
    max_timestep : int
        Timesteps are drawn uniformly from ``0..max_timestep`` (the sampler's ``t_start``).
    seed : int
        Seed of the examples, noise and timesteps.

    """

    steps: int = 0
    lr: float = 1e-4
    batch_size: int = 8
    max_timestep: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"adapt steps must be a non-negative integer, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"adapt learning rate must be > 0, got {self.lr}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"adapt batch size must be a positive integer, got {self.batch_size}")
        if self.max_timestep < 0:
            raise ValueError(f"adapt max_timestep must be >= 0, got {self.max_timestep}")

    def to_dict(self) -> dict:
        """JSON-serialisable settings."""
        return dataclasses.asdict(self)


def subject_volume(
    signal: np.ndarray,
    b0: np.ndarray,
    bvecs: np.ndarray,
    bval: float,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    slice_axis: int = 2,
) -> PreparedVolume:
    """Wrap one shell of a subject as a training volume (its b=0 image first).

    Parameters
    ----------
    signal : ndarray, shape (X, Y, Z, N)
        Acquired volumes of the shell.
    b0 : ndarray, shape (X, Y, Z)
        Mean b=0 image.
    bvecs : ndarray, shape (N, 3)
        FSL image-axis directions of `signal`.
    bval : float
        The shell's b-value.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine (sets the FSL x flip, as at inference).
    slice_axis : int
        Axis of the acquisition's slices.

    Returns
    -------
    PreparedVolume

    Raises
    ------
    Qid2Error
        When the shell has too few directions or the mask too few voxels per slice.

    """
    n = signal.shape[3]
    data = np.concatenate([np.asarray(b0, np.float32)[..., None], signal.astype(np.float32)], -1)
    volume = Volume(
        data=data,
        bvals=np.r_[0.0, np.full(n, float(bval))],
        bvecs=np.vstack([np.zeros(3), np.asarray(bvecs, dtype=np.float64).reshape(n, 3)]),
        mask=np.asarray(mask, dtype=bool),
        affine=np.asarray(affine, dtype=np.float64),
        name="subject",
    )
    return PreparedVolume(volume, slice_axis=slice_axis, min_keep=DEFAULT_MIN_KEEP)


def adapt_network(
    network: nn.Module,
    config: ModelConfig,
    volume: PreparedVolume,
    settings: AdaptSettings,
    *,
    device: torch.device | None = None,
) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of `network` on one subject's acquired directions.

    Parameters
    ----------
    network : nn.Module
        The loaded `Qid2Network` (left unchanged).
    config : ModelConfig
        Its configuration.
    volume : PreparedVolume
        The subject (`subject_volume`).
    settings : AdaptSettings
        Steps, learning rate, batch size, timestep range, seed.
    device : torch.device, optional
        Where to train (default: the network's device).

    Returns
    -------
    adapted : nn.Module
        A fine-tuned copy, in eval mode, on `device`.
    record : dict
        ``settings``, ``seconds``, ``loss_first`` and ``loss_last`` (mean over the first and
        last tenth of the steps), ``n_directions``, ``kept`` range.

    """
    device = device or next(network.parameters()).device
    adapted = copy.deepcopy(network).to(device)
    n = max(len(idx) for idx in volume.shells.values())
    kept = (max(DEFAULT_MIN_KEEP, n // 2), n - 1)
    record = {"settings": settings.to_dict(), "n_directions": n, "kept": list(kept)}
    if settings.steps == 0:
        return adapted.eval(), record | {"seconds": 0.0, "loss_first": None, "loss_last": None}
    started = time.perf_counter()
    rng = np.random.default_rng([settings.seed, 7])
    generator = torch.Generator().manual_seed(settings.seed)
    scheduler = make_scheduler(config)
    aug = dataclasses.replace(Augmentation(), noise_prob=0.0)
    optimizer = torch.optim.Adam(adapted.parameters(), lr=settings.lr)
    example_args = {
        "n_references": config.n_references,
        "clip": config.signal_clip,
        "crop": ADAPT_CROP,
        "min_keep": kept[0],
        "max_keep": kept[1],
        "augmentation": aug,
        "prior_lambda": config.prior_lambda,
    }
    losses = []
    adapted.train()
    for _ in range(settings.steps):
        batch = stack_examples(
            [make_example(volume, rng, **example_args) for _ in range(settings.batch_size)]
        )
        x0, condition, tokens, mask = (
            torch.from_numpy(batch[k]).to(device) for k in ("target", "condition", "tokens", "mask")
        )
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, settings.max_timestep + 1, (len(x0),), generator=generator).to(device)
        out = adapted(scheduler.add_noise(x0, noise, t), condition, t, tokens).float()
        loss = masked_mse(out, training_target(config, scheduler, x0, noise, t), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapted.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.item()))
    tenth = max(1, len(losses) // 10)
    record |= {
        "seconds": round(time.perf_counter() - started, 2),
        "loss_first": float(np.mean(losses[:tenth])),
        "loss_last": float(np.mean(losses[-tenth:])),
    }
    return adapted.eval(), record
