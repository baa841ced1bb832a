"""Spherical-harmonics up-sampling engine (regularised least-squares fit of one shell).

The signal of one shell is fitted with a real, symmetric (even-order) spherical-harmonic
series in DIPY's ``descoteaux07`` basis, with Laplace–Beltrami regularisation
(Descoteaux et al., MRM 2007), and the fitted series is evaluated at the target directions.
Because the fit is linear in the data, one (M, N) matrix maps the N acquired volumes to the
M synthesised ones; it is computed once per shell and applied to every voxel. The basis and
fits live in `qid2_bidsapp.shm`, shared with the model, the simulator and the evaluation.
"""

from __future__ import annotations

import numpy as np

from ..shm import (  # noqa: F401 - re-exported: the engine's public helpers
    DEFAULT_CHUNK_VOXELS,
    MAX_AUTO_ORDER,
    MIN_AUTO_ORDER,
    ORDER_RULE,
    _unit_rows,
    apply_direction_matrix,
    n_sh_coefficients,
    sh_basis_matrix,
    sh_fit_matrix,
    sh_order_for,
    sh_prediction_matrix,
)


class SHUpsampler:
    """Regularised spherical-harmonics up-sampler (``--engine sh``).

    Parameters
    ----------
    order : int, optional
        Even maximal SH order. ``None`` chooses it per shell from the number of acquired
        directions with :func:`sh_order_for`.
    lambda_ : float, optional
        Laplace–Beltrami regularisation weight (default 0.006).
    chunk_voxels : int, optional
        Voxels processed at once when applying the fit.

    """

    name = "sh"

    def __init__(
        self,
        order: int | None = None,
        lambda_: float = 0.006,
        *,
        chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    ):
        if order is not None and (int(order) != order or order < 0 or order % 2):
            raise ValueError(f"SH order must be a non-negative even integer, got {order}")
        lambda_ = 0.006 if lambda_ is None else float(lambda_)
        if lambda_ < 0 or not np.isfinite(lambda_):
            raise ValueError(f"SH lambda must be a finite number >= 0, got {lambda_}")
        self.order = None if order is None else int(order)
        self.lambda_ = lambda_
        self.chunk_voxels = int(chunk_voxels)
        self._orders_used: dict[str, int] = {}

    def order_for(self, n_directions: int) -> int:
        """Return the SH order this engine uses for a shell of ``n_directions``.

        Parameters
        ----------
        n_directions : int
            Number of acquired directions of the shell.

        Returns
        -------
        int
            The fixed order if one was given, else :func:`sh_order_for`.

        """
        return self.order if self.order is not None else sh_order_for(n_directions)

    def prediction_matrix(self, bvecs_in: np.ndarray, bvecs_out: np.ndarray) -> np.ndarray:
        """Return the (M, N) matrix this engine applies for the given directions.

        Parameters
        ----------
        bvecs_in : ndarray, shape (N, 3)
            Acquired unit directions.
        bvecs_out : ndarray, shape (M, 3)
            Target unit directions.

        Returns
        -------
        ndarray, shape (M, N)

        """
        order = self.order_for(np.asarray(bvecs_in).shape[0])
        return sh_prediction_matrix(bvecs_in, bvecs_out, order, self.lambda_)

    def predict(
        self,
        signal: np.ndarray,
        b0: np.ndarray,
        bvecs_in: np.ndarray,
        bvecs_out: np.ndarray,
        bval: float,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Synthesise the signal at new directions of one shell (see ``Upsampler.predict``).

        ``b0`` and ``bval`` are not used: the fit is on the raw shell signal.

        Parameters
        ----------
        signal : ndarray, shape (X, Y, Z, N)
            Acquired diffusion-weighted volumes of this shell.
        b0 : ndarray, shape (X, Y, Z)
            Mean b=0 image (unused).
        bvecs_in : ndarray, shape (N, 3)
            Unit gradient directions of ``signal``.
        bvecs_out : ndarray, shape (M, 3)
            Unit gradient directions to synthesise.
        bval : float
            The shell's b-value (recorded for provenance only).
        mask : ndarray of bool, shape (X, Y, Z), optional
            Voxels to predict; others are 0. ``None`` predicts every voxel.

        Returns
        -------
        ndarray, shape (X, Y, Z, M), float32
            Non-negative predicted signal.

        """
        n_in = np.asarray(bvecs_in).shape[0]
        self._orders_used[f"{float(bval):g}"] = self.order_for(n_in)
        matrix = self.prediction_matrix(bvecs_in, bvecs_out)
        return apply_direction_matrix(signal, matrix, mask, chunk_voxels=self.chunk_voxels)

    def settings(self) -> dict:
        """Return the engine's settings as JSON-serialisable provenance.

        Returns
        -------
        dict
            ``order`` (the fixed order, or ``"auto"``), ``order_rule`` (how ``"auto"`` is
            resolved), ``orders_used`` (b-value -> order, for shells predicted so far),
            ``lambda`` and ``basis``.

        """
        return {
            "order": "auto" if self.order is None else self.order,
            "order_rule": ORDER_RULE if self.order is None else "fixed",
            "orders_used": dict(self._orders_used),
            "lambda": self.lambda_,
            "basis": "descoteaux07",
        }
