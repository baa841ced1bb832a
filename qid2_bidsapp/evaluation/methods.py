"""The methods under evaluation: predict a case's held-out volumes from its input subset.

``sh``, ``interp`` and ``qid2`` are the app's engines (`~qid2_bidsapp.engines.base.get_engine`),
called shell by shell through `~qid2_bidsapp.upsampling.upsample_shells` exactly as the app
calls them; ``mrtrix`` is MRtrix3's ``amp2sh`` + ``sh2amp`` (when installed); ``none`` predicts
nothing: its FA is DTI on the input subset alone.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EngineUnavailableError, Qid2Error
from ..gradients import GradientTable, fsl_to_mrtrix
from ..upsampling import ShellPlan, upsample_shells
from .cases import EvalCase

#: Method kinds: engines of the app, no up-sampling, and MRtrix3.
METHOD_KINDS = ("sh", "interp", "qid2", "none", "mrtrix")
#: The classical methods whose lower FA error is the bar for the others.
CLASSICAL = ("sh", "none")


@dataclass(frozen=True)
class Method:
    """One method to evaluate.

    Attributes
    ----------
    label : str
        Name in tables (``sh``, ``qid2``, ``qid2-fast``, ...).
    kind : str
        One of `METHOD_KINDS`.
    options : dict
        Engine options (`get_engine` keywords; ``lmax`` for ``mrtrix``).

    """

    label: str
    kind: str
    options: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"unknown method {self.kind!r}; choose from {', '.join(METHOD_KINDS)}")


def mrtrix_available() -> bool:
    """Whether MRtrix3's ``amp2sh`` and ``sh2amp`` are on the PATH.

    Returns
    -------
    bool

    """
    return shutil.which("amp2sh") is not None and shutil.which("sh2amp") is not None


def _shell_plans(case: EvalCase) -> tuple[list[ShellPlan], list[np.ndarray]]:
    """Plans in input-subset coordinates, and the held-out volumes (full indices) of each."""
    labels = case.shell_labels
    input_labels = labels[case.input_indices]
    heldout = case.heldout_indices
    plans, targets = [], []
    for shell in np.unique(labels[heldout]):
        acquired = np.flatnonzero(input_labels == shell)
        if acquired.size == 0:
            raise Qid2Error(f"{case.name}: the b={shell} shell has no input direction")
        out = heldout[labels[heldout] == shell]
        plans.append(
            ShellPlan(
                bval=int(shell),
                acquired_indices=acquired,
                targets=case.bvecs[out],
                gap_acquired_deg=float("nan"),
                gap_merged_deg=float("nan"),
            )
        )
        targets.append(out)
    return plans, targets


def _reorder(case: EvalCase, synth: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """Put synthesised volumes (in plan order) in the order of ``case.heldout_indices``."""
    order = np.concatenate(targets)
    position = {int(v): k for k, v in enumerate(order)}
    return synth[..., [position[int(v)] for v in case.heldout_indices]]


def build_engine(method: Method, case: EvalCase):
    """Build the app engine of a method for one case.

    Parameters
    ----------
    method : Method
        A method of kind ``sh``, ``interp`` or ``qid2``.
    case : EvalCase
        The case (qid2 takes its affine and slice axis).

    Returns
    -------
    Upsampler

    """
    from ..engines.base import get_engine

    options = dict(method.options)
    if method.kind == "qid2":
        options.setdefault("affine", case.affine.tolist())
        options.setdefault("slice_axis", case.slice_axis)
    return get_engine(method.kind, **options)


def mrtrix_predict(
    signal: np.ndarray,
    bvecs_in: np.ndarray,
    bvecs_out: np.ndarray,
    bval: float,
    affine: np.ndarray,
    *,
    lmax: int | None = None,
    nthreads: int | None = None,
) -> np.ndarray:
    """Predict one shell with MRtrix3: ``amp2sh`` on the input, ``sh2amp`` at the targets.

    MRtrix3 reads gradient directions in the scanner (world) frame, so both the input gradient
    table and the target directions are converted from FSL image axes with the image's affine
    (`~qid2_bidsapp.gradients.fsl_to_mrtrix`), as the app writes its ``.b`` files.

    Parameters
    ----------
    signal : ndarray, shape (X, Y, Z, N)
        Input volumes of the shell.
    bvecs_in : ndarray, shape (N, 3)
        Their directions (FSL image axes).
    bvecs_out : ndarray, shape (M, 3)
        Directions to predict (FSL image axes).
    bval : float
        The shell's b-value.
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine of the volumes.
    lmax : int, optional
        ``amp2sh -lmax``; default MRtrix3's (highest the direction count allows, at most 8).
    nthreads : int, optional
        ``-nthreads``.

    Returns
    -------
    ndarray, shape (X, Y, Z, M), float32
        Amplitudes, negative values set to 0 (``sh2amp -nonnegative``).

    Raises
    ------
    EngineUnavailableError
        MRtrix3 is not installed.
    Qid2Error
        An MRtrix3 command failed (its message is included).

    """
    import nibabel as nib

    if not mrtrix_available():
        raise EngineUnavailableError("method 'mrtrix' needs MRtrix3 (amp2sh, sh2amp) on the PATH")
    affine = np.asarray(affine, dtype=np.float64)
    n_in = np.shape(bvecs_in)[0]
    grad = fsl_to_mrtrix(np.full(n_in, float(bval)), bvecs_in, affine)
    targets = fsl_to_mrtrix(np.full(len(bvecs_out), float(bval)), bvecs_out, affine)[:, :3]
    common = ["-quiet", "-force"] + ([] if nthreads is None else ["-nthreads", str(nthreads)])
    with tempfile.TemporaryDirectory(prefix="qid2-eval-mrtrix-") as tmp:
        tmp = Path(tmp)
        nib.save(nib.Nifti1Image(np.asarray(signal, np.float32), affine), tmp / "amp.nii")
        np.savetxt(tmp / "grad.b", grad, fmt="%.8f")
        np.savetxt(tmp / "dirs.txt", targets, fmt="%.8f")
        amp2sh = ["amp2sh", *common, "-grad", str(tmp / "grad.b")]
        if lmax is not None:
            amp2sh += ["-lmax", str(int(lmax))]
        commands = [
            [*amp2sh, str(tmp / "amp.nii"), str(tmp / "sh.nii")],
            [
                "sh2amp",
                *common,
                "-nonnegative",
                str(tmp / "sh.nii"),
                str(tmp / "dirs.txt"),
                str(tmp / "out.nii"),
            ],
        ]
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                message = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise Qid2Error(f"method 'mrtrix': {command[0]} failed: {message}")
        out = nib.load(str(tmp / "out.nii"))
        if not np.allclose(out.affine, affine, atol=1e-4):
            raise Qid2Error("method 'mrtrix': sh2amp changed the image orientation")
        result = np.asarray(out.dataobj, dtype=np.float32)
    if result.ndim == 3:
        result = result[..., None]
    return np.clip(result, 0.0, None)


def predict_heldout(method: Method, case: EvalCase) -> np.ndarray | None:
    """Predict a case's held-out volumes from its input subset.

    Parameters
    ----------
    method : Method
        The method.
    case : EvalCase
        The case.

    Returns
    -------
    ndarray, shape (X, Y, Z, H), float32, or None
        Predictions in the order of ``case.heldout_indices`` (0 outside the mask); None for
        ``none`` (no up-sampling).

    """
    if method.kind == "none":
        return None
    data_in = case.data[..., case.input_indices]
    table_in = GradientTable(
        case.bvals[case.input_indices], case.bvecs[case.input_indices], case.b0_threshold
    )
    plans, targets = _shell_plans(case)
    if method.kind == "mrtrix":
        volumes = []
        for plan in plans:
            volumes.append(
                mrtrix_predict(
                    data_in[..., plan.acquired_indices],
                    table_in.bvecs[plan.acquired_indices],
                    plan.targets,
                    plan.bval,
                    case.affine,
                    lmax=method.options.get("lmax"),
                    nthreads=method.options.get("nthreads"),
                )
            )
        synth = np.concatenate(volumes, axis=-1) * case.mask[..., None]
    else:
        engine = build_engine(method, case)
        synth, _, _, _ = upsample_shells(data_in, table_in, plans, engine, case.mask)
    return _reorder(case, np.asarray(synth, dtype=np.float32), targets)
