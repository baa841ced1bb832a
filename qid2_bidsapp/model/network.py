"""The QID² denoising network: a MONAI 2D diffusion U-Net with direction-token cross-attention.

The noisy target slice is concatenated channel-wise with the R reference slices and the SH prior
slice; the target and reference gradient directions enter as a sequence of R + 1 tokens through
the cross-attention of the attention levels (and of the middle block). With several keys the
attention weights depend on the image features; the paper's code fed all directions as ONE
token, for which the softmax over a single key is constant. Attention treats the tokens as a
set (the output does not depend on their order); which token belongs to which reference slice
is carried by the ``|g·target|`` feature, since the references are sorted nearest first.

Spatial size: the U-Net down-samples ``len(channels) - 1`` times, so H and W must be multiples
of ``ModelConfig.spatial_multiple`` (``2 ** (levels - 1)``); use `pad_to_multiple` and
`crop_pad` around the network.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (MONAI's
``use_flash_attention``; `set_fused_attention`): the same result as MONAI's default
einsum-softmax-einsum up to float round-off, without materialising the ``(H·W/16)²`` score
matrix of the lowest level, whose softmax and products took about 60 % of the CPU time of a
145x174 slice (1,287 positions; ~1.7x faster per pair there with fused attention on a 2-core
CPU, ~1.06x at 72x72; ``benchmarks/profile_qid2_cpu.py``). It holds no parameters, so the
weights are the same either way.

Note that MONAI zero-initialises the output convolution (and the residual/attention output
projections), so an untrained network predicts exactly 0 — or exactly the SH prior with
``ModelConfig.prior_residual``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from .conditioning import TOKEN_FEATURES
from .config import ModelConfig


class Qid2Network(nn.Module):
    """Noise-prediction network of QID².

    Parameters
    ----------
    config : ModelConfig
        Architecture; ``config.n_references`` fixes the condition channels and token count.
    fused_attention : bool
        Compute attention with torch's fused ``scaled_dot_product_attention`` (default) rather
        than MONAI's einsum-softmax-einsum; see `set_fused_attention`.

    """

    def __init__(self, config: ModelConfig, *, fused_attention: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        self.token_embed = nn.Linear(TOKEN_FEATURES, config.token_dim)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=config.in_channels,
            out_channels=1,
            channels=tuple(config.channels),
            attention_levels=tuple(config.attention_levels),
            num_res_blocks=config.num_res_blocks,
            num_head_channels=config.num_head_channels,
            with_conditioning=True,
            cross_attention_dim=config.token_dim,
            norm_num_groups=config.norm_num_groups,
        )
        set_fused_attention(self, fused_attention)

    def forward(
        self,
        x_noisy: torch.Tensor,
        condition: torch.Tensor,
        timesteps: torch.Tensor,
        tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the noise (or `prediction_type` target) of the noisy target slice.

        Parameters
        ----------
        x_noisy : Tensor, shape (B, 1, H, W)
            Noisy target slice in model space.
        condition : Tensor, shape (B, R + 1, H, W)
            The R reference slices (nearest first), then the SH prior slice, in model space.
        timesteps : Tensor of int, shape (B,)
            Diffusion timesteps in ``[0, num_train_timesteps)``.
        tokens : Tensor, shape (B, R + 1, TOKEN_FEATURES)
            Direction tokens (`conditioning.direction_tokens`): target first.

        Returns
        -------
        Tensor, shape (B, 1, H, W)

        Raises
        ------
        ValueError
            For inconsistent shapes, or H, W not multiples of ``config.spatial_multiple``.

        """
        self._check_shapes(x_noisy, condition, timesteps, tokens)
        context = self.token_embed(tokens.to(x_noisy.dtype))
        out = self.unet(torch.cat([x_noisy, condition], dim=1), timesteps, context=context)
        if self.config.prior_residual:
            out = condition[:, -1:].to(out.dtype) + out
        return out

    def _check_shapes(
        self,
        x: torch.Tensor,
        condition: torch.Tensor,
        timesteps: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"x_noisy must have shape (B, 1, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        if tuple(condition.shape) != (b, cfg.condition_channels, h, w):
            raise ValueError(
                f"condition must have shape (B, R + 1, H, W) = {(b, cfg.condition_channels, h, w)}"
                f", got {tuple(condition.shape)}"
            )
        if tuple(tokens.shape) != (b, cfg.n_tokens, TOKEN_FEATURES):
            raise ValueError(
                f"tokens must have shape (B, R + 1, {TOKEN_FEATURES}) = "
                f"{(b, cfg.n_tokens, TOKEN_FEATURES)}, got {tuple(tokens.shape)}"
            )
        if tuple(timesteps.shape) != (b,):
            raise ValueError(f"timesteps must have shape ({b},), got {tuple(timesteps.shape)}")
        m = cfg.spatial_multiple
        if h % m or w % m:
            raise ValueError(
                f"H and W must be multiples of {m} (2 ** (levels - 1)), got {h}x{w}: "
                "use pad_to_multiple"
            )


def set_fused_attention(network: nn.Module, enabled: bool = True) -> int:
    """Switch the MONAI attention blocks of a network to (or from) fused attention.

    With `enabled`, MONAI's ``SABlock`` and ``CrossAttentionBlock`` call
    ``torch.nn.functional.scaled_dot_product_attention`` (their ``use_flash_attention`` path)
    instead of an explicit ``einsum``, ``softmax``, ``einsum``: the same attention with the same
    scale, equal up to float round-off, but without the full score matrix in memory, and on
    the CPU several times faster for long sequences (the lowest U-Net level of a 145x174 slice
    has 1,287 positions). Blocks with attention dropout, saved attention maps, causal masks or
    relative position embeddings are left as they are (the fused path would treat them
    differently).

    Parameters
    ----------
    network : nn.Module
        Any module; its attention blocks are switched in place (no parameters change).
    enabled : bool
        True for fused attention, False for MONAI's explicit computation.

    Returns
    -------
    int
        Number of attention blocks switched.

    """
    from monai.networks.blocks.crossattention import CrossAttentionBlock
    from monai.networks.blocks.selfattention import SABlock

    switched = 0
    for module in network.modules():
        if not isinstance(module, (SABlock, CrossAttentionBlock)):
            continue
        if enabled and (
            module.dropout_rate > 0
            or module.save_attn
            or module.causal
            or module.rel_positional_embedding is not None
        ):
            continue
        module.use_flash_attention = bool(enabled)
        switched += 1
    return switched


def pad_to_multiple(
    x: torch.Tensor, multiple: int, mode: str = "replicate"
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad the last two axes at their end up to multiples of `multiple`.

    Parameters
    ----------
    x : Tensor, shape (B, C, H, W)
        Images.
    multiple : int
        Required divisor of H and W (``ModelConfig.spatial_multiple``).
    mode : str
        ``torch.nn.functional.pad`` mode; ``"replicate"`` (default) continues the edge,
        ``"constant"`` pads with 0.

    Returns
    -------
    padded : Tensor, shape (B, C, H', W')
    pad : tuple of int
        ``(left, right, top, bottom)`` in ``F.pad`` order, for `crop_pad`.

    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = x.shape[-2:]
    pad = (0, (-w) % multiple, 0, (-h) % multiple)
    if not any(pad):
        return x, pad
    return F.pad(x, pad, mode=mode), pad


def crop_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo `pad_to_multiple`.

    Parameters
    ----------
    x : Tensor, shape (..., H', W')
        Padded images (or anything computed from them with the same spatial size).
    pad : tuple of int
        ``(left, right, top, bottom)`` as returned by `pad_to_multiple`.

    Returns
    -------
    Tensor, shape (..., H, W)

    """
    left, right, top, bottom = pad
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right]
