"""Inference of the SH-field model over a volume: one network pass per (slice, step, sample).

For each slice of the brain's bounding box (slice axis last), the condition is built from the
shell's features (`field_features`); the truncated DDIM chain starts from the prior (the
regularised SH fit) noised to ``t_start`` and runs ``n_steps`` steps; K samples give the mean
coefficients and, evaluated at the targets, the per-voxel standard deviation (uncertainty).
With ``symmetries`` S > 1 the K samples are drawn on each of S mirrored copies
of the slice (`plane_symmetry`) and mapped back; mean and std are over all K x S.
Whatever the number of target directions, the network runs ``slices x steps x K x S`` times;
the targets only cost a small matrix product per voxel. Models with ``log_mean_from_prior``
then rescale each voxel's prediction to the prior's mean log signal (`log_mean_scale`).

Seeding: slice s of a shell draws its noise from ``pair_generator(seed, round(b), s)``, so
results do not depend on the batch size or on an out-of-memory back-off.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .field_config import FieldConfig, check_symmetry_count
from .field_features import (
    brain_windows,
    evaluation_matrix,
    log_mean_scale,
    mirrored_window,
    reference_s0,
    scalar_values,
    shell_features,
    slice_condition,
)
from .inference import (
    SamplerSettings,
    SliceGrid,
    _autocast,
    _draw,
    available_memory_bytes,
    cpu_channels_last,
    padded_shape,
    pair_generator,
    run_pairs,
)
from .network import crop_pad, pad_to_multiple
from .plane_symmetry import (
    condition_matrix,
    direction_matrix,
    map_plane,
    sh_symmetry_matrix,
)
from .sampler import ddim_step, make_scheduler

#: Largest number of slices per batch chosen automatically (CPU, CUDA).
CPU_MAX_SLICES = 4
CUDA_MAX_SLICES = 64


def field_scheduler(config: FieldConfig):
    """MONAI DDIM scheduler with the model's noise schedule (no clipping: coefficients)."""
    return make_scheduler(config, clip_sample=False)


