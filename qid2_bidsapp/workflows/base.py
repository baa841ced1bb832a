"""Top-level workflows: the whole invocation, and one participant."""

from __future__ import annotations

import re

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..bids import DWIRun
from ..config import Config
from ..interfaces.outputs import SubjectReport
from .dwi import init_dwi_upsample_wf


def _safe_name(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "_", text)


def init_qid2_wf(*, config: Config, runs: list[DWIRun], log_path: str | None = None):
    """Build the workflow of one participant-level invocation.

    Parameters
    ----------
    config : Config
        Settings of the invocation.
    runs : list of DWIRun
        Every DWI run to process (already checked).
    log_path : str, optional
        Log file linked from the reports.

    Returns
    -------
    nipype.pipeline.engine.Workflow

    """
    workflow = pe.Workflow(name="qid2_wf")
    workflow.base_dir = str(config.work_dir)
    for subject in sorted({r.subject for r in runs}):
        subject_runs = [r for r in runs if r.subject == subject]
        workflow.add_nodes(
            [
                init_single_subject_wf(
                    config=config, subject=subject, runs=subject_runs, log_path=log_path
                )
            ]
        )
    return workflow


def init_single_subject_wf(
    *, config: Config, subject: str, runs: list[DWIRun], log_path: str | None = None
):
    """Up-sample every DWI run of one participant, then write the participant report.

    Parameters
    ----------
    config : Config
        Settings of the invocation.
    subject : str
        Subject label (no ``sub-``).
    runs : list of DWIRun
        The participant's runs (every session and ``acq-``/``dir-``/``run-``).
    log_path : str, optional
        Log file linked from the report.

    Returns
    -------
    nipype.pipeline.engine.Workflow

    """
    workflow = pe.Workflow(name=f"single_subject_{_safe_name(subject)}_wf")
    gather = pe.Node(niu.Merge(len(runs)), name="gather_published", run_without_submitting=True)
    report = pe.Node(
        SubjectReport(output_dir=str(config.output_dir), subject=subject),
        name="report",
        overwrite=True,
    )
    if log_path:
        report.inputs.log_path = log_path
    for index, run in enumerate(runs, start=1):
        run_wf = init_dwi_upsample_wf(run=run, config=config, name=f"{_safe_name(run.stem)}_wf")
        inputnode = run_wf.get_node("inputnode")
        inputnode.inputs.dwi_file = str(run.dwi)
        for field, path in (
            ("bval_file", run.bval),
            ("bvec_file", run.bvec),
            ("b_file", run.bmatrix),
            ("mask_file", run.mask),
        ):
            if path is not None:
                setattr(inputnode.inputs, field, str(path))
        workflow.connect(run_wf, "outputnode.published", gather, f"in{index}")
    workflow.connect(gather, "out", report, "published")
    return workflow


def set_slurm_node_args(workflow) -> None:
    """Give each node that Nipype's SLURM plugins submit as a job what it declares.

    Every node not run in the submitting process gets ``--cpus-per-task`` (its ``n_procs``),
    ``--mem`` (its ``mem_gb``) and, for nodes that run on a GPU, ``--gres=gpu:1``; these are
    appended to the plugin's own ``sbatch_args`` (later options win in sbatch).

    Parameters
    ----------
    workflow : nipype.pipeline.engine.Workflow
        From :func:`init_qid2_wf`.

    """
    from ..hpc_plugin import slurm_node_args

    for node in workflow._get_all_nodes():
        if node.run_without_submitting:
            continue
        mem_gb = node.mem_gb if node.mem_gb and node.mem_gb > 0.25 else None
        args = slurm_node_args(node.n_procs, mem_gb, node.is_gpu_node())
        node.plugin_args = {"sbatch_args": args, "overwrite": False}
