"""What the two model configurations share: JSON round trips, U-Net shape, schedule checks.

`ModelConfig` (the per-target QID² model) and `FieldConfig` (the SH-field model) are
dataclasses that both drive a MONAI ``DiffusionModelUNet`` and a linear-beta style noise
schedule; this module holds the parts that are the same for both (no torch needed).
"""

from __future__ import annotations

import dataclasses
import json
import math
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar

SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
_MAX_NORM_GROUPS = 32


class UNetConfig:
    """Mixin for a dataclass with ``channels``, ``num_res_blocks`` and a noise schedule.

    Subclasses name their tuple-valued fields in ``_TUPLE_FIELDS`` (written as JSON lists).
    """

    _TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ derived values

    @property
    def spatial_multiple(self) -> int:
        """H and W must be multiples of this: ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    @property
    def norm_num_groups(self) -> int:
        """Group-norm groups: the largest divisor of gcd(channels) that is at most 32."""
        common = math.gcd(*self.channels)
        return max(g for g in range(1, min(common, _MAX_NORM_GROUPS) + 1) if common % g == 0)

    # ------------------------------------------------------------------ checks

    def _validate_unet_and_schedule(self) -> None:
        """Check the U-Net levels, the noise schedule, ``signal_clip`` and ``prior_lambda``.

        Raises
        ------
        ValueError
            Naming the first inconsistent field.

        """
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive integers, got {self.channels}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if not self.signal_clip > 0:
            raise ValueError(f"signal_clip must be > 0, got {self.signal_clip}")
        if not self.prior_lambda >= 0:
            raise ValueError(f"prior_lambda must be >= 0, got {self.prior_lambda}")

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a JSON-serialisable dict (tuples become lists).

        Returns
        -------
        dict

        """
        values = dataclasses.asdict(self)
        for name in self._TUPLE_FIELDS:
            values[name] = list(values[name])
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build a configuration from `to_dict` output.

        Parameters
        ----------
        values : dict
            Field values; missing fields take their defaults.

        Returns
        -------
        UNetConfig
            An instance of the class it is called on.

        Raises
        ------
        ValueError
            For unknown fields (a typo or a configuration from another version) and for
            inconsistent values.

        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model configuration field(s): {', '.join(unknown)}")
        values = dict(values)
        for name in cls._TUPLE_FIELDS:
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def to_json(self, path: str | PathLike) -> Path:
        """Write the configuration as JSON.

        Parameters
        ----------
        path : str or PathLike
            Destination file (overwritten).

        Returns
        -------
        Path
            The written file.

        """
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | PathLike):
        """Read a configuration written by `to_json`.

        Parameters
        ----------
        path : str or PathLike
            The JSON file.

        Returns
        -------
        UNetConfig
            An instance of the class it is called on.

        """
        return cls.from_dict(json.loads(Path(path).read_text()))
