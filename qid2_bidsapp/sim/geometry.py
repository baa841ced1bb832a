"""Geometry of a simulated brain: rotations and smooth random fields defined analytically.

All positions are in millimetres in the voxel-axis frame of the driver grid (axes parallel to
the image axes; the frame of FSL b-vectors of an image with a negative affine determinant).
Smooth fields are short sums of random plane waves, so they can be evaluated (with exact
derivatives) at any set of points: a slab gives the same values as the whole brain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def rotation_matrix(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """Rotation about an axis (right-hand rule), Rodrigues' formula.

    Parameters
    ----------
    axis : sequence of float, shape (3,)
        Rotation axis (normalised here).
    angle_deg : float
        Angle in degrees.

    Returns
    -------
    ndarray, shape (3, 3)

    """
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    theta = np.deg2rad(angle_deg)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(theta) * cross + (1.0 - np.cos(theta)) * cross @ cross


def euler_rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (fixed axes), angles in degrees.

    Parameters
    ----------
    angles_deg : sequence of float, shape (3,)
        Angles about x, y and z.

    Returns
    -------
    ndarray, shape (3, 3)
        ``Rz @ Ry @ Rx``.

    """
    ax, ay, az = (float(a) for a in angles_deg)
    return (
        rotation_matrix((0, 0, 1), az)
        @ rotation_matrix((0, 1, 0), ay)
        @ rotation_matrix((1, 0, 0), ax)
    )


def resolve_rotation(rotation, rng: np.random.Generator) -> np.ndarray:
    """Turn a rotation specification into a matrix.

    Parameters
    ----------
    rotation : float or sequence of 3 float or ndarray (3, 3) or None
        A float: that angle (degrees) about an axis drawn uniformly from `rng`; three floats:
        `euler_rotation`; a matrix: itself; None or 0: identity.
    rng : numpy.random.Generator
        Draws the random axis (one draw of 3 normals, always made, so later draws do not
        depend on the specification).

    Returns
    -------
    ndarray, shape (3, 3)

    """
    axis = rng.standard_normal(3)
    if rotation is None:
        return np.eye(3)
    arr = np.asarray(rotation, dtype=np.float64)
    if arr.shape == (3, 3):
        if not np.allclose(arr @ arr.T, np.eye(3), atol=1e-6) or np.linalg.det(arr) < 0:
            raise ValueError("rotation matrix must be orthogonal with determinant +1")
        return arr
    if arr.shape == (3,):
        return euler_rotation(arr)
    if arr.shape == ():
        return rotation_matrix(axis, float(arr)) if float(arr) else np.eye(3)
    raise ValueError(f"rotation must be an angle, 3 Euler angles or a 3x3 matrix, got {rotation!r}")


@dataclass
class PlaneWaves:
    """A smooth random field ``f(x) = sum_k a_k cos(w_k . x + phi_k)`` (vector-valued a_k).

    Parameters
    ----------
    wavevectors : ndarray, shape (K, 3)
        ``w_k`` (radians per mm).
    phases : ndarray, shape (K,)
        ``phi_k``.
    amplitudes : ndarray, shape (K, C)
        ``a_k`` for C output channels.

    """

    wavevectors: np.ndarray
    phases: np.ndarray
    amplitudes: np.ndarray

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        n_waves: int,
        wavelength_mm: tuple[float, float],
        rms: float,
        channels: int = 1,
    ) -> PlaneWaves:
        """Draw a field with a given root-mean-square value per channel.

        Parameters
        ----------
        rng : numpy.random.Generator
            Random source (a fixed number of draws for given sizes).
        n_waves : int
            K.
        wavelength_mm : tuple of float
            Range of the wavelengths.
        rms : float
            Root-mean-square of each channel over space.
        channels : int
            C.

        Returns
        -------
        PlaneWaves

        """
        dirs = rng.standard_normal((n_waves, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, size=n_waves)
        phases = rng.uniform(0.0, 2.0 * np.pi, size=n_waves)
        amps = rng.standard_normal((n_waves, channels))
        # E[cos^2] = 1/2 -> rms of the sum is sqrt(sum a_k^2 / 2)
        scale = rms / np.sqrt(np.maximum((amps**2).sum(axis=0) / 2.0, 1e-12))
        return cls(dirs * (2.0 * np.pi / wavelengths)[:, None], phases, amps * scale)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Evaluate at points of shape (..., 3); returns (..., C)."""
        arg = points @ self.wavevectors.T + self.phases
        return np.cos(arg) @ self.amplitudes

    def gradient(self, points: np.ndarray) -> np.ndarray:
        """Jacobian at points (..., 3); returns (..., C, 3), ``d f_c / d x_j``."""
        arg = points @ self.wavevectors.T + self.phases
        return np.einsum("...k,kc,kj->...cj", -np.sin(arg), self.amplitudes, self.wavevectors)


@dataclass
class Placement:
    """Where a brain lies in the scanner: rigid rotation about a centre plus a smooth warp.

    An output (scanner) position ``q`` shows the driver position
    ``p = S(q) = centre + R^T (q - centre) + d(q)``, with ``d`` a smooth displacement field
    (`PlaneWaves` with 3 channels, or None). Fibre directions are pushed forward with the
    inverse Jacobian of ``S``: ``u_out ~ J_S(q)^-1 u_driver`` (``R u`` for a rigid placement).

    Parameters
    ----------
    rotation : ndarray, shape (3, 3)
        R.
    centre : ndarray, shape (3,)
        Centre of rotation (mm).
    warp : PlaneWaves or None
        d.

    """

    rotation: np.ndarray
    centre: np.ndarray
    warp: PlaneWaves | None = None

    def source_points(self, q: np.ndarray) -> np.ndarray:
        """Driver positions ``S(q)`` of output positions q, shape (..., 3)."""
        p = (q - self.centre) @ self.rotation + self.centre  # R^T (q - c) as row vectors
        if self.warp is not None:
            p = p + self.warp(q)
        return p

    def push_directions(self, q: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Map driver directions at output positions q to the output frame (unit vectors).

        Parameters
        ----------
        q : ndarray, shape (V, 3)
            Output positions.
        u : ndarray, shape (V, F, 3)
            Unit directions at the driver positions ``S(q)``.

        Returns
        -------
        ndarray, shape (V, F, 3)
            Unit directions (zero vectors stay zero).

        """
        if self.warp is None:
            return u @ self.rotation.T
        jac = self.rotation.T[None] + self.warp.gradient(q)  # J_S, (V, 3, 3)
        out = u @ np.linalg.inv(jac).transpose(0, 2, 1)  # (J_S^-1 u_f) for each population
        norm = np.linalg.norm(out, axis=-1, keepdims=True)
        return np.where(norm > 0, out / np.maximum(norm, 1e-12), 0.0)

    def forward_points(self, p: np.ndarray) -> np.ndarray:
        """Output positions of driver positions p for the rigid part only (grid bounds)."""
        return (p - self.centre) @ self.rotation.T + self.centre
