"""The workflow that up-samples one DWI run."""

from __future__ import annotations

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
    load = pe.Node(LoadDWI(), name="load_dwi", mem_gb=_estimate_mem_gb(run, 2))
    plan = pe.Node(PlanTargets(seed=config.random_seed), name="plan_targets")
    if config.shells:
        plan.inputs.shells = list(config.shells)
    if config.n_targets:
        plan.inputs.n_targets = config.n_targets
    if config.target_bvecs:
        plan.inputs.target_bvecs = str(config.target_bvecs)
    upsample = pe.Node(
        Upsample(engine=config.engine, engine_options=engine_options, num_threads=threads),
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
    gather = pe.Node(niu.Merge(len(PUBLISHED)), name="gather_outputs", run_without_submitting=True)
    destinations = run_output_paths(run, config.output_dir)
    publish = pe.Node(
        PublishRun(out_paths=[str(destinations[key]) for key in PUBLISHED]),
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
        (merge, gather, [("out_file", "in1"), ("bval_file", "in2"), ("bvec_file", "in3"),
                         ("b_file", "in4")]),
        (sidecars, gather, [("dwi_json", "in5")]),
        (load, gather, [("mask_file", "in6")]),
        (sidecars, gather, [("mask_json", "in7")]),
        (load, gather, [("dwiref_file", "in8")]),
        (sidecars, gather, [("dwiref_json", "in9")]),
        (fit_acquired, gather, [("fa_file", "in10")]),
        (fit_upsampled, gather, [("fa_file", "in11")]),
        (qc, gather, [("out_file", "in12")]),
        (gather, publish, [("out", "in_files")]),
        (merge, outputnode, [("out_file", "dwi_file")]),
        (fit_acquired, outputnode, [("fa_file", "fa_acquired")]),
        (fit_upsampled, outputnode, [("fa_file", "fa_upsampled")]),
        (qc, outputnode, [("out_file", "qc_file")]),
        (publish, outputnode, [("out_files", "published")]),
    ])
    # fmt: on
    return workflow
