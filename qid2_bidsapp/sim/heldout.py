"""Held-out evaluation brains: a full acquisition, its short uniform subset, and the truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .brain import SimulatedBrain, simulate_brain
from .protocol import acquisition, uniform_subset
from .signal import TissueParams


@dataclass
class EvaluationBrain:
    """A simulated brain with a full acquisition and the short acquisition inside it.

    Attributes
    ----------
    brain : SimulatedBrain
        The full acquisition (b = 0 volumes first, then the shell): ``data`` (noisy),
        ``clean`` (noise-free truth), ``mask``, ``affine``, ``bvals``, ``bvecs``.
    input_indices : ndarray of int
        Volumes of the short acquisition: the first ``n_input_b0`` b = 0 volumes and the
        best-spread ``n_input`` directions (`uniform_subset`), sorted.
    held_out_indices : ndarray of int
        The diffusion-weighted volumes not in the input (what an up-sampler must predict).

    """

    brain: SimulatedBrain
    input_indices: np.ndarray
    held_out_indices: np.ndarray

    def short_acquisition(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the noisy input volumes and their gradients.

        Returns
        -------
        data : ndarray, shape (X, Y, Z, K)
        bvals : ndarray, shape (K,)
        bvecs : ndarray, shape (K, 3)

        """
        idx = self.input_indices
        return self.brain.data[..., idx], self.brain.bvals[idx], self.brain.bvecs[idx]


def evaluation_brain(
    n_full: int = 90,
    n_input: int = 30,
    bval: float = 1000.0,
    *,
    n_b0: int = 6,
    n_input_b0: int = 1,
    snr: float | None = 20.0,
    seed: int = 10_000,
    voxel_size: float = 2.5,
    rotation_deg=0.0,
    deformation: float = 0.0,
    bias_field: float = 0.0,
    params: TissueParams | None = None,
    supersample: int | None = None,
) -> EvaluationBrain:
    """Simulate a held-out evaluation brain: full acquisition, uniform input subset, truth.

    The full acquisition is ``n_b0`` b = 0 volumes then ``n_full`` uniform directions at
    ``bval`` (`acquisition`); the input is ``n_input_b0`` b = 0 volumes plus the best-spread
    ``n_input`` of the directions (greedy farthest point, `uniform_subset`). Tissue parameters
    are drawn from the seed unless given; keep evaluation seeds apart from training seeds.

    Parameters
    ----------
    n_full : int
        Directions of the full acquisition.
    n_input : int
        Directions given to the up-sampler (``n_input < n_full``).
    bval : float
        b-value of the shell (s/mm^2).
    n_b0 : int
        b = 0 volumes of the full acquisition.
    n_input_b0 : int
        b = 0 volumes in the input (``1 <= n_input_b0 <= n_b0``).
    snr : float or None
        S0 of white matter / noise sigma; None: no noise.
    seed : int
        Seed of the brain, the directions and the noise.
    voxel_size, rotation_deg, deformation, bias_field, params, supersample
        See `simulate_brain`.

    Returns
    -------
    EvaluationBrain

    Examples
    --------
    >>> ev = evaluation_brain(n_full=90, n_input=30, bval=1000, snr=20, seed=10_000)
    >>> data, bvals, bvecs = ev.short_acquisition()  # what the up-sampler sees
    >>> truth = ev.brain.clean[..., ev.held_out_indices]  # what it should predict

    """
    if not 1 <= n_input < n_full:
        raise ValueError(f"need 1 <= n_input < n_full, got {n_input}, {n_full}")
    if not 1 <= n_input_b0 <= n_b0:
        raise ValueError(f"need 1 <= n_input_b0 <= n_b0, got {n_input_b0}, {n_b0}")
    bvals, bvecs = acquisition({float(bval): int(n_full)}, n_b0=n_b0, seed=seed)
    brain = simulate_brain(
        bvals,
        bvecs,
        seed=seed,
        voxel_size=voxel_size,
        rotation_deg=rotation_deg,
        deformation=deformation,
        snr=snr,
        bias_field=bias_field,
        params=params,
        supersample=supersample,
    )
    dwi = np.flatnonzero(bvals > 0)
    chosen = dwi[uniform_subset(bvecs[dwi], n_input)]
    inputs = np.sort(np.concatenate([np.arange(n_input_b0), chosen]))
    held_out = np.setdiff1d(dwi, chosen)
    return EvaluationBrain(brain=brain, input_indices=inputs, held_out_indices=held_out)
