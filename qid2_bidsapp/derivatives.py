"""Write the BIDS derivative dataset: names, dataset_description.json, atomic publication."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from . import __version__
from .bids import DWIRun
from .errors import InputError

CODE_URL = "https://github.com/qid2/qid2"
PIPELINE_NAME = "qid2"

DERIVATIVE_README = """qid2 derivatives: q-space (angular) up-sampled diffusion MRI.

Each DWI run's *_desc-preproc_dwi holds the acquired volumes followed by synthesised ones
(see the sidecar's SynthesizedVolumes), with DTI FA maps of the acquired-only and merged data,
a QC table (*_desc-qc_dwiqc.tsv), and one HTML report per participant (sub-<label>.html).
With the diffusion engine (qid2), *_model-qid2_param-std_dwimap holds the uncertainty of each
synthesised volume (standard deviation of the model's samples).
Logs and the configuration of every invocation are in logs/.
"""

BIDSIGNORE_PATTERNS = (
    "# written by qid2: files the BIDS schema (1.11) has no filename rule for yet",
    "logs",
    "group",
    "group_qc.tsv",
    "group.html",
    "sub-*.html",
    "sub-*/figures",
    "*_dwi.bval",
    "*_dwi.bvec",
    "*_dwi.b",
    "*_dwiref.nii.gz",
    "*_dwiref.json",
    "*_dwimap.nii.gz",
    "*_dwimap.json",
    "*_dwiqc.tsv",
)


def run_output_paths(run: DWIRun, output_dir: Path) -> dict[str, Path]:
    """Return the final paths of one run's derivatives.

    Parameters
    ----------
    run : DWIRun
        The input run.
    output_dir : Path
        Derivative dataset root.

    Returns
    -------
    dict
        Keys: ``dwi``, ``bval``, ``bvec``, ``b``, ``dwi_json``, ``mask``, ``mask_json``,
        ``dwiref``, ``dwiref_json``, ``fa_acquired``, ``fa_upsampled``, ``qc``, and
        ``uncertainty``, ``uncertainty_json`` (written by the ``qid2`` engine only).

    """
    folder = Path(output_dir) / run.output_dir_rel
    base = f"{run.stem}_space-{run.space}"
    dwi = f"{base}_desc-preproc_dwi"
    return {
        "dwi": folder / f"{dwi}.nii.gz",
        "bval": folder / f"{dwi}.bval",
        "bvec": folder / f"{dwi}.bvec",
        "b": folder / f"{dwi}.b",
        "dwi_json": folder / f"{dwi}.json",
        "mask": folder / f"{base}_desc-brain_mask.nii.gz",
        "mask_json": folder / f"{base}_desc-brain_mask.json",
        "dwiref": folder / f"{base}_dwiref.nii.gz",
        "dwiref_json": folder / f"{base}_dwiref.json",
        "fa_acquired": folder / f"{base}_model-tensor_param-fa_desc-acquired_dwimap.nii.gz",
        "fa_upsampled": folder / f"{base}_model-tensor_param-fa_desc-upsampled_dwimap.nii.gz",
        "qc": folder / f"{base}_desc-qc_dwiqc.tsv",
        "uncertainty": folder / f"{base}_model-qid2_param-std_dwimap.nii.gz",
        "uncertainty_json": folder / f"{base}_model-qid2_param-std_dwimap.json",
    }


def check_writable_dir(path: Path, what: str = "folder") -> None:
    """Check that a folder exists and is writable, or can be created.

    Parameters
    ----------
    path : Path
        The folder (need not exist).
    what : str
        How to name it in the message (``output_dir``, ``work_dir``).

    Raises
    ------
    InputError
        When a regular file is in the way, the folder is not writable, or the nearest
        existing parent is not writable (one line, what to do).

    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, f"{what} is a file, not a folder; choose another path")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(probe, f"is a file, so {what} {path} cannot be created under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (needed to create {what} {path})"
        raise InputError(
            probe,
            f"is not writable by this user (uid {os.getuid()}){where}; choose a writable "
            f"{what} or fix its permissions",
        )


def check_output_dir(bids_dir: Path, output_dir: Path) -> None:
    """Refuse output folders that would mix with or overwrite someone's data.

    Parameters
    ----------
    bids_dir, output_dir : Path
        Input dataset and output folder.

    Raises
    ------
    InputError
        ``output_dir`` is the input, inside it (except under ``derivatives/``), contains it,
        or holds another pipeline's dataset.

    """
    bids_dir = Path(bids_dir).resolve()
    output_dir = Path(output_dir).resolve()
    check_writable_dir(output_dir, "output_dir")
    if output_dir == bids_dir or bids_dir.is_relative_to(output_dir):
        raise InputError(output_dir, "output_dir must not be the input dataset or contain it")
    if output_dir.is_relative_to(bids_dir) and not output_dir.is_relative_to(
        bids_dir / "derivatives"
    ):
        raise InputError(
            output_dir,
            "output_dir is inside the input dataset; use a folder outside it or under "
            f"{bids_dir / 'derivatives'}",
        )
    description = output_dir / "dataset_description.json"
    if description.exists():
        try:
            info = json.loads(description.read_text())
        except json.JSONDecodeError:
            raise InputError(
                description, "exists but is not valid JSON; refusing to overwrite"
            ) from None
        names = [g.get("Name") for g in info.get("GeneratedBy", []) if isinstance(g, dict)]
        if info.get("DatasetType") != "derivative" or PIPELINE_NAME not in names:
            raise InputError(
                output_dir, "holds another dataset (not a qid2 derivative); choose an empty folder"
            )
        previous_input = info.get("DatasetLinks", {}).get("input")
        if previous_input and previous_input != bids_dir.as_uri():
            raise InputError(
                output_dir,
                f"holds qid2 outputs of another input dataset ({previous_input}); "
                "use one output folder per input dataset",
            )


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs) -> Iterator:
    """Open a file so that readers see either the old or the complete new content.

    The data go to a hidden temporary file in the same folder (created with ``open``, so with
    the umask's mode like every other output), which replaces `path` when the block ends
    without an error; on an error it is removed and `path` is left as it was.

    Parameters
    ----------
    path : Path
        Destination; its folder is created when missing.
    mode : {"w", "wb"}
        Text or binary.
    **kwargs
        Passed to `open` (e.g. ``encoding``).

    Yields
    ------
    file object

    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **kwargs) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write a UTF-8 text file atomically (`atomic_open`).

    Parameters
    ----------
    path : Path
        Destination; its folder is created when missing.
    text : str
        Content.

    Returns
    -------
    Path
        ``path``.

    """
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return Path(path)


@contextlib.contextmanager
def locked(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder's shared files (concurrent jobs).

    Parameters
    ----------
    output_dir : Path
        Derivative dataset root.

    """
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".qid2.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def container_info() -> dict | None:
    """Describe the container qid2 runs in, from variables the image sets.

    Returns
    -------
    dict or None
        BIDS ``Container`` object (``Type``, ``Tag``), or None outside a container.

    """
    # Apptainer first: it runs Docker images, whose environment still says "docker"
    kind = "apptainer" if os.environ.get("APPTAINER_CONTAINER") else None
    kind = kind or os.environ.get("QID2_CONTAINER_TYPE")
    if not kind and Path("/.dockerenv").exists():
        kind = "docker"
    if not kind:
        return None
    info = {"Type": kind}
    tag = os.environ.get("QID2_CONTAINER_TAG")
    if tag:
        info["Tag"] = tag
    return info


def write_dataset_description(output_dir: Path, bids_dir: Path) -> Path:
    """Create or update the derivative's ``dataset_description.json`` and ``.bidsignore``.

    Parameters
    ----------
    output_dir : Path
        Derivative dataset root.
    bids_dir : Path
        Input dataset (recorded in ``SourceDatasets``).

    Returns
    -------
    Path
        The description file.

    """
    output_dir = Path(output_dir)
    generated_by = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL}
    container = container_info()
    if container:
        generated_by["Container"] = container
    source = {"URL": Path(bids_dir).resolve().as_uri()}
    try:
        source_info = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
        if source_info.get("DatasetDOI"):
            source["DOI"] = source_info["DatasetDOI"]
    except (OSError, json.JSONDecodeError):
        pass
    description = {
        "Name": "qid2: q-space up-sampled diffusion MRI",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [source],
        "DatasetLinks": {"input": source["URL"]},
        "HowToAcknowledge": (
            "Cite QID2 (Chen, Wang, Venkataraman 2024, arXiv:2409.02309) and the tools listed "
            "in the methods section of the participant reports."
        ),
    }
    path = output_dir / "dataset_description.json"
    with locked(output_dir):
        atomic_write_text(path, json.dumps(description, indent=2) + "\n")
        atomic_write_text(output_dir / ".bidsignore", "\n".join(BIDSIGNORE_PATTERNS) + "\n")
        atomic_write_text(output_dir / "README", DERIVATIVE_README)
    return path


#: Temporary names of `publish` and `atomic_open`: ``.<name>.<32 hex digits>.tmp``.
_TMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def sweep_stale_tmp(folder: Path) -> list[Path]:
    """Remove temporary files that a killed qid2 left in a folder.

    Call it only while holding `locked` on the output folder: every publisher stages and
    renames its files under that lock, so a temporary file found then belongs to a process
    that died (SIGKILL, power loss) and can go.

    Parameters
    ----------
    folder : Path
        A destination folder.

    Returns
    -------
    list of Path
        The files removed.

    """
    removed = []
    if not Path(folder).is_dir():
        return removed
    for path in Path(folder).iterdir():
        if path.is_file() and _TMP_PATTERN.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def publish(
    files: Mapping[Path | str, Path | str],
    *,
    output_dir: Path | str | None = None,
    obsolete: Iterable[Path | str] = (),
) -> list[Path]:
    """Copy finished files into the output folder, all or nothing.

    Every source is first copied to a hidden temporary name beside its destination; only when
    all copies succeeded are they renamed into place (``os.replace``, atomic per file). On any
    failure the temporary copies are removed and no destination is touched. With
    `output_dir`, this happens under the output folder's lock (`locked`), after removing the
    temporary files a killed run left in the destination folders (`sweep_stale_tmp`), and the
    `obsolete` files (outputs of an earlier run of the same input that this run does not
    produce, e.g. a qid2 uncertainty map after a rerun with ``--engine sh``) are removed once
    the new files are in place.

    Parameters
    ----------
    files : mapping
        ``{source: destination}``.
    output_dir : Path, optional
        The derivative dataset root (for the lock).
    obsolete : iterable of Path
        Destinations of this run that the new outputs do not include.

    Returns
    -------
    list of Path
        The destinations written.

    """
    context = locked(Path(output_dir)) if output_dir is not None else contextlib.nullcontext()
    with context:
        if output_dir is not None:
            for folder in {Path(dst).parent for dst in files.values()}:
                sweep_stale_tmp(folder)
        staged: list[tuple[Path, Path]] = []
        token = uuid.uuid4().hex
        try:
            for src, dst in files.items():
                dst = Path(dst)
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.{token}.tmp")
                staged.append((tmp, dst))  # before copying: a copy that fails half-way counts
                shutil.copyfile(src, tmp)
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, dst in staged:
            os.replace(tmp, dst)
        keep = {dst for _, dst in staged}
        for path in obsolete:
            if Path(path) not in keep:
                Path(path).unlink(missing_ok=True)
    return [dst for _, dst in staged]
