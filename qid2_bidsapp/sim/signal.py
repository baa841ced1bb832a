"""Multi-compartment diffusion signal, vectorised over voxels, fibre populations and directions.

Per voxel the signal relative to the b = 0 signal of pure white matter is::

    E(b, g) = f_wm sum_i w_i [f_in Z(d_in, 0; u_i) + (1 - f_in) Z(d_ex_par, d_ex_perp; u_i)]
            + f_gm s_gm Z(d_gm (1 + a), d_gm (1 - a/2); u_1) + f_csf s_csf exp(-b d_csf)

where ``Z(l_par, l_perp; u) = exp(-b (l_perp + (l_par - l_perp) (g.u)^2))`` is a cylindrically
symmetric tensor (zeppelin) along the fibre direction ``u``, ``w_i`` the weights of up to three
fibre populations, ``a`` a weak grey-matter anisotropy, ``f_*`` volume fractions and ``s_*``
the relative b = 0 signal (T2 contrast) of each tissue.

Orientation dispersion is applied to every fibre compartment by averaging its diffusion tensor
over a Watson distribution of concentration ``kappa``: the axial and radial diffusivities
become ``l_perp + (l_par - l_perp) tau`` and ``l_perp + (l_par - l_perp) (1 - tau) / 2`` with
``tau = <(n.u)^2>`` (`watson_tau`). This is exact for the mean tensor and the usual
approximation for the signal (NODDI's extra-cellular model); it keeps every compartment a
tensor, so a voxel's signal is a DIPY ``multi_tensor`` (`compartment_list`; the tests check
it). The fibre model is the two-compartment (stick + zeppelin) "standard model" of white
matter (Novikov et al. 2019) with Watson dispersion (Zhang et al. 2012).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import dawsn

#: Free-water diffusivity at body temperature (mm^2/s).
D_CSF = 3.0e-3


@dataclass
class TissueParams:
    """Per-brain tissue parameters of the simulator (diffusivities in mm^2/s).

    Parameters
    ----------
    d_intra : float
        Axial diffusivity of the intra-axonal stick (radial diffusivity 0 before dispersion).
    d_extra_par, d_extra_perp : float
        Axial and radial diffusivity of the extra-axonal tensor of each fibre population.
    f_intra_max : float
        Intra-axonal fraction of white matter where the fibre density (peak amplitude) is high.
    odi : float
        Mean orientation dispersion index (NODDI's ODI, ``2/pi arctan(1/kappa)``) of white matter.
    odi_variation : float
        Standard deviation of the log of a smooth spatial modulation of the ODI.
    d_gm : float
        Mean diffusivity of grey matter.
    gm_anisotropy : float
        Grey matter is a weakly anisotropic tensor along the voxel's first fibre direction,
        with axial ``d_gm (1 + a)`` and radial ``d_gm (1 - a / 2)`` diffusivity (FA about
        ``0.8 a`` for small ``a``).
    d_csf : float
        Diffusivity of CSF (free water).
    s0_gm, s0_csf : float
        b = 0 signal of grey matter and CSF relative to white matter (T2 contrast).
    fa_low, fa_high : float
        The driver FA mapped to a white-matter fraction of 0 and 1 (linear in between).
    peak_threshold : float
        Fibre peaks below this fraction of the voxel's largest peak are dropped (spurious lobes).

    """

    d_intra: float = 2.1e-3
    d_extra_par: float = 1.7e-3
    d_extra_perp: float = 0.55e-3
    f_intra_max: float = 0.65
    odi: float = 0.08
    odi_variation: float = 0.3
    d_gm: float = 0.85e-3
    gm_anisotropy: float = 0.15
    d_csf: float = D_CSF
    s0_gm: float = 1.25
    s0_csf: float = 2.2
    fa_low: float = 0.12
    fa_high: float = 0.5
    peak_threshold: float = 0.35

    @classmethod
    def sample(cls, rng: np.random.Generator) -> TissueParams:
        """Draw random per-brain parameters in plausible in-vivo ranges.

        Parameters
        ----------
        rng : numpy.random.Generator
            Random source (a fixed number of draws, in a fixed order).

        Returns
        -------
        TissueParams

        """
        u = rng.uniform(size=12)
        return cls(
            d_intra=1.7e-3 + 0.7e-3 * u[0],
            d_extra_par=1.3e-3 + 0.7e-3 * u[1],
            d_extra_perp=0.35e-3 + 0.45e-3 * u[2],
            f_intra_max=0.5 + 0.25 * u[3],
            odi=0.03 + 0.17 * u[4],
            odi_variation=0.15 + 0.3 * u[5],
            d_gm=0.7e-3 + 0.3e-3 * u[6],
            gm_anisotropy=0.05 + 0.25 * u[11],
            d_csf=D_CSF,
            s0_gm=1.1 + 0.3 * u[7],
            s0_csf=1.6 + 1.4 * u[8],
            fa_low=0.1 + 0.05 * u[9],
            fa_high=0.42 + 0.13 * u[10],
            peak_threshold=0.35,
        )

    def to_dict(self) -> dict:
        """Return the parameters as a plain dict (JSON-serialisable)."""
        return {k: float(v) for k, v in asdict(self).items()}


def watson_tau(odi: np.ndarray) -> np.ndarray:
    """Return ``<(n.u)^2>`` of a Watson distribution of orientations with a given ODI.

    Parameters
    ----------
    odi : array_like
        Orientation dispersion index in (0, 1]; ``kappa = 1 / tan(pi/2 * odi)``.

    Returns
    -------
    ndarray
        ``tau`` in [1/3, 1]: 1 for parallel fibres, 1/3 for isotropic orientations.

    """
    odi = np.clip(np.asarray(odi, dtype=np.float64), 1e-6, 1.0)
    kappa = 1.0 / np.tan(0.5 * np.pi * odi)
    root = np.sqrt(np.maximum(kappa, 1e-12))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tau = 1.0 / (2.0 * root * dawsn(root)) - 1.0 / (2.0 * kappa)
    small = kappa < 1e-3  # series: 1/3 + 2 kappa / 45
    tau = np.where(small, 1.0 / 3.0 + 2.0 * kappa / 45.0, tau)
    return np.clip(tau, 1.0 / 3.0, 1.0)


def dispersed_diffusivities(
    d_par: np.ndarray, d_perp: np.ndarray, tau: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Axial and radial diffusivity of a cylindrical tensor averaged over dispersed axes.

    Parameters
    ----------
    d_par, d_perp : array_like
        Diffusivities of the undispersed tensor.
    tau : array_like
        ``<(n.u)^2>`` of the orientation distribution (`watson_tau`).

    Returns
    -------
    axial, radial : ndarray
        ``d_perp + (d_par - d_perp) tau`` and ``d_perp + (d_par - d_perp) (1 - tau) / 2``.

    """
    delta = np.asarray(d_par) - np.asarray(d_perp)
    return d_perp + delta * tau, d_perp + delta * (1.0 - np.asarray(tau)) / 2.0


def _cos2(directions: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """Squared cosines between (V, F, 3) axes and (N, 3) directions, (V, F, N) float32."""
    v, f, _ = directions.shape
    flat = directions.reshape(v * f, 3).astype(np.float32, copy=False)
    cos2 = flat @ np.asarray(bvecs, dtype=np.float32).T
    cos2 *= cos2
    return cos2.reshape(v, f, -1)


def _zeppelin(cos2: np.ndarray, bvals: np.ndarray, axial, radial) -> np.ndarray:
    """``exp(-b (radial + (axial - radial) cos2))`` for (V, F, N) cos2, (V, F) diffusivities."""
    axial = np.asarray(axial, dtype=np.float32)
    radial = np.asarray(radial, dtype=np.float32)
    axial, radial = np.broadcast_arrays(axial, radial)
    out = cos2 * (axial - radial)[..., None]
    out += radial[..., None]
    out *= -bvals
    return np.exp(out, out=out)


def zeppelin_signal(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    directions: np.ndarray,
    axial: np.ndarray,
    radial: np.ndarray,
) -> np.ndarray:
    """Signal of cylindrically symmetric tensors, ``exp(-b (radial + (axial - radial) c^2))``.

    Parameters
    ----------
    bvals : ndarray, shape (N,)
        b-values (s/mm^2).
    bvecs : ndarray, shape (N, 3)
        Unit gradient directions (any value where b = 0).
    directions : ndarray, shape (V, F, 3)
        Unit axes of F tensors in V voxels (the same frame as `bvecs`).
    axial, radial : ndarray, broadcastable to (V, F)
        Diffusivities (mm^2/s).

    Returns
    -------
    ndarray, shape (V, F, N), float32

    """
    directions = np.asarray(directions)
    shape = directions.shape[:2]
    axial = np.broadcast_to(np.asarray(axial, dtype=np.float32), shape)
    radial = np.broadcast_to(np.asarray(radial, dtype=np.float32), shape)
    cos2 = _cos2(directions, bvecs)
    return _zeppelin(cos2, np.asarray(bvals, dtype=np.float32), axial, radial)


def tissue_signal(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    fibre_dirs: np.ndarray,
    fibre_weights: np.ndarray,
    f_intra: np.ndarray,
    fractions: np.ndarray,
    tau: np.ndarray,
    params: TissueParams,
) -> np.ndarray:
    """Noise-free signal of V voxels relative to the b = 0 signal of pure white matter.

    Parameters
    ----------
    bvals : ndarray, shape (N,)
        b-values (s/mm^2).
    bvecs : ndarray, shape (N, 3)
        Unit gradient directions.
    fibre_dirs : ndarray, shape (V, F, 3)
        Unit fibre directions in the frame of `bvecs`.
    fibre_weights : ndarray, shape (V, F)
        Weights of the fibre populations (each row sums to 1 where there is white matter).
    f_intra : ndarray, shape (V,)
        Intra-axonal fraction of white matter.
    fractions : ndarray, shape (V, 3)
        Volume fractions of white matter, grey matter and CSF.
    tau : ndarray, shape (V,)
        Dispersion of the fibre populations (`watson_tau`).
    params : TissueParams
        Diffusivities and relative b = 0 signals.

    Returns
    -------
    ndarray, shape (V, N), float32
        The module formula; equals ``f_wm + s_gm f_gm + s_csf f_csf`` at b = 0.

    """
    bvals = np.asarray(bvals, dtype=np.float32)
    fibre_dirs = np.asarray(fibre_dirs, dtype=np.float32)
    n_vox, n_fib = fibre_dirs.shape[:2]
    tau = np.broadcast_to(np.asarray(tau, dtype=np.float32).reshape(-1, 1), (n_vox, n_fib))
    in_ax, in_rad = dispersed_diffusivities(np.float32(params.d_intra), np.float32(0.0), tau)
    ex_ax, ex_rad = dispersed_diffusivities(
        np.float32(params.d_extra_par), np.float32(params.d_extra_perp), tau
    )
    cos2 = _cos2(fibre_dirs, bvecs)
    intra = _zeppelin(cos2, bvals, in_ax, in_rad)
    fibres = _zeppelin(cos2, bvals, ex_ax, ex_rad)
    f_in = np.asarray(f_intra, dtype=np.float32).reshape(-1, 1, 1)
    intra -= fibres
    intra *= f_in
    fibres += intra  # f_in intra + (1 - f_in) extra
    weights = np.asarray(fibre_weights, dtype=np.float32)
    fractions = np.asarray(fractions, dtype=np.float32)
    scale = weights * fractions[:, :1]  # f_wm w_i
    out = fibres[:, 0] * scale[:, :1]
    for i in range(1, n_fib):
        out += fibres[:, i] * scale[:, i : i + 1]
    gm_ax, gm_rad = _gm_diffusivities(params)
    gm = _zeppelin(cos2[:, :1], bvals, np.float32(gm_ax), np.float32(gm_rad))[:, 0]
    csf = np.exp(-bvals * np.float32(params.d_csf))
    gm *= np.float32(params.s0_gm) * fractions[:, 1:2]
    out += gm
    out += (np.float32(params.s0_csf) * fractions[:, 2:3]) * csf
    return out


def _gm_diffusivities(params: TissueParams) -> tuple[float, float]:
    a = params.gm_anisotropy
    return params.d_gm * (1.0 + a), params.d_gm * (1.0 - a / 2.0)


def compartment_list(
    fibre_dirs: np.ndarray,
    fibre_weights: np.ndarray,
    f_intra: float,
    fractions: np.ndarray,
    tau: float,
    params: TissueParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the tensors of one voxel, as DIPY's ``multi_tensor`` takes them.

    Parameters
    ----------
    fibre_dirs : ndarray, shape (F, 3)
        Unit fibre directions.
    fibre_weights : ndarray, shape (F,)
        Fibre population weights.
    f_intra : float
        Intra-axonal fraction.
    fractions : ndarray, shape (3,)
        White matter, grey matter and CSF volume fractions.
    tau : float
        Dispersion (`watson_tau`).
    params : TissueParams
        Diffusivities and relative b = 0 signals.

    Returns
    -------
    evals : ndarray, shape (C, 3)
        Eigenvalues (axial first) of the C = 2 F + 2 compartments.
    axes : ndarray, shape (C, 3)
        Principal axis of each compartment (grey matter: the first fibre direction; CSF: z).
    signal_fractions : ndarray, shape (C,)
        Fraction of the b = 0 signal of each compartment (they sum to the voxel's b = 0
        signal relative to white matter, as in `tissue_signal`).

    """
    in_ax, in_rad = dispersed_diffusivities(params.d_intra, 0.0, tau)
    ex_ax, ex_rad = dispersed_diffusivities(params.d_extra_par, params.d_extra_perp, tau)
    evals, axes, weights = [], [], []
    for u, w in zip(np.asarray(fibre_dirs), np.asarray(fibre_weights), strict=True):
        for ax, rad, f in ((in_ax, in_rad, f_intra), (ex_ax, ex_rad, 1.0 - f_intra)):
            evals.append([ax, rad, rad])
            axes.append(u)
            weights.append(fractions[0] * w * f)
    gm_ax, gm_rad = _gm_diffusivities(params)
    evals += [[gm_ax, gm_rad, gm_rad], [params.d_csf] * 3]
    axes += [np.asarray(fibre_dirs)[0], [0.0, 0.0, 1.0]]
    weights += [params.s0_gm * fractions[1], params.s0_csf * fractions[2]]
    return np.array(evals, dtype=float), np.array(axes, dtype=float), np.array(weights)
