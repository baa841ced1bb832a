"""The SH-field network: one MONAI 2D diffusion U-Net pass per slice for every direction.

Input: the noisy model-space SH coefficients ``x_t`` of the slice (C channels) concatenated
with the condition (`field_features.slice_condition`: the features of the slice and its
neighbours, and constant maps); output: the clean coefficients, as the prior (the regularised
fit of the centre slice, part of the condition) plus a correction. MONAI zero-initialises the
output convolution, so an untrained network returns the prior exactly. With
``keep_prior_mean`` the correction of the order-0 coefficient is zero: the output keeps the
prior's mean signal.

The output is a set of SH coefficients: its signal is antipodally symmetric by construction,
and the inputs are fits of the acquired directions, so the result does not depend on the
order in which those directions are listed.

Self-attention runs only in the middle block (lowest resolution), fused
(`network.set_fused_attention`).

`tensor_fa` turns coefficients into FA differentiably (log-linear tensor fit on fixed
directions), for the training loss term that keeps anisotropy from shrinking.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from .field_config import FieldConfig
from .field_features import evaluation_matrix
from .network import crop_pad, pad_to_multiple, set_fused_attention

__all__ = ["ShFieldNetwork", "TensorFA", "crop_pad", "pad_to_multiple", "widen_input_weights"]

#: The U-Net's first convolution: the only weights that see the input channels.
INPUT_CONV_WEIGHT = "unet.conv_in.conv.weight"


class ShFieldNetwork(nn.Module):
    """Predict the clean SH coefficients of a slice from its noisy version and the condition.

    Parameters
    ----------
    config : FieldConfig
        Architecture and inputs.
    fused_attention : bool
        Use torch's fused attention in MONAI's attention blocks.

    """

    def __init__(self, config: FieldConfig, *, fused_attention: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        levels = len(config.channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=config.in_channels,
            out_channels=config.n_coefficients,
            channels=tuple(config.channels),
            attention_levels=(False,) * levels,
            num_res_blocks=config.num_res_blocks,
            num_head_channels=config.num_head_channels,
            norm_num_groups=config.norm_num_groups,
        )
        per_slice = config.features_per_slice
        start = config.context_slices * per_slice + config.prior_offset  # the centre slice's
        self.prior_channels = slice(start, start + config.n_coefficients)
        correction = torch.ones(1, config.n_coefficients, 1, 1)
        if config.keep_prior_mean:
            correction[:, 0] = 0.0  # the order-0 coefficient: the shell's mean signal
        self.register_buffer("correction_weights", correction, persistent=False)
        set_fused_attention(self, fused_attention)

    def forward(
        self, x_noisy: torch.Tensor, condition: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Predict the clean model-space coefficients.

        Parameters
        ----------
        x_noisy : Tensor, shape (B, C, H, W)
            Noisy coefficients ``x_t``.
        condition : Tensor, shape (B, condition_channels, H, W)
            `field_features.slice_condition`.
        timesteps : Tensor of int, shape (B,)
            Diffusion timesteps.

        Returns
        -------
        Tensor, shape (B, C, H, W)

        Raises
        ------
        ValueError
            For inconsistent shapes, or H, W not multiples of ``config.spatial_multiple``.

        """
        cfg = self.config
        b, _, h, w = x_noisy.shape
        if x_noisy.ndim != 4 or x_noisy.shape[1] != cfg.n_coefficients:
            raise ValueError(
                f"x_noisy must have shape (B, {cfg.n_coefficients}, H, W), got "
                f"{tuple(x_noisy.shape)}"
            )
        if tuple(condition.shape) != (b, cfg.condition_channels, h, w):
            raise ValueError(
                f"condition must have shape {(b, cfg.condition_channels, h, w)}, got "
                f"{tuple(condition.shape)}"
            )
        if tuple(timesteps.shape) != (b,):
            raise ValueError(f"timesteps must have shape ({b},), got {tuple(timesteps.shape)}")
        m = cfg.spatial_multiple
        if h % m or w % m:
            raise ValueError(f"H and W must be multiples of {m}, got {h}x{w}: use pad_to_multiple")
        out = self.unet(torch.cat([x_noisy, condition], dim=1), timesteps)
        if cfg.keep_prior_mean:
            out = out * self.correction_weights.to(out.dtype)
        return condition[:, self.prior_channels].to(out.dtype) + out


