"""The workflow that up-samples one DWI run."""

from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import DWIRun
from ..config import Config
from ..derivatives import run_output_paths
from ..interfaces.dwi import (
    FitTensor,
    HiddenDirectionQC,
    LoadDWI,
    MergeDWI,
    PlanTargets,
    Upsample,
)
from ..interfaces.outputs import PublishRun, QCTable, Sidecars

# order of PublishRun's inputs; matches the keys of run_output_paths
PUBLISHED = (
    "dwi",
    "bval",
    "bvec",
    "b",
    "dwi_json",
    "mask",
    "mask_json",
    "dwiref",
    "dwiref_json",
    "fa_acquired",
    "fa_upsampled",
    "qc",
)
# published in addition by engines with an uncertainty map (qid2)
PUBLISHED_UNCERTAINTY = ("uncertainty", "uncertainty_json")

_SLICE_AXES = {"i": 0, "j": 1, "k": 2}


def slice_axis_of(dwi: Path) -> int:
    """Voxel axis of a DWI's slices, from ``SliceEncodingDirection`` in its JSON sidecar.

    Parameters
    ----------
    dwi : Path
        The DWI NIfTI; its sidecar is the ``.json`` beside it (not inherited ones).

    Returns
    -------
    int
        0, 1 or 2; 2 (the NIfTI's third axis) when the sidecar or the key is absent.

    """
    name = Path(dwi).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    try:
        meta = json.loads((Path(dwi).parent / f"{name}.json").read_text())
    except (OSError, ValueError):
        return 2
    value = str(meta.get("SliceEncodingDirection", "k")).strip().rstrip("-")
    return _SLICE_AXES.get(value, 2)


def _estimate_mem_gb(run: DWIRun, factor: float) -> float:
    import nibabel as nib

    shape = nib.load(str(run.dwi)).shape
    voxels = shape[0] * shape[1] * shape[2] * shape[3]
    return max(0.2, factor * voxels * 4 / 1e9)


