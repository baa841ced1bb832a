"""Nipype interfaces that assemble a run's QC table and sidecars, publish them, and report."""

from __future__ import annotations

import csv
import json
import math
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

from .. import __version__

QC_COLUMNS = (
    "subject",
    "session",
    "source",
    "shell",
    "n_acquired",
    "n_synthesized",
    "engine",
    "gap_acquired_deg",
    "gap_merged_deg",
    "hidden_n",
    "hidden_nrmse",
    "hidden_fa_mae",
    "hidden_nrmse_sh",
    "noise_sigma_rel",
    "noise_method",
    "hidden_nrmse_floor",
    "fa_mean_acquired",
    "fa_mean_upsampled",
    "fa_mae_upsampled_vs_acquired",
    "fa_change_upsampled",
    "trust",
    "trust_warnings",
    "runtime_s",
)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.6g}"
    return "n/a" if value is None else str(value)


def qc_rows(
    *,
    subject: str,
    session: str | None,
    source: str,
    engine: str,
    plans: list[dict],
    synth_info: dict,
    hidden: dict,
    fa_acquired: np.ndarray,
    fa_upsampled: np.ndarray,
    mask: np.ndarray,
) -> list[dict]:
    """One QC row per up-sampled shell (columns of ``QC_COLUMNS``).

    Parameters
    ----------
    subject, session, source, engine : str
        Identify the run.
    plans : list of dict
        Serialised :class:`~qid2_bidsapp.upsampling.ShellPlan` objects.
    synth_info : dict
        Runtimes per shell (``runtime_s``).
    hidden : dict
        Hidden-direction metrics per shell.
    fa_acquired, fa_upsampled : ndarray
        FA maps.
    mask : ndarray of bool
        Brain mask.

    Returns
    -------
    list of dict

    """
    from ..qc import masked_mae
    from ..trust import trust_checks, warned

    fa_mean_acq = float(fa_acquired[mask].mean()) if mask.any() else float("nan")
    fa_mean_up = float(fa_upsampled[mask].mean()) if mask.any() else float("nan")
    fa_change = masked_mae(fa_upsampled, fa_acquired, mask)
    nan = float("nan")
    rows = []
    for plan in plans:
        key = str(plan["bval"])
        metrics = hidden.get(key, {})
        verdict, checks = trust_checks(
            hidden_nrmse=metrics.get("hidden_nrmse", nan),
            noise_floor=metrics.get("hidden_nrmse_floor", nan),
            sh_nrmse=metrics.get("hidden_nrmse_sh", nan),
            fa_change=fa_mean_up - fa_mean_acq,
        )
        rows.append(
            {
                "subject": subject,
                "session": session or "n/a",
                "source": source,
                "shell": plan["bval"],
                "n_acquired": len(plan["acquired_indices"]),
                "n_synthesized": len(plan["targets"]),
                "engine": engine,
                "gap_acquired_deg": plan["gap_acquired_deg"],
                "gap_merged_deg": plan["gap_merged_deg"],
                "hidden_n": metrics.get("hidden_n", 0),
                "hidden_nrmse": metrics.get("hidden_nrmse", float("nan")),
                "hidden_fa_mae": metrics.get("hidden_fa_mae", nan),
                "hidden_nrmse_sh": metrics.get("hidden_nrmse_sh", nan),
                "noise_sigma_rel": metrics.get("noise_sigma_rel", nan),
                "noise_method": metrics.get("noise_method", "n/a"),
                "hidden_nrmse_floor": metrics.get("hidden_nrmse_floor", nan),
                "fa_mean_acquired": fa_mean_acq,
                "fa_mean_upsampled": fa_mean_up,
                "fa_mae_upsampled_vs_acquired": fa_change,
                "fa_change_upsampled": fa_mean_up - fa_mean_acq,
                "trust": verdict,
                "trust_warnings": ",".join(warned(checks)).replace(" ", "_") or "none",
                "runtime_s": synth_info.get("runtime_s", {}).get(key, float("nan")),
            }
        )
    return rows


def write_qc_tsv(rows: list[dict], path: Path) -> None:
    """Write QC rows as a BIDS-style TSV (``n/a`` for missing values).

    Parameters
    ----------
    rows : list of dict
        From :func:`qc_rows`.
    path : Path
        Destination.

    """
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(QC_COLUMNS)
        for row in rows:
            writer.writerow([_fmt(row[c]) for c in QC_COLUMNS])