@torch.inference_mode()
def sample_coefficients(
    network: nn.Module,
    scheduler,
    condition: torch.Tensor,
    generators: list[torch.Generator],
    settings: SamplerSettings,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Draw K samples of the clean coefficients of each slice (truncated DDIM chain).

    Parameters
    ----------
    network : nn.Module
        `ShFieldNetwork` in eval mode, on ``condition.device``.
    scheduler : DDIMScheduler
        `field_scheduler`.
    condition : Tensor, shape (B, condition_channels, H, W)
        H, W multiples of ``config.spatial_multiple``.
    generators : list of torch.Generator
        One per slice: slice i's noise comes from ``generators[i]`` only.
    settings : SamplerSettings
        Steps, ``t_start`` (None: from pure noise at T - 1), temperature, K, eta.
    dtype : torch.dtype, optional
        Autocast dtype of the network (None: float32).

    Returns
    -------
    Tensor, shape (B, K, C, H, W), float32

    """
    config: FieldConfig = network.config
    b, _, h, w = condition.shape
    if len(generators) != b:
        raise ValueError(f"need one generator per slice ({b}), got {len(generators)}")
    k, c = settings.n_samples, config.n_coefficients
    device = condition.device
    last = config.num_train_timesteps - 1
    t_start = last if settings.t_start is None else int(settings.t_start)
    from .sampler import ddim_timesteps

    steps = ddim_timesteps(t_start, settings.n_steps)
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    condition = condition.float().repeat_interleave(k, dim=0)
    prior = condition[:, network.prior_channels]
    noise = settings.temperature * _draw(generators, (k, c, h, w), condition)
    if settings.t_start is None:
        x = noise
    else:
        start = torch.full((b * k,), int(steps[0]), device=device)
        x = scheduler.add_noise(prior, noise, start)
    for i, t in enumerate(steps):
        t_prev = int(steps[i + 1]) if i + 1 < len(steps) else -1
        timesteps = torch.full((b * k,), int(t), device=device, dtype=torch.long)
        with _autocast(device, dtype):
            out = network(x, condition, timesteps).float()
        step_noise = None
        if settings.eta > 0:
            step_noise = settings.temperature * _draw(generators, (k, c, h, w), x)
        x, _ = ddim_step(
            alphas, out, int(t), t_prev, x, eta=settings.eta, noise=step_noise,
            prediction_type="sample", clip_sample=False,
        )  # fmt: skip
    return x.reshape(b, k, c, h, w)


def symmetry_maps(config: FieldConfig, symmetries: int, device) -> list[tuple]:
    """Channel maps of the first `symmetries` entries of `plane_symmetry.SYMMETRIES`.

    Parameters
    ----------
    config : FieldConfig
        The model configuration.
    symmetries : int
        1, 2, 4 or 8.
    device : torch.device
        Where the maps are used.

    Returns
    -------
    list of (Tensor, Tensor)
        Per symmetry: the map of the condition's channels into the mapped copy, shape
        (condition_channels, condition_channels), and the map of the predicted coefficients
        back, shape (C, C); float32.

    """
    out = []
    for index in range(check_symmetry_count(symmetries)):
        back = np.linalg.inv(sh_symmetry_matrix(direction_matrix(index), config.sh_order))
        out.append(
            tuple(
                torch.as_tensor(m, dtype=torch.float32, device=device)
                for m in (condition_matrix(config, index), back)
            )
        )
    return out


def auto_slice_batch(config: FieldConfig, height: int, width: int, k: int, device) -> int:
    """Slices per batch from the free memory (a rough activation estimate; capped).

    Parameters
    ----------
    config : FieldConfig
        Architecture.
    height, width : int
        Padded slice size.
    k : int
        Samples per slice (each is one image in the network's batch).
    device : torch.device
        Where the network runs.

    Returns
    -------
    int

    """
    pixels = height * width
    floats = (config.in_channels + 2 * config.n_coefficients) * pixels
    floats += sum(6 * ch * pixels / 4**lvl for lvl, ch in enumerate(config.channels))
    per_slice = 2 * 4 * floats * k
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(1, min(CUDA_MAX_SLICES, 0.5 * free // per_slice)))
    return int(max(1, min(CPU_MAX_SLICES, 0.25 * available_memory_bytes() // per_slice)))


def synthesise_shell_field(
    network: nn.Module,
    signal: np.ndarray,
    b0: np.ndarray,
    mask: np.ndarray,
    bvecs_in: np.ndarray,
    bvecs_out: np.ndarray,
    bval: float,
    settings: SamplerSettings,
    *,
    n_b0: int = 1,
    noise_sigma: float | None = None,
    seed: int = 0,
    slice_axis: int = 2,
    margin: int = 4,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Synthesise every target direction of one shell with the SH-field model.

    Parameters
    ----------
    network : nn.Module
        `ShFieldNetwork`, eval mode, on its device.
    signal : ndarray, shape (X, Y, Z, N)
        Acquired volumes of the shell.
    b0 : ndarray, shape (X, Y, Z)
        Mean b=0 image.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask: the network runs on its bounding box; outside the mask the output is the
        prior (regularised SH fit) and the uncertainty 0.
    bvecs_in, bvecs_out : ndarray, shape (N, 3), (M, 3)
        Acquired and target directions in the model frame.
    bval : float
        The shell's b-value.
    settings : SamplerSettings
        Sampler settings.
    n_b0 : int
        b=0 volumes averaged into `b0` (a condition of the model).
    noise_sigma : float, optional
        Noise standard deviation of the scan, in signal units (`trust.estimate_noise`), for
        models with ``noise_input`` (required by them).
    seed : int
        Seed of the run.
    slice_axis : int
        Axis of the acquisition's slices.
    margin : int
        Voxels kept around the mask's bounding box.
    batch_size : int, optional
        Slices per batch (default from free memory).
    dtype : torch.dtype, optional
        Autocast dtype of the network (None: float32).
    progress : str, optional
        Progress-bar label (default ``"qid2 b=<b>"``).

    Returns
    -------
    mean : ndarray, shape (X, Y, Z, M), float32
        Predicted signal (>= 0), in the units of `signal`.
    std : ndarray, shape (X, Y, Z, M), float32
        Standard deviation over the K samples of every symmetry (0 outside the mask and
        for K = S = 1).
    batch_size : int
        Slices per batch at the end.

    """
    config: FieldConfig = network.config
    device = next(network.parameters()).device
    bvecs_out = np.asarray(bvecs_out, dtype=np.float64).reshape(-1, 3)
    sig = np.moveaxis(np.asarray(signal), slice_axis, 2)
    s0 = np.moveaxis(np.asarray(b0, dtype=np.float32), slice_axis, 2)
    inside = np.moveaxis(np.asarray(mask, dtype=bool), slice_axis, 2)
    n_targets = len(bvecs_out)
    mean = np.zeros(signal.shape[:3] + (n_targets,), dtype=np.float32)
    std = np.zeros_like(mean)
    mean_v, std_v = np.moveaxis(mean, slice_axis, 2), np.moveaxis(std, slice_axis, 2)
    evaluate = evaluation_matrix(bvecs_out, config).astype(np.float32)  # (M, C)
    s0_ref = reference_s0(s0, inside)
    features, prior = shell_features(
        sig, s0, inside, bvecs_in, config, s0_ref=s0_ref, bval=bval, n_b0=n_b0
    )
    for s in range(sig.shape[2]):  # the prior everywhere; the network overwrites the mask
        mean_v[:, :, s] = np.clip(prior[:, :, s] @ evaluate.T, 0, None) * s0[:, :, s, None]
    grid = SliceGrid.from_mask(inside, margin)
    if grid.slices.size == 0 or n_targets == 0:
        return mean, std, int(batch_size or 1)
    rows, cols = brain_windows(inside, (grid.rows, grid.cols))
    crop = mirrored_window(features, rows, cols)
    # the part of the window inside the image, in image and in window coordinates
    (r0, r1), (c0, c1) = (
        (max(rows[0], 0), min(rows[1], sig.shape[0])),
        (
            max(cols[0], 0),
            min(cols[1], sig.shape[1]),
        ),
    )
    inner = (slice(r0 - rows[0], r1 - rows[0]), slice(c0 - cols[0], c1 - cols[0]))
    noise_rel = None
    if config.noise_input:
        if noise_sigma is None:
            raise ValueError("this model needs the scan's noise level (noise_sigma)")
        noise_rel = float(noise_sigma) / s0_ref
    scalars = scalar_values(bval, len(bvecs_in), n_b0, noise_rel)
    shell_key = int(round(float(bval)))
    evaluate_t = torch.from_numpy(evaluate).to(device)
    maps = symmetry_maps(config, settings.symmetries, device)

    def process(slices: list[int]) -> None:
        cond = np.stack(
            [slice_condition(crop, s, config.context_slices, scalars, config) for s in slices]
        )
        cond = torch.from_numpy(cond).to(device)
        generators = [pair_generator(seed, shell_key, s) for s in slices]
        drawn = []  # (B, K, C, H, W) per symmetry, mapped back to the slice's own frame
        for index, (to_copy, back) in enumerate(maps):
            mapped = map_plane(torch.einsum("dc,bchw->bdhw", to_copy, cond), index)
            cond_t, pad = pad_to_multiple(mapped, config.spatial_multiple)
            out = sample_coefficients(network, scheduler, cond_t, generators, settings, dtype=dtype)
            out = map_plane(crop_pad(out, pad), index)  # each mirror is its own inverse
            drawn.append(torch.einsum("dc,bkchw->bkdhw", back, out))
        samples = torch.cat(drawn, dim=1)[..., inner[0], inner[1]]  # (B, K x S, C, h, w)
        ratio = torch.einsum("mc,bkchw->bkhwm", evaluate_t, samples).clamp(min=0)
        mu = ratio.mean(dim=1).cpu().numpy()
        sd = ratio.std(dim=1).cpu().numpy() if samples.shape[1] > 1 else np.zeros_like(mu)
        if config.log_mean_from_prior:
            coefficients = samples.mean(dim=1).float().permute(0, 2, 3, 1).cpu().numpy()
        for i, s in enumerate(slices):
            base, keep = s0[r0:r1, c0:c1, s], inside[r0:r1, c0:c1, s]
            if config.log_mean_from_prior:
                scale = log_mean_scale(coefficients[i][keep], prior[r0:r1, c0:c1, s][keep], config)
                mu[i][keep] *= scale[:, None].astype(np.float32)
                sd[i][keep] *= scale[:, None].astype(np.float32)
            mean_v[r0:r1, c0:c1, s][keep] = (mu[i] * base[..., None])[keep]
            std_v[r0:r1, c0:c1, s][keep] = (sd[i] * base[..., None])[keep]

    scheduler = field_scheduler(config)
    if batch_size is None:
        height, width = padded_shape(
            (rows[1] - rows[0], cols[1] - cols[0]), config.spatial_multiple
        )
        batch_size = auto_slice_batch(config, height, width, settings.n_samples, device)
    empty_cache = torch.cuda.empty_cache if device.type == "cuda" else None
    with cpu_channels_last(network, device):
        final = run_pairs(
            (int(s) for s in grid.slices),
            process,
            batch_size=batch_size,
            total=int(grid.slices.size),
            desc=progress or f"qid2 b={shell_key}",
            unit="slice",
            on_oom=empty_cache,
        )
    return mean, std, final
