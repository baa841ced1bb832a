"""Nipype interfaces for one DWI run: load and check, plan, up-sample, merge, fit, QC.

Each interface is a thin wrapper: it reads files, calls a plain function of
:mod:`qid2_bidsapp.upsampling`, :mod:`qid2_bidsapp.qc` or an engine, and writes into
``runtime.cwd``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..gradients import GradientTable, write_fsl_gradients, write_mrtrix_gradients
from ..upsampling import (
    ShellPlan,
    brain_mask,
    load_dwi_header,
    match_shells,
    mean_b0,
    merge_volumes,
    plan_targets,
    read_gradients,
    upsample_shells,
)


def _optional(value):
    return value if isdefined(value) else None


def _read_table(bval_file: str, bvec_file: str) -> GradientTable:
    bvals = np.loadtxt(bval_file, ndmin=1)
    bvecs = np.loadtxt(bvec_file, ndmin=2).T
    return GradientTable(bvals=bvals, bvecs=bvecs)


def _read_mask(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj) > 0


def _load_dwi(inputs) -> tuple[nib.Nifti1Image, np.ndarray, GradientTable]:
    """Load the run's image, its float32 data and its gradient table from a node's inputs."""
    img = nib.load(inputs.dwi_file)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return img, data, _read_table(inputs.bval_file, inputs.bvec_file)


def _save_like(data: np.ndarray, reference: nib.spatialimages.SpatialImage, path: str) -> str:
    img = nib.Nifti1Image(data, reference.affine, reference.header)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return path


def _limit_threads(n_threads: int | None) -> None:
    """Cap BLAS/OpenMP threads of this process (numpy is already loaded: env vars are too late)."""
    if n_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n_threads)


class _LoadDWIInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="4D DWI NIfTI")
    bval_file = File(exists=True, desc="FSL .bval")
    bvec_file = File(exists=True, desc="FSL .bvec (image axes)")
    b_file = File(exists=True, desc="MRtrix3 .b gradient table (scanner axes)")
    mask_file = File(exists=True, desc="brain mask shipped with the input, if any")


class _LoadDWIOutputSpec(TraitedSpec):
    bval_file = File(exists=True, desc="validated .bval")
    bvec_file = File(exists=True, desc="validated, normalised .bvec")
    mask_file = File(exists=True, desc="brain mask (input's, or median_otsu on the mean b=0)")
    dwiref_file = File(exists=True, desc="mean b=0 image")


class LoadDWI(SimpleInterface):
    """Validate a run's gradients and NIfTI, and make its mask and b=0 reference."""

    input_spec = _LoadDWIInputSpec
    output_spec = _LoadDWIOutputSpec

    def _run_interface(self, runtime):
        img = load_dwi_header(Path(self.inputs.dwi_file))
        table = read_gradients(
            Path(self.inputs.dwi_file),
            _optional(self.inputs.bval_file),
            _optional(self.inputs.bvec_file),
            _optional(self.inputs.b_file),
            img,
        )
        cwd = Path(runtime.cwd)
        self._results["bval_file"] = str(cwd / "dwi.bval")
        self._results["bvec_file"] = str(cwd / "dwi.bvec")
        write_fsl_gradients(table, self._results["bval_file"], self._results["bvec_file"])
        data = np.asarray(img.dataobj, dtype=np.float32)
        b0 = mean_b0(data, table)
        self._results["dwiref_file"] = _save_like(b0, img, str(cwd / "dwiref.nii.gz"))
        if isdefined(self.inputs.mask_file):
            mask = _read_mask(self.inputs.mask_file)
            if mask.shape != b0.shape:
                from ..errors import InputError

                raise InputError(
                    self.inputs.mask_file,
                    f"mask shape {mask.shape} differs from the DWI grid {b0.shape}",
                )
        else:
            mask = brain_mask(b0)
        self._results["mask_file"] = _save_like(
            mask.astype(np.uint8), img, str(cwd / "mask.nii.gz")
        )
        return runtime


class _PlanTargetsInputSpec(BaseInterfaceInputSpec):
    bval_file = File(exists=True, mandatory=True, desc=".bval of the acquired run")
    bvec_file = File(exists=True, mandatory=True, desc=".bvec of the acquired run")
    shells = traits.List(traits.Float, desc="b-values to up-sample (default: all shells)")
    n_targets = traits.Int(desc="new directions per shell (default: 2x acquired)")
    target_bvecs = File(exists=True, desc="user-provided target directions")
    seed = traits.Int(0, usedefault=True, desc="random seed")


class _PlanTargetsOutputSpec(TraitedSpec):
    plan_file = File(exists=True, desc="JSON: per shell, acquired indices, targets, gaps")