class _QCTableInputSpec(BaseInterfaceInputSpec):
    subject = traits.Str(mandatory=True, desc="subject label")
    session = traits.Str(desc="session label")
    source = traits.Str(mandatory=True, desc="input DWI, relative to the dataset")
    engine = traits.Str(mandatory=True, desc="engine name")
    plan_file = File(exists=True, mandatory=True, desc="targets per shell")
    synth_info = File(exists=True, mandatory=True, desc="up-sampling runtimes")
    hidden_qc = File(exists=True, mandatory=True, desc="hidden-direction metrics")
    fa_acquired = File(exists=True, mandatory=True, desc="FA, acquired only")
    fa_upsampled = File(exists=True, mandatory=True, desc="FA, merged")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")


class _QCTableOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="QC TSV")


class QCTable(SimpleInterface):
    """Gather a run's QC metrics into one TSV (one row per shell)."""

    input_spec = _QCTableInputSpec
    output_spec = _QCTableOutputSpec

    def _run_interface(self, runtime):
        rows = qc_rows(
            subject=self.inputs.subject,
            session=self.inputs.session if isdefined(self.inputs.session) else None,
            source=self.inputs.source,
            engine=self.inputs.engine,
            plans=json.loads(Path(self.inputs.plan_file).read_text()),
            synth_info=json.loads(Path(self.inputs.synth_info).read_text()),
            hidden=json.loads(Path(self.inputs.hidden_qc).read_text()),
            fa_acquired=np.asarray(nib.load(self.inputs.fa_acquired).dataobj),
            fa_upsampled=np.asarray(nib.load(self.inputs.fa_upsampled).dataobj),
            mask=np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0,
        )
        path = Path(runtime.cwd) / "qc.tsv"
        write_qc_tsv(rows, path)
        self._results["out_file"] = str(path)
        return runtime


class _SidecarsInputSpec(BaseInterfaceInputSpec):
    source = traits.Str(mandatory=True, desc="input DWI, relative to the input dataset")
    bval_file = File(exists=True, mandatory=True, desc="acquired .bval (volume count)")
    plan_file = File(exists=True, mandatory=True, desc="targets per shell")
    synth_info = File(exists=True, mandatory=True, desc="engine and settings")
    target_source = traits.Str("repulsion", usedefault=True, desc="how targets were chosen")
    seed = traits.Int(0, usedefault=True, desc="random seed")
    mask_from_input = traits.Bool(False, usedefault=True, desc="mask came with the input")


class _SidecarsOutputSpec(TraitedSpec):
    dwi_json = File(exists=True, desc="merged DWI sidecar")
    mask_json = File(exists=True, desc="mask sidecar")
    dwiref_json = File(exists=True, desc="b=0 reference sidecar")
    uncertainty_json = File(exists=True, desc="uncertainty map sidecar (qid2 engine only)")


def dwi_sidecar(
    *,
    source: str,
    n_acquired: int,
    n_synth: int,
    plans: list[dict],
    info: dict,
    seed: int,
    target_source: str,
) -> dict:
    """Build the merged DWI's JSON sidecar (see docs/outputs.md).

    Parameters
    ----------
    source : str
        Input DWI relative to the input dataset.
    n_acquired, n_synth : int
        Volume counts.
    plans : list of dict
        Serialised shell plans.
    info : dict
        Engine name and settings.
    seed : int
        Random seed.
    target_source : str
        ``"repulsion"`` or the user's file.

    Returns
    -------
    dict

    """
    uri = f"bids:input:{source}"
    return {
        "Description": "Acquired DWI volumes followed by volumes synthesised by qid2.",
        "SkullStripped": False,
        "SpatialReference": uri,
        "Sources": [uri],
        "SourceFile": source,
        "AcquiredVolumes": list(range(n_acquired)),
        "SynthesizedVolumes": list(range(n_acquired, n_acquired + n_synth)),
        "ShellsUpsampled": [p["bval"] for p in plans],
        "TargetDirections": target_source,
        "UpsamplingEngine": info["engine"],
        "UpsamplingEngineSettings": info["engine_settings"],
        "ModelID": info.get("model_id"),
        "ModelSHA256": info.get("model_sha256"),
        "SamplerSettings": info.get("sampler"),
        "RandomSeed": seed,
        "Qid2Version": __version__,
    }


