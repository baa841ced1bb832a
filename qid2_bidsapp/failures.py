"""Turn the ways a run can fail into one line a user can act on.

* `check_free_space`: before anything is written, the output and work folders must have room
  for the run's expected outputs (`expected_bytes`), so that a full disk is found in preflight
  rather than half-way (a full work folder could leave Nipype waiting on a node that never
  reports).
* `explain_failed_steps`: when workflow steps fail, read their crash files and, where the cause
  is the data or the machine rather than a bug (a qid2 ``InputError`` naming a file, no space
  left on the device, permission denied), say that in one line; otherwise the crash files are
  named for a bug report.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError

#: Expected output size: this many times the input DWI files, plus a fixed part per run.
OUTPUT_FACTOR = 4.0
OUTPUT_PER_RUN = 20 * 2**20
#: Expected work-folder size (Nipype keeps every step's outputs).
WORK_FACTOR = 12.0
WORK_PER_RUN = 50 * 2**20


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def expected_bytes(dwi_files: Iterable[Path]) -> tuple[int, int]:
    """Rough space a run needs: (output folder, work folder) in bytes.

    Parameters
    ----------
    dwi_files : iterable of Path
        The input DWI images of the runs.

    Returns
    -------
    tuple of int
        Output and work sizes: `OUTPUT_FACTOR` / `WORK_FACTOR` times the inputs' file sizes
        plus a fixed part per run (reports, figures, logs).

    """
    sizes = [Path(f).stat().st_size for f in dwi_files]
    n = len(sizes)
    total = sum(sizes)
    return (
        int(OUTPUT_FACTOR * total + OUTPUT_PER_RUN * n),
        int(WORK_FACTOR * total + WORK_PER_RUN * n),
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def check_free_space(output_dir: Path, work_dir: Path, dwi_files: list[Path]) -> None:
    """Refuse to start when the output or work folder's disk cannot hold the run.

    Parameters
    ----------
    output_dir, work_dir : Path
        Where the run writes (need not exist yet).
    dwi_files : list of Path
        The input DWI images.

    Raises
    ------
    InputError
        Naming the folder, the space needed and the space free.

    """
    out_need, work_need = expected_bytes(dwi_files)
    places = [(Path(output_dir), out_need, "output_dir"), (Path(work_dir), work_need, "work_dir")]
    same = _existing_parent(output_dir).stat().st_dev == _existing_parent(work_dir).stat().st_dev
    if same:  # one disk holds both
        places = [(Path(output_dir), out_need + work_need, "output_dir and work_dir")]
    for path, need, what in places:
        free = shutil.disk_usage(_existing_parent(path)).free
        if free < need:
            raise InputError(
                path,
                f"not enough free space for {what}: the run needs about {_mib(need)}, "
                f"{_mib(free)} are free; free some space or choose another folder (-w for the "
                "work folder)",
            )


#: Causes recognised in crash files: (pattern, sentence).
_CAUSES = (
    (re.compile(r"\[Errno 28\][^\n]*?'([^']+)'"), "no space left on the device while writing {0}"),
    (re.compile(r"\[Errno 28\]"), "no space left on the device"),
    (re.compile(r"\[Errno 122\][^\n]*?'([^']+)'"), "disk quota exceeded while writing {0}"),
    (re.compile(r"\[Errno 13\][^\n]*?'([^']+)'"), "permission denied for {0}"),
)
_INPUT_ERROR = re.compile(r"qid2_bidsapp\.errors\.InputError: (.+)")


def explain_failed_steps(crash_files: Iterable[Path]) -> str | None:
    """Read crash files and say in one sentence what went wrong, when it is not a bug.

    Parameters
    ----------
    crash_files : iterable of Path
        Nipype crash files (text format) of the failed steps.

    Returns
    -------
    str or None
        E.g. ``"no space left on the device while writing /out/...; free some space and rerun
        with the same -w"``, or the message of a qid2 ``InputError`` raised in a step; None
        when the crash looks like a bug.

    """
    for path in crash_files:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        match = _INPUT_ERROR.search(text)
        if match:
            return match.group(1).strip()
        for pattern, sentence in _CAUSES:
            match = pattern.search(text)
            if match:
                return sentence.format(*match.groups()) + "; fix it and rerun with the same -w"
    return None


#: Below this many free bytes a disk counts as full when steps failed without a crash file.
FULL_DISK_BYTES = 2**20


def full_disk(folders: Iterable[Path]) -> Path | None:
    """Return the first folder whose disk is (nearly) full, or None.

    Used when steps failed and Nipype could not write their crash files: a full output or
    work disk is then the likely cause, and the message says so instead of pointing at crash
    reports that do not exist.

    Parameters
    ----------
    folders : iterable of Path
        The folders the run writes to (need not exist).

    Returns
    -------
    Path or None

    """
    for folder in folders:
        try:
            free = shutil.disk_usage(_existing_parent(Path(folder))).free
        except OSError:
            continue
        if free < FULL_DISK_BYTES:
            return Path(folder)
    return None