class PlanTargets(SimpleInterface):
    """Choose new directions for every shell to up-sample."""

    input_spec = _PlanTargetsInputSpec
    output_spec = _PlanTargetsOutputSpec

    def _run_interface(self, runtime):
        table = _read_table(self.inputs.bval_file, self.inputs.bvec_file)
        from ..datacheck import usable_shells

        requested = _optional(self.inputs.shells) or None
        shells, _ = usable_shells(table, match_shells(table, requested, table.shell_tolerance))
        target_file = _optional(self.inputs.target_bvecs)
        plans = plan_targets(
            table,
            shells,
            n_targets=_optional(self.inputs.n_targets),
            target_bvecs=Path(target_file) if target_file else None,
            seed=self.inputs.seed,
        )
        path = Path(runtime.cwd) / "plan.json"
        path.write_text(json.dumps([p.to_dict() for p in plans], indent=1))
        self._results["plan_file"] = str(path)
        return runtime


def _load_plans(path: str) -> list[ShellPlan]:
    return [ShellPlan.from_dict(d) for d in json.loads(Path(path).read_text())]


class _EngineInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="acquired DWI")
    bval_file = File(exists=True, mandatory=True, desc="validated .bval")
    bvec_file = File(exists=True, mandatory=True, desc="validated .bvec")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    plan_file = File(exists=True, mandatory=True, desc="targets from PlanTargets")
    engine = traits.Str(mandatory=True, desc="engine name (sh, interp, qid2)")
    engine_options = traits.Dict(desc="engine settings")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads for numerics")
    # Nipype's MultiProc schedules nodes whose interface has use_gpu=True on GPU slots
    use_gpu = traits.Bool(False, usedefault=True, nohash=True, desc="the engine runs on a GPU")


def _build_engine(inputs, affine: np.ndarray):
    """Build the engine; qid2 also takes the threads and the affine (its direction frame)."""
    from ..engines.base import get_engine

    options = dict(_optional(inputs.engine_options) or {})
    options.setdefault("num_threads", inputs.num_threads)
    options.setdefault("affine", np.asarray(affine).tolist())
    return get_engine(inputs.engine, **options)


class _UpsampleOutputSpec(TraitedSpec):
    synth_file = File(exists=True, desc="synthesised volumes (4D NIfTI)")
    synth_info = File(exists=True, desc="JSON: bvals, bvecs, runtimes, engine settings")
    uncertainty_file = File(
        exists=True, desc="std of the samples per synthesised volume (engines that provide it)"
    )


class Upsample(SimpleInterface):
    """Synthesise the planned directions of every shell with an engine."""

    input_spec = _EngineInputSpec
    output_spec = _UpsampleOutputSpec

    def _run_interface(self, runtime):
        from ..engines.base import UncertaintyRecorder

        _limit_threads(self.inputs.num_threads)
        img, data, table = _load_dwi(self.inputs)
        mask = _read_mask(self.inputs.mask_file)
        engine = UncertaintyRecorder(_build_engine(self.inputs, img.affine))
        plans = _load_plans(self.inputs.plan_file)
        # classical engines are cheap: predict every voxel so the merged DWI has no holes;
        # qid2 runs the network in the mask and fills the rest with its SH prior
        engine_mask = None if self.inputs.engine in ("sh", "interp") else mask
        synth, bvals, bvecs, runtimes = upsample_shells(data, table, plans, engine, engine_mask)
        cwd = Path(runtime.cwd)
        self._results["synth_file"] = _save_like(synth, img, str(cwd / "synth.nii.gz"))
        settings = engine.settings()
        info = {
            "bvals": bvals.tolist(),
            "bvecs": bvecs.tolist(),
            "runtime_s": {str(k): v for k, v in runtimes.items()},
            "engine": engine.name,
            "engine_settings": settings,
            "model_id": settings.get("model_id"),
            "model_sha256": settings.get("model_sha256"),
            "sampler": settings.get("sampler"),
            "uncertainty": engine.provides_uncertainty,
        }
        if engine.provides_uncertainty:
            std = engine.uncertainty(data.shape[:3])
            path = str(cwd / "uncertainty.nii.gz")
            self._results["uncertainty_file"] = _save_like(std, img, path)
        (cwd / "synth.json").write_text(json.dumps(info, indent=1))
        self._results["synth_info"] = str(cwd / "synth.json")
        return runtime


class _MergeInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="acquired DWI")
    bval_file = File(exists=True, mandatory=True, desc="validated .bval")
    bvec_file = File(exists=True, mandatory=True, desc="validated .bvec")
    synth_file = File(exists=True, mandatory=True, desc="synthesised volumes")
    synth_info = File(exists=True, mandatory=True, desc="synthesised gradients (JSON)")


