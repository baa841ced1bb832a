"""Find the DWI runs of a BIDS dataset (raw, or QSIPrep-style derivatives) with pybids."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# entities that do not carry over from input to output names
_DROPPED_ENTITIES = re.compile(r"_(space|desc)-[a-zA-Z0-9]+")


@dataclass(frozen=True)
class DWIRun:
    """One DWI series and the files that describe it.

    Attributes
    ----------
    dwi : Path
        The 4D NIfTI.
    bval, bvec, bmatrix : Path or None
        FSL gradient files and the MRtrix3 ``.b`` file, where present.
    mask : Path or None
        Brain mask shipped with the input (QSIPrep-style derivatives).
    subject, session : str or None
        Labels without their ``sub-``/``ses-`` prefix.
    stem : str
        Output name stem: input name without suffix, extension, ``space-`` or ``desc-``.
    space : str
        ``space-`` label for the outputs.
    relpath : str
        The DWI path relative to the input dataset root.

    """

    dwi: Path
    bval: Path | None
    bvec: Path | None
    bmatrix: Path | None
    mask: Path | None
    subject: str
    session: str | None
    stem: str
    space: str
    relpath: str
    entities: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def output_dir_rel(self) -> Path:
        """Folder of this run's derivatives, relative to the output root."""
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        return Path(*parts, "dwi")


def strip_label(label: str, prefix: str) -> str:
    """Remove a BIDS prefix such as ``sub-`` from a label if present.

    Parameters
    ----------
    label : str
        ``"sub-01"`` or ``"01"``.
    prefix : str
        ``"sub-"`` or ``"ses-"``.

    Returns
    -------
    str

    """
    return label[len(prefix) :] if label.startswith(prefix) else label


