"""SLURM cohorts: one array task per participant, then a group job (``qid2-slurm``).

Plain functions: which participants, the two sbatch scripts as text, and their submission.
"""

from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .bids import strip_label
from .errors import InputError, Qid2Error

DEPENDENCIES = ("afterany", "afterok")
_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_MEM_GB = {"K": 1 / 1024**2, "M": 1 / 1024, "": 1 / 1024, "G": 1.0, "T": 1024.0}


def cohort_participants(
    bids_dir: Path, labels: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """Return the participants to submit, one array task each.

    ``--participant-label`` when given, else the ``participant_id`` column of
    ``participants.tsv``, else every ``sub-*`` folder (QSIPrep derivatives have no
    ``participants.tsv``).

    Parameters
    ----------
    bids_dir : Path
        Input dataset.
    labels : list of str, optional
        Labels with or without ``sub-``.

    Returns
    -------
    participants : list of str
        Labels without ``sub-``, in the order given (else sorted / table order).
    skipped : list of str
        Listed in ``participants.tsv`` without a ``sub-<label>`` folder (not submitted).

    Raises
    ------
    InputError
        Unknown labels, a ``participants.tsv`` without ``participant_id``, or no participant.

    """
    bids_dir = Path(bids_dir)
    folders = sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())
    skipped: list[str] = []
    if labels:
        wanted = list(dict.fromkeys(strip_label(label, "sub-") for label in labels))
        missing = [w for w in wanted if w not in folders]
        if missing:
            raise InputError(
                bids_dir,
                f"participant(s) not found: {', '.join('sub-' + m for m in missing)} "
                f"(found: {', '.join('sub-' + f for f in folders) or 'none'})",
            )
        return wanted, skipped
    table = bids_dir / "participants.tsv"
    if table.is_file():
        with open(table, newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            if "participant_id" not in (reader.fieldnames or []):
                raise InputError(table, "has no 'participant_id' column")
            listed = [strip_label(row["participant_id"].strip(), "sub-") for row in reader]
        listed = list(dict.fromkeys(label for label in listed if label))
        participants = [label for label in listed if label in folders]
        skipped = [label for label in listed if label not in folders]
    else:
        participants = folders
    if not participants:
        raise InputError(bids_dir, "no participants to process (no sub-* folder)")
    return participants, skipped


def mem_to_gb(mem: str) -> float | None:
    """Convert a SLURM ``--mem`` value (``32G``, ``16000M``, ``16000``) to GB.

    Parameters
    ----------
    mem : str
        As given to sbatch (no unit: megabytes).

    Returns
    -------
    float or None
        None when the value is not a plain size.

    """
    match = _MEM.match(mem)
    if not match:
        return None
    return float(match.group(1)) * _MEM_GB[match.group(2).upper()]


@dataclass
class CohortSpec:
    """Everything the two sbatch scripts need.

    Attributes
    ----------
    bids_dir, output_dir, work_dir, log_dir : Path
        Absolute folders; each task works in ``work_dir/sub-<label>``.
    participants : list of str
        One array task each.
    qid2_args : list of str
        Extra options for ``qid2 ... participant`` (after ``--`` on the command line).
    cpus_per_task, mem, time, gpus : resources of each participant task.
    group_cpus, group_mem, group_time : resources of the group job.
    partition, account : str or None
        Where to run and who pays.
    sbatch_args : list of str
        Extra ``#SBATCH`` options for both jobs.
    max_parallel : int or None
        Array throttle (``--array=0-N%max_parallel``).
    dependency : {"afterany", "afterok"}
        When the group job may start.
    qid2_command : list of str
        How to call qid2 (absolute path, or a container runtime and image).
    path_dir : str or None
        Folder put first on the tasks' PATH (the installation's ``bin``).
    job_name : str
        Prefix of the job names.
    stamp : str
        Unique name of this submission (log and script names).

    """

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    log_dir: Path
    participants: list[str]
    qid2_args: list[str] = field(default_factory=list)
    cpus_per_task: int = 8
    mem: str = "32G"
    time: str = "12:00:00"
    gpus: int = 0
    group_cpus: int = 1
    group_mem: str = "8G"
    group_time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    max_parallel: int | None = None
    dependency: str = "afterany"
    qid2_command: list[str] = field(default_factory=lambda: ["qid2"])
    path_dir: str | None = None
    job_name: str = "qid2"
    stamp: str = field(
        default_factory=lambda: time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    )

    def done_marker(self, label: str) -> Path:
        """File a participant task writes when qid2 finished without error."""
        return self.log_dir / f"qid2-{self.stamp}_sub-{label}.done"

    @property
    def participant_script_path(self) -> Path:
        """Where the array script is written."""
        return self.log_dir / f"qid2-{self.stamp}_participant.sbatch"

    @property
    def group_script_path(self) -> Path:
        """Where the group script is written."""
        return self.log_dir / f"qid2-{self.stamp}_group.sbatch"


def _sbatch_header(lines: list[str], spec: CohortSpec) -> list[str]:
    common = []
    if spec.partition:
        common.append(f"#SBATCH --partition={spec.partition}")
    if spec.account:
        common.append(f"#SBATCH --account={spec.account}")
    common += [f"#SBATCH {arg}" for arg in spec.sbatch_args]
    return ["#!/bin/bash", *lines, *common]


def _q(value) -> str:
    return shlex.quote(str(value))


def _preamble(spec: CohortSpec) -> list[str]:
    lines = [
        f"# written by qid2-slurm {__version__} ({spec.stamp}); submit with sbatch",
        "set -uo pipefail",
    ]
    if spec.path_dir:
        lines.append(f'export PATH={_q(spec.path_dir)}:"$PATH"')
    return lines


def participant_script(spec: CohortSpec) -> str:
    """Render the array script: task ``i`` runs qid2 on participant ``i``.

    Parameters
    ----------
    spec : CohortSpec
        The cohort.

    Returns
    -------
    str

    """
    last = len(spec.participants) - 1
    array = f"0-{last}" + (f"%{spec.max_parallel}" if spec.max_parallel else "")
    header = [
        f"#SBATCH --job-name={spec.job_name}-participant",
        f"#SBATCH --array={array}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={spec.cpus_per_task}",
        f"#SBATCH --mem={spec.mem}",
        f"#SBATCH --time={spec.time}",
        f"#SBATCH --output={spec.log_dir}/qid2-{spec.stamp}_participant_%A_%a.log",
    ]
    if spec.gpus:
        header.append(f"#SBATCH --gres=gpu:{spec.gpus}")
    labels = " ".join(_q(label) for label in spec.participants)
    command = [
        *map(_q, spec.qid2_command),
        _q(spec.bids_dir),
        _q(spec.output_dir),
        "participant",
        '--participant-label "$LABEL"',
        f'-w {_q(spec.work_dir)}/sub-"$LABEL"',
        *map(_q, spec.qid2_args),
    ]
    done = _q(spec.log_dir) + f'/qid2-{spec.stamp}_sub-"$LABEL".done'
    body = [
        *_preamble(spec),
        f"LABELS=({labels})",
        'LABEL="${LABELS[$SLURM_ARRAY_TASK_ID]}"',
        'echo "qid2-slurm: sub-$LABEL, task $SLURM_ARRAY_TASK_ID of job '
        '${SLURM_ARRAY_JOB_ID:-?} on $(hostname)"',
        " ".join(command),
        "status=$?",
        f'if [ "$status" -eq 0 ]; then touch {done}; fi',
        'exit "$status"',
    ]
    return "\n".join([*_sbatch_header(header, spec), "", *body]) + "\n"


def group_script(spec: CohortSpec) -> str:
    """Render the group job: the QC table of all participants, then a check that each finished.

    It fails (so that ``sacct``/``squeue`` show it) when a participant task of this submission
    left no completion marker, after writing the group report of those that did.

    Parameters
    ----------
    spec : CohortSpec
        The cohort.

    Returns
    -------
    str

    """
    header = [
        f"#SBATCH --job-name={spec.job_name}-group",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={spec.group_cpus}",
        f"#SBATCH --mem={spec.group_mem}",
        f"#SBATCH --time={spec.group_time}",
        f"#SBATCH --output={spec.log_dir}/qid2-{spec.stamp}_group_%j.log",
    ]
    labels = " ".join(_q(label) for label in spec.participants)
    command = [*map(_q, spec.qid2_command), _q(spec.bids_dir), _q(spec.output_dir), "group"]
    marker = _q(spec.log_dir) + f'/qid2-{spec.stamp}_sub-"$LABEL".done'
    body = [
        *_preamble(spec),
        " ".join(command) + ' || exit "$?"',
        "missing=()",
        f"for LABEL in {labels}; do",
        f'  [ -e {marker} ] || missing+=("sub-$LABEL")',
        "done",
        'if [ "${#missing[@]}" -gt 0 ]; then',
        '  echo "qid2-slurm: ${#missing[@]} participant(s) did not finish: ${missing[*]}; '
        f'see {spec.log_dir}/qid2-{spec.stamp}_participant_*.log" >&2',
        "  exit 1",
        "fi",
        f'echo "qid2-slurm: all {len(spec.participants)} participant(s) finished"',
    ]
    return "\n".join([*_sbatch_header(header, spec), "", *body]) + "\n"


def _sbatch(args: list[str]) -> str:
    try:
        proc = subprocess.run(
            ["sbatch", "--parsable", *args], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise Qid2Error("sbatch is not on the PATH: run qid2-slurm on a SLURM login node") from None
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise Qid2Error(f"sbatch {' '.join(args)} failed: {message[-1] if message else '?'}")
    return proc.stdout.strip().split(";")[0]


def submit_cohort(spec: CohortSpec) -> tuple[str, str]:
    """Write both scripts into the log folder and submit them, the group job after the array.

    Parameters
    ----------
    spec : CohortSpec
        The cohort.

    Returns
    -------
    array_id, group_id : str
        SLURM job ids.

    Raises
    ------
    Qid2Error
        When sbatch refuses a script (the array job id is named if only the group failed).

    """
    from .derivatives import atomic_write_text

    spec.log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec.participant_script_path, participant_script(spec))
    atomic_write_text(spec.group_script_path, group_script(spec))
    array_id = _sbatch([str(spec.participant_script_path)])
    try:
        group_id = _sbatch(
            [f"--dependency={spec.dependency}:{array_id}", str(spec.group_script_path)]
        )
    except Qid2Error as exc:
        raise Qid2Error(
            f"{exc} (the participant array job {array_id} was submitted; cancel it with "
            f"scancel {array_id} or submit {spec.group_script_path} yourself)"
        ) from None
    return array_id, group_id


def default_qid2_command() -> list[str]:
    """Return the ``qid2`` of this installation (absolute), else ``qid2`` from the PATH."""
    beside = Path(sys.executable).parent / "qid2"
    if beside.is_file():
        return [str(beside)]
    import shutil

    found = shutil.which("qid2")
    return [found] if found else ["qid2"]


def container_command(
    image: str, binds: list[Path], *, runtime: str = "apptainer", gpus: int = 0
) -> list[str]:
    """``apptainer run`` prefix that calls the image's qid2 entry point.

    Parameters
    ----------
    image : str
        ``.sif`` file or URI (``docker://...``).
    binds : list of Path
        Folders made visible at the same path inside the container.
    runtime : str
        ``apptainer`` or ``singularity``.
    gpus : int
        With GPUs, ``--nv`` passes the NVIDIA driver in.

    Returns
    -------
    list of str

    """
    command = [runtime, "run", "--cleanenv"]
    if gpus:
        command.append("--nv")
    for path in dict.fromkeys(str(b) for b in binds):
        command += ["-B", f"{path}:{path}"]
    return [*command, image]
