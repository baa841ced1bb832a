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
        Engine-specific settings (e.g. ``sh_order``, ``sh_lambda``, ``n_neighbours``; for
        ``qid2`` ``model_dir`` and the sampler settings of
        :func:`~qid2_bidsapp.engines.qid2.build_qid2_engine`). Each engine ignores the
        others' settings.

    Returns
    -------
    Upsampler

    Raises
    ------
    EngineUnavailableError
        For ``qid2`` without a model (or without torch), and for unknown names.
    InputError
        For ``qid2`` with a corrupted model folder.

    """
    if name == "sh":
        from .sh import SHUpsampler

        return SHUpsampler(order=options.get("sh_order"), lambda_=options.get("sh_lambda", 0.006))
    if name == "interp":
        from .interp import InterpUpsampler

        return InterpUpsampler(n_neighbours=options.get("n_neighbours", 3))
    if name == "qid2":
        from .qid2 import build_qid2_engine

        return build_qid2_engine(**options)
    raise EngineUnavailableError(
        f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}"
    )


class UncertaintyRecorder:
    """Wrap an engine so that ``predict`` also keeps the engine's uncertainty maps.

    For engines with ``predict_with_uncertainty`` (``qid2``), every ``predict`` call stores the
    standard deviation it returned, in call order; other engines record nothing. Lets code
    written for `Upsampler.predict` (``upsampling.upsample_shells``) collect the uncertainty.

    Parameters
    ----------
    engine : Upsampler
        The engine to wrap.

    Attributes
    ----------
    maps : list of ndarray
        One (X, Y, Z, M) array per ``predict`` call.

    """

    def __init__(self, engine: Upsampler):
        self.engine = engine
        self.name = engine.name
        self.maps: list[np.ndarray] = []

    @property
    def provides_uncertainty(self) -> bool:
        """Whether the wrapped engine has ``predict_with_uncertainty``."""
        return callable(getattr(self.engine, "predict_with_uncertainty", None))

    def predict(self, signal, b0, bvecs_in, bvecs_out, bval, mask=None) -> np.ndarray:
        """Call the engine (see `Upsampler.predict`), keeping its uncertainty if it has one."""
        if not self.provides_uncertainty:
            return self.engine.predict(signal, b0, bvecs_in, bvecs_out, bval, mask)
        mean, std = self.engine.predict_with_uncertainty(
            signal, b0, bvecs_in, bvecs_out, bval, mask
        )
        self.maps.append(np.asarray(std, dtype=np.float32))
        return mean

    @property
    def needs_noise(self) -> bool:
        """Whether the wrapped engine wants the scan's noise level."""
        return bool(getattr(self.engine, "needs_noise", False))

    def set_acquisition(self, **facts) -> None:
        """Pass acquisition facts (``n_b0``, ``noise_sigma``) to the wrapped engine."""
        configure = getattr(self.engine, "set_acquisition", None)
        if callable(configure):
            configure(**facts)

    def settings(self) -> dict:
        """Return the wrapped engine's settings."""
        return self.engine.settings()

    def uncertainty(self, spatial_shape: tuple[int, ...]) -> np.ndarray:
        """All recorded maps along the last axis (the order of the synthesised volumes).

        Parameters
        ----------
        spatial_shape : tuple of int
            (X, Y, Z), for the empty result when nothing was recorded.

        Returns
        -------
        ndarray, shape (X, Y, Z, M), float32

        """
        if not self.maps:
            return np.zeros((*spatial_shape, 0), dtype=np.float32)
        return np.concatenate(self.maps, axis=-1)