def widen_input_weights(
    tensors: dict, network: ShFieldNetwork, old_context: int | None = None
) -> dict:
    """Fit weights of a network with fewer input channels to `network`.

    The first convolution reads the noisy coefficients, then one block of features per
    context slice (``z - c .. z + c``), then the constant maps. A model that gains maps
    (``summary_input``, appended last) or context slices (``context_slices``, new blocks at
    both ends) keeps every other weight; the new input channels start at 0, so the widened
    network computes what the old one did until it is trained (the `window_summary` maps of a
    wider context are taken over more slices, so they change a little).

    Parameters
    ----------
    tensors : dict of str to Tensor
        State dict of the narrower network.
    network : ShFieldNetwork
        The network to load them into.
    old_context : int, optional
        ``context_slices`` of the narrower network (default: the same as `network`'s).

    Returns
    -------
    dict of str to Tensor
        `tensors` with the first convolution's weight zero-padded (a new dict).

    Raises
    ------
    ValueError
        When any other tensor differs in shape, or the new weight is narrower.

    """
    config = network.config
    context = config.context_slices if old_context is None else int(old_context)
    target = network.state_dict()
    out = dict(tensors)
    old = tensors[INPUT_CONV_WEIGHT]
    new_shape = tuple(target[INPUT_CONV_WEIGHT].shape)
    n_coef, per_slice = config.n_coefficients, config.features_per_slice
    shift = config.context_slices - context
    old_scalars = old.shape[1] - n_coef - (2 * context + 1) * per_slice
    same_rest = old.shape[0] == new_shape[0] and tuple(old.shape[2:]) == new_shape[2:]
    if not same_rest or shift < 0 or not 0 <= old_scalars <= config.n_scalars:
        raise ValueError(f"cannot widen input weights {tuple(old.shape)} to {new_shape}")
    padded = torch.zeros(new_shape, dtype=old.dtype)
    padded[:, :n_coef] = old[:, :n_coef]
    old_slices = slice(n_coef, n_coef + (2 * context + 1) * per_slice)
    start = n_coef + shift * per_slice  # the old blocks, centred among the new ones
    padded[:, start : start + old_slices.stop - n_coef] = old[:, old_slices]
    scalars = n_coef + (2 * config.context_slices + 1) * per_slice
    padded[:, scalars : scalars + old_scalars] = old[:, old_slices.stop :]
    out[INPUT_CONV_WEIGHT] = padded
    for name, value in out.items():
        if name in target and tuple(value.shape) != tuple(target[name].shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(target[name].shape)}")
    return out


#: Directions the FA of a coefficient field is computed on (a fixed, well-spread set).
FA_DIRECTIONS = 60


class TensorFA(nn.Module):
    """Differentiable FA of model-space SH coefficients (log-linear tensor fit).

    The signal ``S/S0`` is evaluated on `FA_DIRECTIONS` fixed directions, clamped to
    ``[1e-3, 1]``, turned into apparent diffusion coefficients ``-log(S/S0)/b`` and fitted with
    a tensor by least squares; FA comes from the tensor's invariants
    (``sqrt(3/2) |D - tr(D)/3 I| / |D|``), with no eigen-decomposition.

    Parameters
    ----------
    config : FieldConfig
        The model configuration (order and scales of the coefficients).

    """

    def __init__(self, config: FieldConfig):
        super().__init__()
        from ..sim.protocol import uniform_shell

        g = uniform_shell(FA_DIRECTIONS, seed=0)
        design = np.column_stack(
            [g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1],
             2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]]
        )  # fmt: skip
        self.register_buffer(
            "evaluate", torch.as_tensor(evaluation_matrix(g, config), dtype=torch.float32)
        )
        self.register_buffer("fit", torch.as_tensor(np.linalg.pinv(design), dtype=torch.float32))

    def forward(self, coefficients: torch.Tensor, bval: torch.Tensor) -> torch.Tensor:
        """FA of every pixel.

        Parameters
        ----------
        coefficients : Tensor, shape (B, C, H, W)
            Model-space coefficients.
        bval : Tensor, shape (B,)
            b-value of each item (s/mm^2).

        Returns
        -------
        Tensor, shape (B, H, W)

        """
        signal = torch.einsum("mc,bchw->bmhw", self.evaluate, coefficients.float())
        adc = -torch.log(signal.clamp(1e-3, 1.0)) / (bval.float()[:, None, None, None] / 1000.0)
        d = torch.einsum("km,bmhw->bkhw", self.fit, adc)
        trace = (d[:, 0] + d[:, 1] + d[:, 2]) / 3.0
        dev = (d[:, 0] - trace) ** 2 + (d[:, 1] - trace) ** 2 + (d[:, 2] - trace) ** 2
        off = 2.0 * (d[:, 3] ** 2 + d[:, 4] ** 2 + d[:, 5] ** 2)
        norm = d[:, 0] ** 2 + d[:, 1] ** 2 + d[:, 2] ** 2 + off
        return torch.sqrt(1.5 * (dev + off) / norm.clamp(min=1e-8) + 1e-8).clamp(0.0, 1.0)
