"""Hyper-parameters of the SH-field diffusion model, serialisable to JSON (no torch needed).

The *SH-field* model (``kind = "sh-field"``) predicts, in one network pass per slice, the
spherical-harmonic coefficients of the whole angular signal ``S/S0`` of that slice; any target
direction is then evaluated from them, so its cost does not grow with the number of targets.
See `qid2_bidsapp.model.field_features` for the inputs and `field_network` for the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .config_base import UNetConfig

#: The model kind written in config.json (the per-target QID² model has no ``kind`` field).
FIELD_KIND = "sh-field"
FIELD_CONFIG_VERSION = "1.0"
#: Sampler defaults per device kind: DDIM steps, samples K, the truncated start and the
#: symmetries of the slice plane averaged (`plane_symmetry`). On the CPU one step of one sample
#: on four mirrored copies costs what two steps of two samples did and is more accurate
#: (docs/results.md, 2026-12-06 night); the GPU setting costs the same 16 passes as before.
DEFAULT_FIELD_SAMPLER = {
    "cpu": {"n_steps": 1, "n_samples": 1, "t_start": 100, "symmetries": 4},
    "cuda": {"n_steps": 2, "n_samples": 2, "t_start": 100, "symmetries": 4},
}
#: Precisions a model's sampler defaults may name.
MODEL_PRECISIONS = ("float32", "bfloat16")
#: ``precision`` values of the engine and the CLIs: ``auto`` (the model's setting for the
#: device), ``float32`` (no autocast) or ``bfloat16`` (bfloat16 autocast on any device).
PRECISIONS = ("auto", *MODEL_PRECISIONS)
#: Allowed numbers of mirror symmetries averaged at inference (prefixes of
#: `plane_symmetry.SYMMETRIES` that are groups).
SYMMETRY_COUNTS = (1, 2, 4, 8)


def check_symmetry_count(n: int) -> int:
    """Return `n` as an int if it is one of `SYMMETRY_COUNTS`.

    Parameters
    ----------
    n : int
        Number of symmetries.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        For any other value.

    """
    if int(n) != n or int(n) not in SYMMETRY_COUNTS:
        raise ValueError(f"symmetries must be one of {SYMMETRY_COUNTS}, got {n}")
    return int(n)


#: Features per slice: order-2 least-squares fit (6), regularised fit (28 at order 6),
#: relative S0, mask; `FieldConfig.features_per_slice` computes it for other orders.
_EXTRA_PER_SLICE = 2
#: Scalar maps of the condition: b/1000, sqrt(6/N), 1/sqrt(number of b=0 volumes), and with
#: ``noise_input`` 10 x (noise sigma / S0_ref).
N_SCALAR_CHANNELS = 3
#: Constant maps of ``summary_input`` models: quantiles of the window's anisotropy
#: (`field_features.window_summary`).
N_SUMMARY_CHANNELS = 4
#: Priors: a regularised SH fit (``sh``) or the SH projection of a tensor fit (``dti``).
PRIORS = ("sh", "dti")


@dataclass
class FieldConfig(UNetConfig):
    """Architecture, inputs, normalisation and noise schedule of an SH-field model.

    Parameters
    ----------
    sh_order : int
        Even SH order of the predicted signal (28 coefficients at 6).
    context_slices : int
        Neighbouring slices on each side given with every slice (2.5D; 1 gives 3 slices).
    channels : tuple of int
        Feature channels per U-Net level (MONAI ``DiffusionModelUNet``; attention only in
        its middle block, at the lowest resolution).
    num_res_blocks : int
        Residual blocks per level.
    num_head_channels : int
        Channels per attention head of the middle block (must divide ``channels[-1]``).
    prior_lambda : float
        Laplace–Beltrami λ of the regularised SH fit that is both an input and the prior the
        network corrects (and the output outside the brain mask).
    order_scales : tuple of float
        Model space: coefficients of order ``l`` are multiplied by ``order_scales[l // 2]``
        (about 1 / their spread in brains, so every order has a similar range).
    signal_clip : float
        ``S/S0`` is clipped to ``[0, signal_clip]`` before fitting.
    num_train_timesteps, schedule, beta_start, beta_end : int, str, float, float
        Noise schedule (MONAI); the network predicts the clean coefficients (``sample``).
    max_timestep : int
        Training draws timesteps in ``0..max_timestep`` (the truncated sampler starts below).
    prior : {"sh", "dti"}
        What the network corrects (and the output outside the brain mask): ``sh``, the
        regularised SH fit; ``dti``, the order-`sh_order` SH projection of the signal of a
        tensor fitted (WLS) to the acquired shell and the b=0 image: an untrained ``dti`` model
        reproduces DTI on the acquired directions.
    noise_input : bool
        Give the network the scan's noise level (sigma / S0_ref, `trust.estimate_noise`).
    summary_input : bool
        Give the network a summary of its whole input window: quantiles of the prior's
        anisotropy over the brain voxels of the slice and its context slices
        (`field_features.window_summary`), so that it can tell a brain's anisotropy level
        from the population's rather than pulling every brain towards the training mean.
    keep_prior_mean : bool
        Keep the prior's order-0 coefficient (the shell's mean signal, which the acquired
        directions measure to within their noise averaged over all of them): the network then
        changes only the angular shape (orders >= 2), and the merged data keep the mean
        diffusivity of DTI on the acquired directions. Applied in the network's forward pass,
        so training and inference agree.
    log_mean_from_prior : bool
        At inference, rescale each voxel's predicted signal so that its mean log signal over
        the sphere equals the prior's (`field_features.log_mean_scale`): the network's angular
        shape is kept, in the log domain where a tensor fit reads it, while the mean
        diffusivity of the synthesised volumes becomes that of the prior (for the ``dti``
        prior, DTI on the acquired directions). No training needed; default off, so older
        models run as they were measured.
    sampler_defaults : dict
        ``{"cpu": {...}, "cuda": {...}}`` with ``n_steps``, ``n_samples``, ``t_start`` and,
        optionally, ``symmetries`` (default 1); ``"cpu"`` may also give ``precision``
        (``float32``, the default, or ``bfloat16``: the precision the model was validated with
        on the CPU, which ``--precision auto`` uses where the CPU runs bfloat16 natively; on
        CUDA ``auto`` always means bfloat16, or float16 where bfloat16 is missing).
    version : str
        Layout version.

    """

    sh_order: int = 6
    context_slices: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    prior_lambda: float = 0.006
    order_scales: tuple[float, ...] = (1.0, 10.0, 40.0, 100.0)
    signal_clip: float = 1.5
    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    max_timestep: int = 250
    prior: str = "sh"
    noise_input: bool = False
    summary_input: bool = False
    keep_prior_mean: bool = False
    log_mean_from_prior: bool = False
    sampler_defaults: dict = field(
        default_factory=lambda: json.loads(json.dumps(DEFAULT_FIELD_SAMPLER))
    )
    kind: str = FIELD_KIND
    version: str = FIELD_CONFIG_VERSION

    #: What the network predicts (fixed: the clean coefficients, as a correction of the prior).
    prediction_type = "sample"
    _TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("channels", "order_scales")

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.order_scales = tuple(float(s) for s in self.order_scales)
        self.validate()

    # ------------------------------------------------------------------ derived values

    @property
    def n_coefficients(self) -> int:
        """Coefficients of the predicted series: ``(L + 1)(L + 2) / 2``."""
        return (self.sh_order + 1) * (self.sh_order + 2) // 2

    @property
    def features_per_slice(self) -> int:
        """Condition channels per slice: the prior-side fit, regularised fit, S0, mask.

        ``sh`` prior: order-2 least-squares fit (6) then the regularised fit (the prior);
        ``dti`` prior: the tensor fit's SH projection (the prior) then the regularised fit.
        """
        first = 6 if self.prior == "sh" else self.n_coefficients
        return first + self.n_coefficients + _EXTRA_PER_SLICE

    @property
    def prior_offset(self) -> int:
        """Position of the prior's coefficients among a slice's features."""
        return 6 if self.prior == "sh" else 0

    @property
    def n_scalars(self) -> int:
        """Constant maps of the condition: `N_SCALAR_CHANNELS`, the noise, the summary."""
        summary = N_SUMMARY_CHANNELS if self.summary_input else 0
        return N_SCALAR_CHANNELS + int(self.noise_input) + summary

    @property
    def condition_channels(self) -> int:
        """Channels of the condition: every slice's features, then the scalar maps."""
        return (2 * self.context_slices + 1) * self.features_per_slice + self.n_scalars

    @property
    def in_channels(self) -> int:
        """U-Net input channels: the noisy coefficients plus the condition."""
        return self.n_coefficients + self.condition_channels

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Check that the values are consistent.

        Raises
        ------
        ValueError
            Naming the first inconsistent field.

        """
        if self.kind != FIELD_KIND:
            raise ValueError(f"kind must be {FIELD_KIND!r}, got {self.kind!r}")
        if self.sh_order < 2 or self.sh_order % 2:
            raise ValueError(f"sh_order must be an even integer >= 2, got {self.sh_order}")
        if len(self.order_scales) != self.sh_order // 2 + 1 or min(self.order_scales) <= 0:
            raise ValueError(
                f"order_scales needs one positive scale per even order 0..{self.sh_order}, "
                f"got {self.order_scales}"
            )
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.context_slices < 0:
            raise ValueError(f"context_slices must be >= 0, got {self.context_slices}")
        self._validate_unet_and_schedule()
        if self.num_head_channels < 1 or self.channels[-1] % self.num_head_channels:
            raise ValueError(
                f"num_head_channels {self.num_head_channels} must divide the last level's "
                f"channels {self.channels[-1]}"
            )
        if not 0 <= self.max_timestep < self.num_train_timesteps:
            raise ValueError(
                f"max_timestep must be in 0..{self.num_train_timesteps - 1}, "
                f"got {self.max_timestep}"
            )
        for kind in ("cpu", "cuda"):
            values = self.sampler_defaults.get(kind)
            required = {"n_steps", "n_samples", "t_start"}
            optional = {"symmetries", "precision"} if kind == "cpu" else {"symmetries"}
            if not isinstance(values, dict) or not required <= set(values) <= required | optional:
                raise ValueError(
                    f"sampler_defaults must give n_steps, n_samples and t_start (and may give "
                    f"{' and '.join(sorted(optional))}) for {kind!r}, got {values!r}"
                )
            precision = values.get("precision", "float32")
            if precision not in MODEL_PRECISIONS:
                raise ValueError(
                    f"sampler_defaults[{kind!r}]['precision'] must be one of "
                    f"{', '.join(MODEL_PRECISIONS)}, got {precision!r}"
                )
            counts = [v for k, v in values.items() if k != "precision"]
            if (
                any(isinstance(v, bool) or int(v) != v or v < 0 for v in counts)
                or min(values["n_steps"], values["n_samples"]) < 1
            ):
                raise ValueError(f"sampler_defaults[{kind!r}] must be positive integers")
            check_symmetry_count(values.get("symmetries", 1))

    # ------------------------------------------------------------------ presets

    @classmethod
    def tiny(cls, **overrides: Any) -> FieldConfig:
        """Return a very small configuration for tests (8/16/16 channels).

        Parameters
        ----------
        **overrides
            Fields to change.

        Returns
        -------
        FieldConfig

        """
        values: dict[str, Any] = {"channels": (8, 16, 16), "num_head_channels": 8}
        values.update(overrides)
        return cls(**values)
