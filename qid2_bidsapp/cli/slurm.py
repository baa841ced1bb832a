"""``qid2-slurm``: submit a cohort to SLURM, one array task per participant and a group job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError, Qid2Error
from ..hpc_cohort import (
    DEPENDENCIES,
    CohortSpec,
    cohort_participants,
    container_command,
    default_qid2_command,
    group_script,
    mem_to_gb,
    participant_script,
    submit_cohort,
)
from .parser import _positive_int

# options of `qid2 participant` that qid2-slurm sets per task
_RESERVED = {
    "--participant-label": "give the participants to qid2-slurm (--participant-label)",
    "--participant_label": "give the participants to qid2-slurm (--participant-label)",
    "-w": "give the work folder to qid2-slurm (-w); each task uses WORK/sub-<label>",
    "--work-dir": "give the work folder to qid2-slurm (-w); each task uses WORK/sub-<label>",
}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, but not the empty ones (None, False, [])."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Build the qid2-slurm argument parser.

    Returns
    -------
    argparse.ArgumentParser

    """
    parser = argparse.ArgumentParser(
        prog="qid2-slurm",
        description=(
            "Submit qid2 on a cohort to SLURM: an array job with one task per participant "
            "(participants.tsv, else the sub-* folders), then a group job that runs when the "
            "array has ended. Options for 'qid2 participant' go after '--', e.g. "
            "qid2-slurm /data/bids /data/out -w /scratch/qid2 -- --engine sh"
        ),
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="the input dataset (raw BIDS or QSIPrep)")
    parser.add_argument("output_dir", type=Path, help="the qid2 derivative folder")
    parser.add_argument(
        "--participant-label",
        nargs="+",
        metavar="LABEL",
        help="participants to submit (default: participants.tsv, else every sub-* folder)",
    )
    parser.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        default=Path("work"),
        help="work folder on a file system the compute nodes share; task i uses WORK/sub-<label>",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        help="where the scripts and job logs go (default: OUTPUT_DIR/logs/slurm)",
    )
    res = parser.add_argument_group("Resources of each participant task")
    res.add_argument(
        "--cpus-per-task",
        type=_positive_int,
        default=8,
        metavar="N",
        help="CPUs per task, also qid2's --nprocs unless given after --",
    )
    res.add_argument(
        "--mem",
        default="32G",
        help="sbatch --mem per task (e.g. 32G, 16000M), also qid2's --mem-gb unless given after --",
    )
    res.add_argument("--time", default="12:00:00", help="sbatch --time limit")
    res.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="GPUs per task (--gres=gpu:N); default: 1 for the qid2 engine, 0 for sh/interp",
    )
    res.add_argument(
        "--max-parallel",
        type=_positive_int,
        metavar="N",
        help="at most N tasks at once (--array=...%%N)",
    )
    grp = parser.add_argument_group("The group job")
    grp.add_argument("--group-mem", default="8G", help="sbatch --mem of the group job")
    grp.add_argument("--group-time", default="01:00:00", help="sbatch --time of the group job")
    grp.add_argument(
        "--dependency",
        choices=DEPENDENCIES,
        default="afterany",
        help="afterany: the group job runs when every task has ended, summarises those that "
        "finished and then fails if any did not; afterok: it runs only if all succeeded (else "
        "it stays pending until cancelled)",
    )
    cluster = parser.add_argument_group("Cluster")
    cluster.add_argument("--partition", help="sbatch --partition")
    cluster.add_argument("--account", help="sbatch --account")
    cluster.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch option for both jobs, repeatable (e.g. --sbatch-arg=--qos=long)",
    )
    cluster.add_argument("--job-name", default="qid2", help="prefix of the job names")
    how = parser.add_argument_group("How qid2 is called")
    how.add_argument(
        "--container",
        metavar="IMAGE",
        help="run qid2 from this Apptainer/Singularity image (.sif or docker://...) with "
        "'apptainer run --cleanenv [--nv] -B ...': the dataset, output, work and log "
        "folders and files named in the qid2 options are bound at the same paths",
    )
    how.add_argument(
        "--container-runtime",
        choices=["apptainer", "singularity"],
        default="apptainer",
        help="the command that runs --container",
    )
    how.add_argument(
        "--bind",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="extra folder to bind into the container, repeatable",
    )
    how.add_argument(
        "--qid2-command",
        help="qid2 executable for the tasks (default: the qid2 of this installation)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print both scripts and the sbatch commands; submit and write nothing",
    )
    return parser


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def _check_qid2_args(extra: list[str], bids_dir: Path, output_dir: Path) -> argparse.Namespace:
    """Parse the pass-through options with qid2's own parser, so typos fail before submission."""
    from .parser import _build_parser

    for token in extra:
        name = token.split("=", 1)[0]
        if name in _RESERVED:
            raise Qid2Error(f"{token} after '--' is set per task: {_RESERVED[name]}")
    parser = _build_parser()
    parser.prog = "qid2 (options after --)"
    return parser.parse_args([str(bids_dir), str(output_dir), "participant", *extra])


