"""The protocol every up-sampling engine implements, and the engine registry."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import EngineUnavailableError


@runtime_checkable
class Upsampler(Protocol):
    """Predict diffusion-weighted volumes for new gradient directions of one shell.

    Implementations keep the science on plain arrays: no file I/O, no Nipype.
    """

    name: str

    def predict(
        self,
        signal: np.ndarray,
        b0: np.ndarray,
        bvecs_in: np.ndarray,
        bvecs_out: np.ndarray,
        bval: float,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Synthesise the signal at new directions of one shell.

        Parameters
        ----------
        signal : ndarray, shape (X, Y, Z, N)
            Acquired diffusion-weighted volumes of this shell (no b=0 volumes).
        b0 : ndarray, shape (X, Y, Z)
            Mean b=0 image, for engines that normalise by S0.
        bvecs_in : ndarray, shape (N, 3)
            Unit gradient directions of ``signal`` (FSL image-axis convention).
        bvecs_out : ndarray, shape (M, 3)
            Unit gradient directions to synthesise.
        bval : float
            The shell's b-value in s/mm^2.
        mask : ndarray of bool, shape (X, Y, Z), optional
            Voxels to predict; voxels outside are set to 0. ``None`` predicts every voxel.

        Returns
        -------
        ndarray, shape (X, Y, Z, M), float32
            Non-negative predicted signal, in the units of ``signal``.

        """
        ...

    def settings(self) -> dict:
        """Return the engine's settings as JSON-serialisable provenance."""
        ...


ENGINE_NAMES = ("qid2", "sh", "interp")


def get_engine(name: str, **options) -> Upsampler:
    """Build an engine by name.

    Parameters
    ----------
    name : {"qid2", "sh", "interp"}
        Engine name as given on the command line.
    **options
        Engine-specific settings (e.g. ``sh_order``, ``sh_lambda``, ``n_neighbours``).

    Returns
    -------
    Upsampler

    Raises
    ------
    EngineUnavailableError
        For ``qid2`` until the diffusion engine ships, and for unknown names.

    """
    if name == "sh":
        from .sh import SHUpsampler

        return SHUpsampler(order=options.get("sh_order"), lambda_=options.get("sh_lambda", 0.006))
    if name == "interp":
        from .interp import InterpUpsampler

        return InterpUpsampler(n_neighbours=options.get("n_neighbours", 3))
    if name == "qid2":
        raise EngineUnavailableError(
            "engine 'qid2' (the diffusion up-sampler) is not available in this version of qid2 "
            "yet: no pretrained model ships with it; use --engine sh (spherical harmonics) or "
            "--engine interp"
        )
    raise EngineUnavailableError(
        f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}"
    )
