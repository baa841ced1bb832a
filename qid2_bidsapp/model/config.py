"""The diffusion model's hyper-parameters, serialisable to JSON (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .config_base import UNetConfig

#: Version of the configuration layout; bump when a field changes meaning.
CONFIG_VERSION = "1.0"

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
#: Sampler settings per device kind when a model's config.json names none.
DEFAULT_SAMPLER = {"cpu": {"n_steps": 3, "n_samples": 2}, "cuda": {"n_steps": 10, "n_samples": 4}}


@dataclass
class ModelConfig(UNetConfig):
    """Hyper-parameters of the QID² network, noise schedule and signal normalisation.

    Parameters
    ----------
    n_references : int
        R, the number of acquired directions (reference slices) given with each target.
    channels : tuple of int
        Feature channels per U-Net level; the image is down-sampled ``len(channels) - 1``
        times, so H and W must be multiples of `spatial_multiple`.
    num_res_blocks : int
        Residual blocks per level.
    attention_levels : tuple of bool
        Levels with (self- and cross-) attention. Only the lowest resolution by default:
        full-resolution attention is quadratic in the pixel count and explodes on CPU.
    num_head_channels : int
        Channels per attention head; must divide the channels of every attention level and of
        the last level (the middle block always attends).
    token_dim : int
        Width of the direction tokens (the cross-attention dimension).
    num_train_timesteps : int
        Length T of the training noise schedule.
    schedule : str
        MONAI noise schedule name, one of `config_base.SCHEDULES`.
    beta_start, beta_end : float
        Range of the beta schedules (MONAI defaults); ignored by ``"cosine"``.
    prediction_type : str
        What the network predicts, one of `PREDICTION_TYPES`.
    signal_clip : float
        The model works on S/S0 clipped to ``[0, signal_clip]``, mapped to ``[-1, 1]``.
    context_slices : int
        Reserved for 2.5D conditioning on neighbouring slices; must be 0 in this version.
    sampler_defaults : dict
        Sampler settings used when the user gives none, per device kind: ``{"cpu": {...},
        "cuda": {...}}`` with ``n_steps`` and ``n_samples`` (chosen by measurement for each
        released model; the CPU keeps fewer network evaluations so a clinical scan takes
        minutes).
    prior_residual : bool
        The network predicts the clean target as the SH prior plus a learned correction
        (requires ``prediction_type="sample"``). MONAI zero-initialises the U-Net's output
        convolution, so an untrained model returns the prior exactly and training can only
        move away from it where the data say so.
    prior_lambda : float
        Laplace–Beltrami weight λ of the SH prior (order from the direction count). Models
        written before this field existed used 0.006, the default.
    version : str
        Layout version of this configuration (`CONFIG_VERSION`).

    """

    n_references: int = 4
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_head_channels: int = 32
    token_dim: int = 64
    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    prediction_type: str = "epsilon"
    signal_clip: float = 1.5
    context_slices: int = 0
    prior_residual: bool = False
    prior_lambda: float = 0.006
    sampler_defaults: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLER))
    version: str = field(default=CONFIG_VERSION)

    _TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("channels", "attention_levels")

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        self.validate()

    # ------------------------------------------------------------------ derived values

    @property
    def condition_channels(self) -> int:
        """Channels of the condition tensor: R reference slices, then the SH prior."""
        return self.n_references + 1

    @property
    def in_channels(self) -> int:
        """U-Net input channels: the noisy target plus the condition."""
        return 1 + self.condition_channels

    @property
    def n_tokens(self) -> int:
        """Direction tokens per target: the target, then the R references."""
        return self.n_references + 1

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Check that the values are consistent.

        Raises
        ------
        ValueError
            Naming the first inconsistent field.

        """
        if self.n_references < 1:
            raise ValueError(f"n_references must be >= 1, got {self.n_references}")
        self._validate_unet_and_schedule()
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"attention_levels {self.attention_levels} must have one entry per level of "
                f"channels {self.channels}"
            )
        attending = [c for c, a in zip(self.channels, self.attention_levels, strict=True) if a]
        attending.append(self.channels[-1])  # the middle block always has attention
        if self.num_head_channels < 1 or any(c % self.num_head_channels for c in attending):
            raise ValueError(
                f"num_head_channels {self.num_head_channels} must divide the channels of every "
                f"attention level and of the last level ({sorted(set(attending))})"
            )
        if self.token_dim < 1:
            raise ValueError(f"token_dim must be >= 1, got {self.token_dim}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.prior_residual and self.prediction_type != "sample":
            raise ValueError(
                "prior_residual needs prediction_type 'sample' (the network output is the "
                f"prior plus a correction of the clean image), got {self.prediction_type!r}"
            )
        for kind in ("cpu", "cuda"):
            values = self.sampler_defaults.get(kind)
            if not isinstance(values, dict) or set(values) != {"n_steps", "n_samples"}:
                raise ValueError(
                    f"sampler_defaults must give n_steps and n_samples for {kind!r}, got {values!r}"
                )
            if any(int(v) != v or v < 1 for v in values.values()):
                raise ValueError(f"sampler_defaults[{kind!r}] must be positive integers")
        if self.context_slices != 0:
            raise ValueError(
                f"context_slices is reserved for 2.5D conditioning and must be 0 in this "
                f"version, got {self.context_slices}"
            )

    # ------------------------------------------------------------------ presets

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """Return a very small configuration for tests (8/16/16 channels).

        Parameters
        ----------
        **overrides
            Fields to change from the tiny preset.

        Returns
        -------
        ModelConfig

        """
        values: dict[str, Any] = {
            "channels": (8, 16, 16),
            "token_dim": 16,
            "num_head_channels": 8,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def small(cls, **overrides: Any) -> ModelConfig:
        """Return the shipped default architecture: small, prior-residual, CPU-friendly.

        16/32/32 channels (about 0.36 M parameters, ~7x cheaper per image than the
        32/64/64 `ModelConfig()` default) predicting the clean target as the SH prior plus a
        correction, so that a CPU run of a clinical scan stays within minutes.

        Parameters
        ----------
        **overrides
            Fields to change from the preset.

        Returns
        -------
        ModelConfig

        """
        values: dict[str, Any] = {
            "channels": (16, 32, 32),
            "token_dim": 32,
            "num_head_channels": 16,
            "prediction_type": "sample",
            "prior_residual": True,
        }
        values.update(overrides)
        return cls(**values)