def _binds(spec_paths: list[Path], ns: argparse.Namespace) -> list[Path]:
    """Folders the container must see: the cohort's, and those of files in the qid2 options."""
    binds = list(spec_paths)
    for name in ("model", "bids_filter_file", "target_bvecs", "plugin_file"):
        value = getattr(ns, name, None)
        if value is not None:
            path = Path(value).resolve()
            binds.append(path if path.is_dir() else path.parent)
    return binds


def make_spec(args: argparse.Namespace, extra: list[str]) -> tuple[CohortSpec, list[str]]:
    """Check the inputs and build the cohort; nothing is written.

    Parameters
    ----------
    args : argparse.Namespace
        qid2-slurm's options.
    extra : list of str
        Options for ``qid2 participant``.

    Returns
    -------
    spec : CohortSpec
    skipped : list of str
        Participants listed in participants.tsv without data.

    """
    from ..bids import detect_input_type
    from ..derivatives import check_output_dir

    bids_dir = args.bids_dir.resolve()
    output_dir = args.output_dir.resolve()
    work_dir = args.work_dir.resolve()
    log_dir = (args.log_dir or output_dir / "logs" / "slurm").resolve()
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "bids_dir does not exist or is not a folder")
    if any(ch.isspace() for ch in str(log_dir)):
        # #SBATCH --output lines cannot quote a path
        raise InputError(log_dir, "the log folder's path must not contain spaces (--log-dir)")
    ns = _check_qid2_args(extra, bids_dir, output_dir)
    check_output_dir(bids_dir, output_dir)
    participants, skipped = cohort_participants(bids_dir, args.participant_label)
    qid2_args = list(extra)
    input_type = ns.input_type if ns.input_type != "auto" else detect_input_type(bids_dir)
    if input_type == "raw" and not ns.skip_bids_validation:
        # once here, instead of once per task on the whole dataset
        from ..validation import validate_input

        result = validate_input(bids_dir)
        print(f"qid2-slurm: BIDS validation of {bids_dir}: {result.summary()}", file=sys.stderr)
        qid2_args.append("--skip-bids-validation")
    if ns.nprocs is None:
        qid2_args += ["--nprocs", str(args.cpus_per_task)]
    mem_gb = mem_to_gb(args.mem)
    if ns.mem_gb is None and mem_gb:
        qid2_args += ["--mem-gb", f"{mem_gb:g}"]
    gpus = args.gpus if args.gpus is not None else int(ns.engine == "qid2")
    if gpus < 0:
        raise Qid2Error(f"--gpus must be 0 or more, got {gpus}")
    path_dir = None
    if args.container:
        binds = _binds([bids_dir, output_dir, work_dir, log_dir, *args.bind], ns)
        command = container_command(
            args.container, binds, runtime=args.container_runtime, gpus=gpus
        )
    elif args.qid2_command:
        command = [args.qid2_command]
    else:
        command = default_qid2_command()
        path_dir = str(Path(command[0]).parent) if Path(command[0]).is_absolute() else None
    spec = CohortSpec(
        bids_dir=bids_dir,
        output_dir=output_dir,
        work_dir=work_dir,
        log_dir=log_dir,
        participants=participants,
        qid2_args=qid2_args,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        time=args.time,
        gpus=gpus,
        group_mem=args.group_mem,
        group_time=args.group_time,
        partition=args.partition,
        account=args.account,
        sbatch_args=list(args.sbatch_arg),
        max_parallel=args.max_parallel,
        dependency=args.dependency,
        qid2_command=command,
        path_dir=path_dir,
        job_name=args.job_name,
    )
    return spec, skipped


def main(argv: list[str] | None = None) -> int:
    """Run qid2-slurm.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``); options for qid2 after ``--``.

    Returns
    -------
    int
        0 when submitted (or printed), 1 on an error the user can act on, 2 on usage errors.

    """
    own, extra = _split_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    try:
        spec, skipped = make_spec(args, extra)
        for label in skipped:
            print(
                f"qid2-slurm: sub-{label} is in participants.tsv but has no folder: skipped",
                file=sys.stderr,
            )
        if args.dry_run:
            print(f"# {spec.participant_script_path}")
            print(participant_script(spec))
            print(f"# {spec.group_script_path}")
            print(group_script(spec))
            print(f"# sbatch --parsable {spec.participant_script_path}")
            print(
                f"# sbatch --parsable --dependency={spec.dependency}:<array job id> "
                f"{spec.group_script_path}"
            )
            return 0
        array_id, group_id = submit_cohort(spec)
    except Qid2Error as exc:
        print(f"qid2-slurm: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"qid2-slurm: participant array job {array_id} "
        f"({len(spec.participants)} task(s): {', '.join('sub-' + p for p in spec.participants)})"
    )
    print(f"qid2-slurm: group job {group_id} (starts {spec.dependency}:{array_id})")
    print(f"qid2-slurm: scripts and logs in {spec.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