def init_dwi_upsample_wf(*, run: DWIRun, config: Config, name: str = "dwi_upsample_wf"):
    """Up-sample one DWI run and publish its derivatives.

    Parameters
    ----------
    run : DWIRun
        The input run (paths and entities).
    config : Config
        Settings of the invocation.
    name : str
        Workflow name.

    Inputs
    ------
    dwi_file, bval_file, bvec_file, b_file, mask_file
        The run's files (``b_file``/``mask_file`` optional).

    Outputs
    -------
    dwi_file
        Merged DWI (work folder copy).
    fa_acquired, fa_upsampled
        FA maps.
    qc_file
        QC table.
    published
        Paths written into the output dataset.

    Returns
    -------
    nipype.pipeline.engine.Workflow

    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["dwi_file", "bval_file", "bvec_file", "b_file", "mask_file"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=["dwi_file", "fa_acquired", "fa_upsampled", "qc_file", "published"]
        ),
        name="outputnode",
    )
    threads = config.omp_nthreads
    engine_options = config.engine_options
    qid2 = config.engine == "qid2"
    use_gpu = False
    if qid2:
        from ..engines.qid2 import qid2_uses_cuda

        engine_options["slice_axis"] = slice_axis_of(run.dwi)
        use_gpu = qid2_uses_cuda(config.device)
    load = pe.Node(LoadDWI(), name="load_dwi", mem_gb=_estimate_mem_gb(run, 2))
    plan = pe.Node(PlanTargets(seed=config.random_seed), name="plan_targets")
    if config.shells:
        plan.inputs.shells = list(config.shells)
    if config.n_targets:
        plan.inputs.n_targets = config.n_targets
    if config.target_bvecs:
        plan.inputs.target_bvecs = str(config.target_bvecs)
    upsample = pe.Node(
        Upsample(
            engine=config.engine,
            engine_options=engine_options,
            num_threads=threads,
            use_gpu=use_gpu,
        ),
        name="upsample",
        n_procs=threads,
        mem_gb=_estimate_mem_gb(run, 6),
    )
    merge = pe.Node(MergeDWI(), name="merge", mem_gb=_estimate_mem_gb(run, 8))
    fit_acquired = pe.Node(FitTensor(num_threads=threads), name="fit_acquired", n_procs=threads)
    fit_upsampled = pe.Node(FitTensor(num_threads=threads), name="fit_upsampled", n_procs=threads)
    hidden = pe.Node(
        HiddenDirectionQC(
            engine=config.engine,
            engine_options=engine_options,
            num_threads=threads,
            seed=config.random_seed,
            use_gpu=use_gpu,
        ),
        name="hidden_qc",
        n_procs=threads,
        mem_gb=_estimate_mem_gb(run, 6),
    )
    if config.n_hidden is not None:
        hidden.inputs.n_hidden = config.n_hidden
    qc = pe.Node(
        QCTable(subject=run.subject, source=run.relpath, engine=config.engine), name="qc_table"
    )
    if run.session:
        qc.inputs.session = run.session
    sidecars = pe.Node(
        Sidecars(
            source=run.relpath,
            seed=config.random_seed,
            target_source=str(config.target_bvecs) if config.target_bvecs else "repulsion",
            mask_from_input=run.mask is not None,
        ),
        name="sidecars",
    )
    published = PUBLISHED + (PUBLISHED_UNCERTAINTY if qid2 else ())
    gather = pe.Node(niu.Merge(len(published)), name="gather_outputs", run_without_submitting=True)
    destinations = run_output_paths(run, config.output_dir)
    publish = pe.Node(
        PublishRun(
            out_paths=[str(destinations[key]) for key in published],
            output_dir=str(config.output_dir),
            obsolete_paths=[str(p) for k, p in destinations.items() if k not in published],
        ),
        name="publish",
        overwrite=True,  # always re-copy: the user may have deleted outputs
    )

    # fmt: off
    workflow.connect([
        (inputnode, load, [("dwi_file", "dwi_file"), ("bval_file", "bval_file"),
                           ("bvec_file", "bvec_file"), ("b_file", "b_file"),
                           ("mask_file", "mask_file")]),
        (load, plan, [("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (inputnode, upsample, [("dwi_file", "dwi_file")]),
        (load, upsample, [("bval_file", "bval_file"), ("bvec_file", "bvec_file"),
                          ("mask_file", "mask_file")]),
        (plan, upsample, [("plan_file", "plan_file")]),
        (inputnode, merge, [("dwi_file", "dwi_file")]),
        (load, merge, [("bval_file", "bval_file"), ("bvec_file", "bvec_file")]),
        (upsample, merge, [("synth_file", "synth_file"), ("synth_info", "synth_info")]),
        (inputnode, fit_acquired, [("dwi_file", "dwi_file")]),
        (load, fit_acquired, [("bval_file", "bval_file"), ("bvec_file", "bvec_file"),
                              ("mask_file", "mask_file")]),
        (merge, fit_upsampled, [("out_file", "dwi_file"), ("bval_file", "bval_file"),
                                ("bvec_file", "bvec_file")]),
        (load, fit_upsampled, [("mask_file", "mask_file")]),
        (inputnode, hidden, [("dwi_file", "dwi_file")]),
        (load, hidden, [("bval_file", "bval_file"), ("bvec_file", "bvec_file"),
                        ("mask_file", "mask_file")]),
        (plan, hidden, [("plan_file", "plan_file")]),
        (fit_acquired, hidden, [("fa_file", "fa_reference")]),
        (plan, qc, [("plan_file", "plan_file")]),
        (upsample, qc, [("synth_info", "synth_info")]),
        (hidden, qc, [("qc_file", "hidden_qc")]),
        (fit_acquired, qc, [("fa_file", "fa_acquired")]),
        (fit_upsampled, qc, [("fa_file", "fa_upsampled")]),
        (load, qc, [("mask_file", "mask_file")]),
        (load, sidecars, [("bval_file", "bval_file")]),
        (plan, sidecars, [("plan_file", "plan_file")]),
        (upsample, sidecars, [("synth_info", "synth_info")]),
        (gather, publish, [("out", "in_files")]),
        (merge, outputnode, [("out_file", "dwi_file")]),
        (fit_acquired, outputnode, [("fa_file", "fa_acquired")]),
        (fit_upsampled, outputnode, [("fa_file", "fa_upsampled")]),
        (qc, outputnode, [("out_file", "qc_file")]),
        (publish, outputnode, [("out_files", "published")]),
    ])
    # fmt: on
    sources = {
        "dwi": (merge, "out_file"),
        "bval": (merge, "bval_file"),
        "bvec": (merge, "bvec_file"),
        "b": (merge, "b_file"),
        "dwi_json": (sidecars, "dwi_json"),
        "mask": (load, "mask_file"),
        "mask_json": (sidecars, "mask_json"),
        "dwiref": (load, "dwiref_file"),
        "dwiref_json": (sidecars, "dwiref_json"),
        "fa_acquired": (fit_acquired, "fa_file"),
        "fa_upsampled": (fit_upsampled, "fa_file"),
        "qc": (qc, "out_file"),
        "uncertainty": (upsample, "uncertainty_file"),
        "uncertainty_json": (sidecars, "uncertainty_json"),
    }
    for index, key in enumerate(published, start=1):
        node, field = sources[key]
        workflow.connect(node, field, gather, f"in{index}")
    return workflow