def uncertainty_sidecar(dwi_info: dict) -> dict:
    """Build the uncertainty map's JSON sidecar from the merged DWI's (see docs/outputs.md).

    Parameters
    ----------
    dwi_info : dict
        Output of :func:`dwi_sidecar` for the same run.

    Returns
    -------
    dict

    """
    sampler = dwi_info.get("SamplerSettings") or {}
    k = sampler.get("n_samples")
    s = int(sampler.get("symmetries") or 1)
    drawn = f"{k if k else 'K'} samples"
    if s > 1:
        total = k * s if k else f"K x {s}"
        drawn = f"{total} predictions ({k if k else 'K'} sample(s) on each of {s} mirrored copies "
        drawn += "of each slice, mapped back)"
    return {
        "Description": (
            "Uncertainty of the synthesised DWI volumes: per-voxel standard deviation of the "
            f"diffusion model's {drawn}, in the units of the DWI signal; "
            "0 outside the brain mask (where the synthesised signal is the SH prediction). "
            "Volume i belongs to volume VolumeIndices[i] of the merged DWI."
        ),
        "Model": "qid2",
        "Parameter": "std",
        "VolumeIndices": dwi_info["SynthesizedVolumes"],
        "SpatialReference": dwi_info["SpatialReference"],
        "Sources": dwi_info["Sources"],
        "ModelID": dwi_info.get("ModelID"),
        "ModelSHA256": dwi_info.get("ModelSHA256"),
        "SamplerSettings": dwi_info.get("SamplerSettings"),
        "RandomSeed": dwi_info.get("RandomSeed"),
    }


class Sidecars(SimpleInterface):
    """Write the JSON sidecars of the merged DWI, the mask and the b=0 reference."""

    input_spec = _SidecarsInputSpec
    output_spec = _SidecarsOutputSpec

    def _run_interface(self, runtime):
        plans = json.loads(Path(self.inputs.plan_file).read_text())
        info = json.loads(Path(self.inputs.synth_info).read_text())
        n_acquired = int(np.loadtxt(self.inputs.bval_file, ndmin=1).size)
        sidecar = dwi_sidecar(
            source=self.inputs.source,
            n_acquired=n_acquired,
            n_synth=len(info["bvals"]),
            plans=plans,
            info=info,
            seed=self.inputs.seed,
            target_source=self.inputs.target_source,
        )
        uri = sidecar["SpatialReference"]
        how = "from the input dataset" if self.inputs.mask_from_input else "median_otsu (DIPY)"
        outputs = {
            "dwi_json": sidecar,
            "mask_json": {
                "Type": "Brain",
                "SpatialReference": uri,
                "Sources": [uri],
                "Description": f"Brain mask: {how} on the mean b=0 image.",
            },
            "dwiref_json": {
                "SpatialReference": uri,
                "Sources": [uri],
                "Description": "Mean of the b=0 volumes.",
            },
        }
        if info.get("uncertainty"):
            outputs["uncertainty_json"] = uncertainty_sidecar(sidecar)
        for key, content in outputs.items():
            path = Path(runtime.cwd) / f"{key}.json"
            path.write_text(json.dumps(content, indent=2) + "\n")
            self._results[key] = str(path)
        return runtime


class _PublishInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, desc="finished files")
    out_paths = traits.List(traits.Str, mandatory=True, desc="destinations, same order")
    output_dir = traits.Str(desc="derivative dataset root (publish under its lock)")
    obsolete_paths = traits.List(
        traits.Str, desc="this run's outputs of other engines, removed once published"
    )


class _PublishOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="files written")


class PublishRun(SimpleInterface):
    """Copy a run's finished files into the output dataset, all or nothing."""

    input_spec = _PublishInputSpec
    output_spec = _PublishOutputSpec

    def _run_interface(self, runtime):
        from ..derivatives import publish

        if len(self.inputs.in_files) != len(self.inputs.out_paths):
            raise ValueError("in_files and out_paths differ in length")
        output_dir = self.inputs.output_dir if isdefined(self.inputs.output_dir) else None
        obsolete = self.inputs.obsolete_paths if isdefined(self.inputs.obsolete_paths) else []
        written = publish(
            dict(zip(self.inputs.in_files, self.inputs.out_paths, strict=True)),
            output_dir=output_dir,
            obsolete=obsolete,
        )
        self._results["out_files"] = [str(p) for p in written]
        return runtime


class _ReportInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="derivative dataset root")
    subject = traits.Str(mandatory=True, desc="subject label")
    published = traits.List(traits.Any, desc="published files (to wait for them)")
    log_path = traits.Str(desc="log of this invocation")


class _ReportOutputSpec(TraitedSpec):
    out_report = traits.Str(desc="participant HTML report")


class SubjectReport(SimpleInterface):
    """Build the participant's HTML report from the published outputs."""

    input_spec = _ReportInputSpec
    output_spec = _ReportOutputSpec

    def _run_interface(self, runtime):
        from ..reports.subject import build_subject_report

        log = Path(self.inputs.log_path) if isdefined(self.inputs.log_path) else None
        html = build_subject_report(Path(self.inputs.output_dir), self.inputs.subject, log_path=log)
        self._results["out_report"] = str(html)
        return runtime