def detect_input_type(bids_dir: Path) -> str:
    """Tell raw BIDS from QSIPrep-style derivatives.

    Parameters
    ----------
    bids_dir : Path
        Dataset root.

    Returns
    -------
    {"raw", "qsiprep"}

    """
    description = bids_dir / "dataset_description.json"
    try:
        info = json.loads(description.read_text())
    except FileNotFoundError:
        raise InputError(
            description, "missing: bids_dir is not a BIDS dataset (no dataset_description.json)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(description, f"is not valid JSON ({exc})") from None
    if info.get("DatasetType") == "derivative":
        return "qsiprep"
    if any(bids_dir.glob("sub-*/**/dwi/*_desc-preproc_dwi.nii*")):
        return "qsiprep"
    return "raw"


def _output_stem(dwi: Path) -> str:
    name = dwi.name
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    name = name.removesuffix("_dwi")
    return _DROPPED_ENTITIES.sub("", name)


def _sibling(dwi: Path, extension: str) -> Path | None:
    for ext in NIFTI_EXTENSIONS:
        if dwi.name.endswith(ext):
            candidate = dwi.with_name(dwi.name[: -len(ext)] + extension)
            return candidate if candidate.exists() else None
    return None


def _load_filters(bids_filters: dict | None) -> dict:
    filters = dict((bids_filters or {}).get("dwi", {}))
    for key in ("subject", "suffix", "extension", "datatype"):
        if key in filters:
            raise InputError(
                None, f"--bids-filter-file: the 'dwi' query may not set {key!r} (qid2 sets it)"
            )
    return filters


def load_bids_filter_file(path: Path) -> dict:
    """Read an fMRIPrep-style ``--bids-filter-file`` (``{"dwi": {entity: value}}``).

    Parameters
    ----------
    path : Path
        JSON file.

    Returns
    -------
    dict

    """
    try:
        filters = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(filters, dict) or not isinstance(filters.get("dwi", {}), dict):
        raise InputError(path, 'must be a JSON object such as {"dwi": {"session": "01"}}')
    unknown = set(filters) - {"dwi"}
    if unknown:
        raise InputError(path, f"unknown queries {sorted(unknown)}; qid2 reads only 'dwi'")
    return filters


def collect_dwi_runs(
    bids_dir: Path,
    *,
    input_type: str = "auto",
    participant_labels: list[str] | None = None,
    session_ids: list[str] | None = None,
    bids_filters: dict | None = None,
) -> list[DWIRun]:
    """Query every DWI run to process.

    Parameters
    ----------
    bids_dir : Path
        Dataset root.
    input_type : {"auto", "raw", "qsiprep"}
        Raw BIDS, or QSIPrep-style derivatives (``*_space-*_desc-preproc_dwi``).
    participant_labels, session_ids : list of str, optional
        Restrict to these (with or without ``sub-``/``ses-``).
    bids_filters : dict, optional
        Extra pybids filters, ``{"dwi": {...}}``.

    Returns
    -------
    list of DWIRun
        Sorted by path.

    Raises
    ------
    InputError
        Unknown participants/sessions, or no DWI run matching the query.

    """
    from bids import BIDSLayout

    bids_dir = Path(bids_dir).resolve()
    if input_type == "auto":
        input_type = detect_input_type(bids_dir)
    is_derivative = input_type == "qsiprep"
    layout = BIDSLayout(
        str(bids_dir), validate=False, is_derivative=is_derivative, config=["bids", "derivatives"]
    )
    query = {
        "suffix": "dwi",
        "extension": list(NIFTI_EXTENSIONS),
        "return_type": "filename",
        **_load_filters(bids_filters),
    }
    if is_derivative:
        query["desc"] = "preproc"
    subjects = layout.get_subjects()
    if participant_labels:
        wanted = [strip_label(p, "sub-") for p in participant_labels]
        missing = sorted(set(wanted) - set(subjects))
        if missing:
            raise InputError(
                bids_dir,
                f"participant(s) not found: {', '.join('sub-' + m for m in missing)} "
                f"(found: {', '.join('sub-' + s for s in subjects) or 'none'})",
            )
        query["subject"] = wanted
    if session_ids:
        wanted_ses = [strip_label(s, "ses-") for s in session_ids]
        sessions = sorted(layout.get_sessions())
        missing = sorted(set(wanted_ses) - set(sessions))
        if missing:
            raise InputError(
                bids_dir,
                f"session(s) not found: {', '.join('ses-' + m for m in missing)} "
                f"(found: {', '.join('ses-' + s for s in sessions) or 'none'})",
            )
        query["session"] = wanted_ses
    files = sorted(layout.get(**query))
    if not files:
        kind = "QSIPrep-style '*_desc-preproc_dwi'" if is_derivative else "'dwi/*_dwi.nii[.gz]'"
        raise InputError(bids_dir, f"no {kind} files match the query")
    return [_make_run(layout, bids_dir, Path(f), is_derivative) for f in files]


def _make_run(layout, bids_dir: Path, dwi: Path, is_derivative: bool) -> DWIRun:
    entities = layout.parse_file_entities(str(dwi))
    bval = _sibling(dwi, ".bval")
    bvec = _sibling(dwi, ".bvec")
    if not is_derivative:
        # raw BIDS allows inherited gradient files higher up the tree
        bval = bval or _inherited(layout, dwi, "bval")
        bvec = bvec or _inherited(layout, dwi, "bvec")
    mask = None
    space = entities.get("space", "orig")
    if is_derivative:
        stem_path = str(dwi).split("_desc-preproc_dwi")[0]
        for ext in NIFTI_EXTENSIONS:
            candidate = Path(stem_path + "_desc-brain_mask" + ext)
            if candidate.exists():
                mask = candidate
                break
    return DWIRun(
        dwi=dwi,
        bval=bval,
        bvec=bvec,
        bmatrix=_sibling(dwi, ".b"),
        mask=mask,
        subject=entities["subject"],
        session=entities.get("session"),
        stem=_output_stem(dwi),
        space=space,
        relpath=str(dwi.relative_to(bids_dir)),
        entities={k: v for k, v in entities.items() if isinstance(v, str | int)},
    )


def _inherited(layout, dwi: Path, kind: str) -> Path | None:
    getter = layout.get_bval if kind == "bval" else layout.get_bvec
    try:
        found = getter(str(dwi))
    except Exception:  # pybids raises several types when nothing is found
        return None
    return Path(found) if found else None