class _MergeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="merged DWI")
    bval_file = File(exists=True, desc="merged .bval")
    bvec_file = File(exists=True, desc="merged .bvec")
    b_file = File(exists=True, desc="merged MRtrix3 .b")


class MergeDWI(SimpleInterface):
    """Append the synthesised volumes to the acquired ones."""

    input_spec = _MergeInputSpec
    output_spec = _MergeOutputSpec

    def _run_interface(self, runtime):
        img, data, table = _load_dwi(self.inputs)
        synth = np.asarray(nib.load(self.inputs.synth_file).dataobj, dtype=np.float32)
        info = json.loads(Path(self.inputs.synth_info).read_text())
        merged, bvals, bvecs = merge_volumes(
            data,
            table,
            synth,
            np.asarray(info["bvals"], dtype=float),
            np.asarray(info["bvecs"], dtype=float).reshape(-1, 3),
        )
        cwd = Path(runtime.cwd)
        out_table = GradientTable(bvals=bvals, bvecs=bvecs)
        self._results["out_file"] = _save_like(merged, img, str(cwd / "merged.nii.gz"))
        self._results["bval_file"] = str(cwd / "merged.bval")
        self._results["bvec_file"] = str(cwd / "merged.bvec")
        self._results["b_file"] = str(cwd / "merged.b")
        write_fsl_gradients(out_table, self._results["bval_file"], self._results["bvec_file"])
        write_mrtrix_gradients(out_table, img.affine, self._results["b_file"])
        return runtime


class _FitTensorInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="DWI")
    bval_file = File(exists=True, mandatory=True, desc=".bval")
    bvec_file = File(exists=True, mandatory=True, desc=".bvec")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads for numerics")


class _FitTensorOutputSpec(TraitedSpec):
    fa_file = File(exists=True, desc="FA map (0 outside the mask)")


class FitTensor(SimpleInterface):
    """Single-tensor DTI fit (DIPY, WLS); writes the FA map."""

    input_spec = _FitTensorInputSpec
    output_spec = _FitTensorOutputSpec

    def _run_interface(self, runtime):
        from ..qc import fit_dti

        _limit_threads(self.inputs.num_threads)
        img, data, table = _load_dwi(self.inputs)
        result = fit_dti(data, table.bvals, table.bvecs, _read_mask(self.inputs.mask_file))
        path = str(Path(runtime.cwd) / "fa.nii.gz")
        self._results["fa_file"] = _save_like(result.fa.astype(np.float32), img, path)
        return runtime


class _HiddenQCInputSpec(_EngineInputSpec):
    fa_reference = File(exists=True, mandatory=True, desc="FA of DTI on all acquired volumes")
    n_hidden = traits.Int(desc="directions to hide per shell (default ~10%)")
    seed = traits.Int(0, usedefault=True, desc="random seed")


class _HiddenQCOutputSpec(TraitedSpec):
    qc_file = File(exists=True, desc="JSON: hidden-direction metrics per shell")


class HiddenDirectionQC(SimpleInterface):
    """Hide acquired directions, predict them with the same engine, score the prediction."""

    input_spec = _HiddenQCInputSpec
    output_spec = _HiddenQCOutputSpec

    def _run_interface(self, runtime):
        from ..qc import _mean_b0, hidden_direction_check
        from ..trust import estimate_noise

        _limit_threads(self.inputs.num_threads)
        img, data, table = _load_dwi(self.inputs)
        mask = _read_mask(self.inputs.mask_file)
        fa_reference = np.asarray(nib.load(self.inputs.fa_reference).dataobj, dtype=np.float32)
        engine = _build_engine(self.inputs, img.affine)
        sigma, method = estimate_noise(data, table.bvals, table.bvecs, mask)
        b0 = _mean_b0(data, table.bvals, 50.0)
        s0 = float(np.median(b0[mask])) if mask.any() else float("nan")
        results = {}
        for plan in _load_plans(self.inputs.plan_file):
            results[str(plan.bval)] = hidden_direction_check(
                data,
                table.bvals,
                table.bvecs,
                plan.acquired_indices,
                engine,
                mask,
                n_hidden=_optional(self.inputs.n_hidden),
                seed=self.inputs.seed,
                fa_reference=fa_reference,
                noise_sigma=sigma,
            )
            results[str(plan.bval)].update(
                {
                    "noise_sigma": sigma,
                    "noise_method": method,
                    "noise_sigma_rel": sigma / s0 if s0 > 0 else float("nan"),
                }
            )
        path = Path(runtime.cwd) / "hidden_qc.json"
        path.write_text(json.dumps(results, indent=1))
        self._results["qc_file"] = str(path)
        return runtime
