"""Participant report: one HTML page per subject, built only from the qid2 derivative folder.

Everything the report shows is read back from the files documented in ``docs/outputs.md``, so
``--reports-only`` can rebuild it at any time without re-running the up-sampling.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np

from ..derivatives import atomic_write_text
from ..errors import InputError
from ..trust import small_field_of_view
from . import figures
from .methods import methods_paragraph

__all__ = [
    "QC_COLUMN_HELP",
    "build_subject_report",
    "find_subject_runs",
    "format_value",
    "read_tsv",
    "render_template",
]

PREPROC_SUFFIX = "_desc-preproc_dwi.nii.gz"
B0_THRESHOLD = 50.0
N_SLICES = 4
N_EXAMPLES = 3

#: One-line explanation of each QC column (docs/outputs.md).
QC_COLUMN_HELP: dict[str, str] = {
    "subject": "subject label",
    "session": "session label (n/a without sessions)",
    "source": "the input DWI run",
    "shell": "b-value of the shell (s/mm²)",
    "n_acquired": "directions acquired in this shell",
    "n_synthesized": "directions added by up-sampling",
    "engine": "up-sampling engine used",
    "gap_acquired_deg": "largest angular gap between acquired directions (degrees, antipodal)",
    "gap_merged_deg": "largest angular gap after up-sampling (degrees): smaller is denser",
    "hidden_n": "acquired directions hidden for the self-check",
    "hidden_nrmse": "self-check: error of hidden volumes predicted from the rest, "
    "‖pred − acq‖ / ‖acq‖ in the mask (near the noise level is the best possible)",
    "hidden_fa_mae": "self-check: mean |ΔFA| in the mask when hidden volumes are replaced "
    "by their predictions",
    "fa_mean_acquired": "mean FA in the mask, DTI on acquired volumes only",
    "fa_mean_upsampled": "mean FA in the mask, DTI on the merged (up-sampled) DWI",
    "fa_mae_upsampled_vs_acquired": "mean |FA upsampled − FA acquired| in the mask",
    "hidden_nrmse_sh": "self-check NRMSE of the classical sh engine on the same hidden "
    "directions (the baseline)",
    "noise_sigma_rel": "noise standard deviation of the scan / median b=0 signal in the mask",
    "noise_method": "how the noise was measured: b0 repeats, or the tensor-fit residual "
    "(model misfit counts as noise) when there is one b=0 volume; the median over the brain",
    "hidden_nrmse_floor": "self-check NRMSE a perfect prediction would score: the hidden "
    "volumes' own noise, σ / RMS(hidden signal)",
    "fa_change_upsampled": "mean (FA upsampled − FA acquired) in the mask, signed",
    "trust": "verdict of the three trust checks (the participant report's 'Can this "
    "up-sampling be trusted?'): pass when all that could be computed pass, warn when one warns, "
    "n/a when none could be computed",
    "trust_warnings": "checks that warned",
    "runtime_s": "wall time of the up-sampling of this shell (seconds)",
}
RUN_COLUMNS = ("subject", "session", "source")
#: Columns holding labels, shown verbatim (``01`` must stay ``01``).
TEXT_COLUMNS = frozenset({*RUN_COLUMNS, "engine", "noise_method", "trust", "trust_warnings"})


# --------------------------------------------------------------------------- shared helpers


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a tab-separated table with a header line.

    Parameters
    ----------
    path : Path
        The TSV file.

    Returns
    -------
    columns : list of str
        Header, in file order.
    rows : list of dict
        One ``{column: text}`` per line (missing cells are ``"n/a"``).

    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t", restval="n/a")
        rows = [dict(r) for r in reader]
        columns = list(reader.fieldnames or [])
    return columns, rows


def format_value(text: str | None, column: str | None = None) -> str:
    """Format a TSV cell for display: integers as such, floats to 4 significant digits.

    Cells of label columns (:data:`TEXT_COLUMNS`) are returned unchanged.
    """
    if text is None or text == "":
        return "n/a"
    if column in TEXT_COLUMNS:
        return text
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


@cache
def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("qid2_bidsapp.reports", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def render_template(name: str, **context) -> str:
    """Render one of the package's Jinja2 templates.

    Parameters
    ----------
    name : str
        Template file name in ``qid2_bidsapp/reports/templates``.
    **context
        Template variables.

    Returns
    -------
    str
        The rendered HTML.

    """
    return _environment().get_template(name).render(**context)


def _href(base: Path, target: Path) -> str:
    """Link from a page in ``base`` to ``target``: relative inside ``base``, else a file URI."""
    try:
        return Path(target).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return Path(target).resolve().as_uri()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _mtime(path: Path) -> str:
    stamp = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M UTC")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read JSON: {exc}") from exc


def dataset_generated_by(output_dir: Path) -> list[dict]:
    """Return ``GeneratedBy`` of the derivative's ``dataset_description.json`` (or ``[]``)."""
    path = Path(output_dir) / "dataset_description.json"
    if not path.is_file():
        return []
    try:
        generated = _read_json(path).get("GeneratedBy", [])
    except InputError:
        return []
    return [g for g in generated if isinstance(g, dict)]


# --------------------------------------------------------------------------- run files


@dataclass(frozen=True)
class RunFiles:
    """The derivative files of one DWI run (docs/outputs.md)."""

    dwi: Path

    @property
    def prefix(self) -> str:
        """``<stem>_space-<space>``: the file name before ``_desc-preproc_dwi.nii.gz``."""
        return self.dwi.name[: -len(PREPROC_SUFFIX)]

    def sibling(self, suffix: str) -> Path:
        """Return ``<prefix><suffix>`` in the run's folder."""
        return self.dwi.with_name(self.prefix + suffix)

    @property
    def session(self) -> str | None:
        """The ``ses-`` label, or None."""
        for entity in self.prefix.split("_"):
            if entity.startswith("ses-"):
                return entity[4:]
        return None


def find_subject_runs(output_dir: Path, subject: str) -> list[RunFiles]:
    """Find every up-sampled DWI run of one subject in the qid2 output.

    Parameters
    ----------
    output_dir : Path
        The qid2 derivative folder.
    subject : str
        Subject label, with or without ``sub-``.

    Returns
    -------
    list of RunFiles
        Sorted by path; empty when the subject has no runs.

    """
    label = subject.removeprefix("sub-")
    root = Path(output_dir) / f"sub-{label}"
    return [RunFiles(p) for p in sorted(root.glob(f"**/dwi/*{PREPROC_SUFFIX}"))]


def load_gradients(bval_path: Path, bvec_path: Path, n_volumes: int):
    """Read an FSL gradient table and check it against the number of volumes.

    Parameters
    ----------
    bval_path, bvec_path : Path
        FSL ``.bval`` and ``.bvec`` files.
    n_volumes : int
        Volumes in the DWI.

    Returns
    -------
    bvals : ndarray, shape (N,)
        b-values.
    bvecs : ndarray, shape (N, 3)
        Unit vectors (zero rows stay zero).

    Raises
    ------
    InputError
        When a file is missing, unreadable or does not match the DWI.

    """
    for path in (bval_path, bvec_path):
        if not path.is_file():
            raise InputError(path, "missing: the run's gradient table is incomplete")
    try:
        bvals = np.loadtxt(bval_path, ndmin=1).astype(float).ravel()
        bvecs = np.loadtxt(bvec_path, ndmin=2).astype(float)
    except ValueError as exc:
        raise InputError(bval_path, f"cannot read the gradient table: {exc}") from exc
    if bvecs.shape[0] == 3 and bvecs.shape[1] != 3:
        bvecs = bvecs.T
    elif bvecs.shape == (3, 3):
        bvecs = bvecs.T  # FSL layout is 3 rows
    if bvals.size != n_volumes or bvecs.shape != (n_volumes, 3):
        raise InputError(
            bvec_path,
            f"gradient table has {bvals.size} b-values / {bvecs.shape} vectors "
            f"for {n_volumes} volumes",
        )
    norms = np.linalg.norm(bvecs, axis=1)
    bvecs = np.where(norms[:, None] > 1e-6, bvecs / np.maximum(norms, 1e-12)[:, None], 0.0)
    return bvals, bvecs


def assign_shells(bvals: np.ndarray, shells: Sequence[float]) -> np.ndarray:
    """Index of the nearest shell for each volume, or -1 for b=0 and volumes of other shells.

    Parameters
    ----------
    bvals : ndarray, shape (N,)
        b-values.
    shells : sequence of float
        Shell b-values.

    Returns
    -------
    ndarray of int, shape (N,)
        Shell index per volume.

    """
    out = np.full(len(bvals), -1, dtype=int)
    if len(shells) == 0:
        return out
    shells_arr = np.asarray(shells, dtype=float)
    dist = np.abs(np.asarray(bvals, float)[:, None] - shells_arr[None, :])
    nearest = dist.argmin(axis=1)
    tol = np.maximum(100.0, 0.15 * shells_arr[nearest])
    ok = (bvals > B0_THRESHOLD) & (dist[np.arange(len(bvals)), nearest] <= tol)
    out[ok] = nearest[ok]
    return out


def choose_slices(mask: np.ndarray, n: int = N_SLICES) -> list[int]:
    """Pick up to ``n`` axial slices spread evenly through the mask.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask (an empty mask uses the whole volume).
    n : int, optional
        Number of slices.

    Returns
    -------
    list of int
        Sorted slice indices.

    """
    z = np.flatnonzero(mask.any(axis=(0, 1))) if mask.any() else np.arange(mask.shape[2])
    if z.size <= n:
        return [int(i) for i in z]
    positions = np.linspace(z[0], z[-1], n + 2)[1:-1]
    return sorted({int(round(p)) for p in positions})


@dataclass(frozen=True)
class Example:
    """A synthesised volume and the acquired volume nearest to it in direction."""

    synthesized: int
    nearest: int
    angle_deg: float
    bval: float


def pick_examples(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    acquired: Sequence[int],
    synthesized: Sequence[int],
    shell_of: np.ndarray,
    shells: Sequence[float],
    n: int = N_EXAMPLES,
) -> list[Example]:
    """Choose up to ``n`` synthesised volumes to show, each with its nearest acquired volume.

    Nearness is the antipodally symmetric ``|g·b|`` within the same shell. With one shell the
    volumes farthest from, at the median distance from, and closest to the acquired directions
    are shown; with several, the farthest of each shell.

    Parameters
    ----------
    bvals : ndarray, shape (N,)
        b-values of the merged DWI.
    bvecs : ndarray, shape (N, 3)
        Unit gradient directions of the merged DWI.
    acquired, synthesized : sequence of int
        Volume indices in the merged DWI.
    shell_of : ndarray of int, shape (N,)
        Shell index of each volume (:func:`assign_shells`).
    shells : sequence of float
        Shell b-values.
    n : int, optional
        Maximum number of examples.

    Returns
    -------
    list of Example
        Farthest first.

    """
    acquired = np.asarray(acquired, dtype=int)
    acq_dw = acquired[bvals[acquired] > B0_THRESHOLD]
    per_shell: list[list[Example]] = []
    for k, bval in enumerate(shells):
        syn = [int(i) for i in synthesized if shell_of[i] == k]
        cand = acq_dw[shell_of[acq_dw] == k] if np.any(shell_of[acq_dw] == k) else acq_dw
        if not syn or cand.size == 0:
            continue
        dots = np.abs(bvecs[syn] @ bvecs[cand].T)
        best = dots.argmax(axis=1)
        angles = np.degrees(np.arccos(np.clip(dots[np.arange(len(syn)), best], 0.0, 1.0)))
        order = np.argsort(-angles, kind="stable")  # farthest first
        per_shell.append(
            [Example(syn[i], int(cand[best[i]]), float(angles[i]), float(bval)) for i in order]
        )
    if not per_shell:
        return []
    if len(per_shell) == 1:
        ranked = per_shell[0]
        picks = sorted({0, len(ranked) // 2, len(ranked) - 1})
        return [ranked[i] for i in picks][:n]
    return [ranked[0] for ranked in per_shell][:n]


def color_fa_on_slices(
    data: np.ndarray,
    mask: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    volumes: Sequence[int] | None = None,
) -> np.ndarray:
    """Fit DTI on a few slices and return colour FA (|principal eigenvector| x FA).

    Parameters
    ----------
    data : ndarray, shape (X, Y, S, N)
        The DWI restricted to the shown slices.
    mask : ndarray of bool, shape (X, Y, S)
        Voxels to fit.
    bvals : ndarray, shape (N,)
        b-values of ``data``.
    bvecs : ndarray, shape (N, 3)
        Unit gradient directions of ``data``.
    volumes : sequence of int, optional
        Volumes to use (default: all).

    Returns
    -------
    ndarray, shape (X, Y, S, 3)
        RGB in [0, 1] (0 outside the mask).

    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel, color_fa

    idx = np.arange(data.shape[-1]) if volumes is None else np.asarray(volumes, dtype=int)
    gtab = gradient_table(bvals[idx], bvecs=bvecs[idx], b0_threshold=B0_THRESHOLD)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = TensorModel(gtab).fit(data[..., idx], mask=mask)
        fa = np.clip(np.nan_to_num(fit.fa), 0.0, 1.0)
        rgb = color_fa(fa, fit.evecs)
    return np.clip(np.nan_to_num(rgb), 0.0, 1.0) * mask[..., None]


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RasView:
    """Reorient image axes to the closest RAS+ axes for display (neurological: left is left).

    Parameters
    ----------
    transform : ndarray, shape (3, 2)
        Nibabel orientation transform from the image axes to RAS+.

    """

    transform: np.ndarray

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> RasView:
        """Build the view for an image with this affine."""
        ornt = nib.orientations.io_orientation(affine)
        return cls(nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS")))

    def array(self, data: np.ndarray) -> np.ndarray:
        """Reorient the first three axes of an image array (extra axes are kept)."""
        return nib.orientations.apply_orientation(data, self.transform)

    def vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Express image-axis vectors (N, 3) in the reoriented axes."""
        out = np.empty_like(np.asarray(vectors, dtype=float))
        for axis, (new_axis, flip) in enumerate(self.transform):
            out[:, int(new_axis)] = vectors[:, axis] * flip
        return out

    def zooms(self, zooms: Sequence[float]) -> tuple[float, float, float]:
        """Voxel sizes in the reoriented axes."""
        out = [1.0, 1.0, 1.0]
        for axis, (new_axis, _) in enumerate(self.transform):
            out[int(new_axis)] = float(zooms[axis])
        return out[0], out[1], out[2]


@dataclass
class RunData:
    """What a run's sidecar and gradient table say about its volumes."""

    files: RunFiles
    sidecar: dict
    n_volumes: int
    bvals: np.ndarray
    bvecs: np.ndarray
    acquired: list[int]
    synthesized: list[int]
    shells: list[float]
    shell_of: np.ndarray
    notes: list[str]

    def shell_vectors(self, volumes: Sequence[int], k: int) -> np.ndarray:
        """Directions of the given volumes that belong to shell ``k``."""
        return self.bvecs[[int(i) for i in volumes if self.shell_of[i] == k]]

    @property
    def n_b0(self) -> int:
        """Acquired volumes with b <= 50 s/mm^2."""
        return int(np.sum(self.bvals[self.acquired] <= B0_THRESHOLD))


def load_run(files: RunFiles, n_volumes: int) -> RunData:
    """Read a run's sidecar and gradient table and check them against each other.

    Parameters
    ----------
    files : RunFiles
        The run.
    n_volumes : int
        Volumes in the merged DWI.

    Returns
    -------
    RunData
        Volume bookkeeping of the run.

    Raises
    ------
    InputError
        When the sidecar or gradient table is missing or inconsistent.

    """
    notes: list[str] = []
    sidecar_path = files.sibling("_desc-preproc_dwi.json")
    if not sidecar_path.is_file():
        raise InputError(sidecar_path, "missing: the run's provenance sidecar is required")
    sidecar = _read_json(sidecar_path)
    bvals, bvecs = load_gradients(
        files.sibling("_desc-preproc_dwi.bval"),
        files.sibling("_desc-preproc_dwi.bvec"),
        n_volumes,
    )
    synthesized = [int(i) for i in sidecar.get("SynthesizedVolumes") or []]
    acquired = [int(i) for i in sidecar.get("AcquiredVolumes") or []]
    if not acquired:
        notes.append("The sidecar lists no AcquiredVolumes: all other volumes are taken as such.")
        acquired = sorted(set(range(n_volumes)) - set(synthesized))
    if any(i < 0 or i >= n_volumes for i in acquired + synthesized):
        raise InputError(sidecar_path, f"volume indices out of range for {n_volumes} volumes")
    shells = [float(b) for b in sidecar.get("ShellsUpsampled") or []]
    if not shells and synthesized:
        shells = sorted({float(round(b / 50.0) * 50.0) for b in bvals[synthesized]})
    return RunData(
        files=files,
        sidecar=sidecar,
        n_volumes=n_volumes,
        bvals=bvals,
        bvecs=bvecs,
        acquired=acquired,
        synthesized=synthesized,
        shells=shells,
        shell_of=assign_shells(bvals, shells),
        notes=notes,
    )


def _load_volume(path: Path, view: RasView) -> np.ndarray | None:
    if not path.is_file():
        return None
    return view.array(np.asanyarray(nib.load(path).dataobj))


def _figure(path: Path, output_dir: Path, caption: str, alt: str) -> dict:
    return {"href": _href(output_dir, path), "caption": caption, "alt": alt}


def _qc_table(files: RunFiles) -> dict | None:
    """Transpose the run's QC TSV: one row per metric, one column per shell."""
    path = files.sibling("_desc-qc_dwiqc.tsv")
    if not path.is_file():
        return None
    columns, rows = read_tsv(path)
    metrics = [c for c in columns if c not in RUN_COLUMNS and c != "shell"]
    return {
        "path": path.name,
        "trust": [_trust_rows(r) for r in rows],
        "clean_snr": _clean_scan_snr(rows),
        "shells": [format_value(r.get("shell")) for r in rows],
        "rows": [
            {
                "name": m,
                "help": QC_COLUMN_HELP.get(m, ""),
                "values": [format_value(r.get(m), m) for r in rows],
            }
            for m in metrics
        ],
    }


def _number(row: dict[str, str], key: str) -> float:
    """Return a QC table cell as a float (NaN when missing or not a number)."""
    try:
        return float(row.get(key, "nan"))
    except ValueError:
        return float("nan")


def _clean_scan_snr(rows: list[dict[str, str]]) -> float | None:
    """Return the run's S0/σ if at least `trust.CLEAN_SCAN_SNR` (QC table rows), else None."""
    from ..trust import CLEAN_SCAN_SNR

    values = [v for v in (_number(r, "noise_sigma_rel") for r in rows) if v > 0]  # not NaN
    if not values:
        return None
    snr = 1.0 / max(values)  # the noisiest shell's S0/σ: clean only if every shell is
    return snr if snr >= CLEAN_SCAN_SNR else None


def _trust_rows(row: dict[str, str]) -> dict:
    """Recompute the trust checks of one shell from its QC row (`trust.trust_checks`)."""
    from ..trust import trust_checks

    verdict, checks = trust_checks(
        hidden_nrmse=_number(row, "hidden_nrmse"),
        noise_floor=_number(row, "hidden_nrmse_floor"),
        sh_nrmse=_number(row, "hidden_nrmse_sh"),
        fa_change=_number(row, "fa_change_upsampled"),
    )
    for check in checks:
        value = check["value"]
        check["shown"] = "n/a" if value != value else f"{value:+.4f}" if "FA" in check[
            "name"] else f"{value:.2f}"  # fmt: skip
    return {
        "shell": format_value(row.get("shell")),
        "verdict": verdict,
        "checks": checks,
        "noise": format_value(row.get("noise_sigma_rel")),
        "noise_method": row.get("noise_method", "n/a"),
    }


def _show(value) -> str:
    """Format a sidecar value for the provenance table."""
    if value is None:
        return "—"
    if isinstance(value, list) and all(isinstance(v, int | float | str) for v in value):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "—"
    if isinstance(value, dict | list):
        return json.dumps(value, indent=1) if value else "—"
    return str(value)


def _provenance(run: RunData) -> list[tuple[str, str]]:
    keys = (
        ("qid2 version", "Qid2Version"),
        ("Up-sampling engine", "UpsamplingEngine"),
        ("Engine settings", "UpsamplingEngineSettings"),
        ("Model ID", "ModelID"),
        ("Model SHA-256", "ModelSHA256"),
        ("Sampler settings", "SamplerSettings"),
        ("Random seed", "RandomSeed"),
        ("Target directions", "TargetDirections"),
        ("Shells up-sampled (s/mm²)", "ShellsUpsampled"),
        ("Source file", "SourceFile"),
        ("Spatial reference", "SpatialReference"),
    )
    rows = [(label, _show(run.sidecar.get(key))) for label, key in keys]
    rows.append(("Output written", _mtime(run.files.dwi)))
    return rows


@dataclass(frozen=True)
class _Slices:
    """The axial slices shown for one run, in display (RAS) orientation."""

    index: list[int]
    labels: list[str]
    mask: np.ndarray  # (X, Y, S)
    aspect: float


def _directions_figure(run: RunData, fig_dir: Path, output_dir: Path) -> dict:
    acq = [run.shell_vectors(run.acquired, k) for k in range(len(run.shells))]
    syn = [run.shell_vectors(run.synthesized, k) for k in range(len(run.shells))]
    path = figures.plot_directions(
        run.shells, acq, syn, fig_dir / f"{run.files.prefix}_desc-directions_dwi.png"
    )
    return _figure(
        path,
        output_dir,
        "Gradient directions per up-sampled shell (image axes), folded onto one hemisphere "
        "(the signal is antipodally symmetric) and seen from +z in an equal-area projection: "
        "acquired (blue circles) and synthesised (orange triangles). Inner circles: 30° and 60° "
        "elevation.",
        "gradient directions",
    )


def _example_figures(
    run: RunData, data: np.ndarray, sl: _Slices, fig_dir: Path, output_dir: Path
) -> list[dict]:
    out = []
    examples = pick_examples(
        run.bvals, run.bvecs, run.acquired, run.synthesized, run.shell_of, run.shells
    )
    for ex in examples:
        path = figures.plot_volume_comparison(
            data[..., ex.nearest],
            data[..., ex.synthesized],
            fig_dir / f"{run.files.prefix}_desc-synth{ex.synthesized:03d}_dwi.png",
            slice_labels=sl.labels,
            mask=sl.mask,
            aspect=sl.aspect,
        )
        caption = (
            f"Synthesised volume {ex.synthesized} (b = {ex.bval:g} s/mm²) against the nearest "
            f"acquired volume {ex.nearest}, {ex.angle_deg:.1f}° apart (|g·b|, antipodal). Both "
            "share one grey scale; their difference (synthesised − acquired, shown at ± half "
            "that range) also holds the genuine contrast between the two directions."
        )
        out.append(_figure(path, output_dir, caption, f"synthesised volume {ex.synthesized}"))
    return out


def _fa_figure(
    run: RunData, view: RasView, sl: _Slices, fig_dir: Path, output_dir: Path
) -> dict | None:
    files = run.files
    fa_acq = _load_volume(files.sibling("_model-tensor_param-fa_desc-acquired_dwimap.nii.gz"), view)
    fa_up = _load_volume(files.sibling("_model-tensor_param-fa_desc-upsampled_dwimap.nii.gz"), view)
    if fa_acq is None or fa_up is None:
        run.notes.append("FA maps are missing: the FA figure is left out.")
        return None
    path = figures.plot_fa_comparison(
        fa_acq[:, :, sl.index],
        fa_up[:, :, sl.index],
        fig_dir / f"{files.prefix}_desc-fa_dwimap.png",
        slice_labels=sl.labels,
        mask=sl.mask,
        aspect=sl.aspect,
    )
    return _figure(
        path,
        output_dir,
        "FA of a DTI fit on the acquired volumes only (top) and on the merged DWI (middle), "
        "and their difference in the mask (bottom, upsampled − acquired).",
        "FA before and after up-sampling",
    )


def _uncertainty_figure(
    run: RunData, data: np.ndarray, view: RasView, sl: _Slices, fig_dir: Path, output_dir: Path
) -> dict | None:
    """Plot the qid2 engine's uncertainty map on the shown slices (None for other engines)."""
    path = run.files.sibling("_model-qid2_param-std_dwimap.nii.gz")
    if not path.exists():
        return None
    img = nib.load(path)
    std = view.array(np.asarray(img.dataobj, dtype=np.float32))[:, :, sl.index]
    img.uncache()
    synthesized = np.asarray(run.synthesized, dtype=int)
    if std.ndim != 4 or std.shape[3] != len(synthesized):
        run.notes.append(
            f"The uncertainty map has {std.shape[3] if std.ndim == 4 else 1} volume(s) for "
            f"{len(synthesized)} synthesised volume(s): its figure is left out."
        )
        return None
    mean_std = std.mean(axis=3)
    signal = data[..., synthesized].mean(axis=3)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(sl.mask & (signal > 0), 100.0 * mean_std / signal, np.nan)
    out = figures.plot_uncertainty(
        np.where(sl.mask, mean_std, np.nan),
        relative,
        fig_dir / f"{run.files.prefix}_desc-uncertainty_dwimap.png",
        slice_labels=sl.labels,
        aspect=sl.aspect,
    )
    return _figure(
        out,
        output_dir,
        "Uncertainty of the diffusion engine: the standard deviation of its K samples, averaged "
        "over the synthesised volumes (top), and relative to the mean synthesised signal "
        "(bottom). High values mark voxels where the model is unsure; it is not an error "
        "estimate (the self-check in the QC table measures error).",
        "uncertainty of the synthesised volumes",
    )


def _color_fa_figure(
    run: RunData, data: np.ndarray, bvecs: np.ndarray, sl: _Slices, fig_dir: Path, output_dir: Path
) -> dict | None:
    try:
        rgb_acq = color_fa_on_slices(data, sl.mask, run.bvals, bvecs, run.acquired)
        rgb_all = color_fa_on_slices(data, sl.mask, run.bvals, bvecs)
    except Exception as exc:  # noqa: BLE001 - a failed fit must not lose the whole report
        run.notes.append(f"Colour FA could not be computed ({type(exc).__name__}: {exc}).")
        return None
    path = figures.plot_color_fa(
        rgb_acq,
        rgb_all,
        fig_dir / f"{run.files.prefix}_desc-colorfa_dwimap.png",
        slice_labels=sl.labels,
        aspect=sl.aspect,
    )
    return _figure(
        path,
        output_dir,
        "Colour FA (red: left–right, green: anterior–posterior, blue: inferior–superior "
        "principal direction; brightness: FA), DTI fitted on these slices to the acquired "
        "volumes (top) and to all volumes (bottom).",
        "colour FA before and after up-sampling",
    )


def _run_section(files: RunFiles, output_dir: Path, fig_dir: Path) -> dict:
    """Read one run, write its figures and return its template context."""
    img = nib.load(files.dwi)
    if img.ndim != 4:
        raise InputError(files.dwi, f"expected a 4D DWI, got shape {img.shape}")
    run = load_run(files, img.shape[3])
    view = RasView.from_affine(img.affine)
    mask = _load_volume(files.sibling("_desc-brain_mask.nii.gz"), view)
    if mask is None:
        run.notes.append("No brain mask found: the whole field of view is used.")
        mask = view.array(np.ones(img.shape[:3], dtype=bool))
    mask = np.asarray(mask) > 0
    small = small_field_of_view(mask)
    if small and str(run.sidecar.get("UpsamplingEngine") or "").startswith("qid2"):
        run.notes.append(
            "The brain spans only {}×{}×{} voxels. With so little spatial context the diffusion "
            "engine gains little: on the tiny scans measured (DIPY's small_64D and small_25, "
            "and 10×10×10 boxes cut from held-out real scans) its FA was between 20 % better "
            "than DTI on the acquired directions alone and 1 % worse (1 box of 18), and at "
            "most 6 % better on high-SNR scans (docs/results.md). "
            "Treat the synthesised volumes with caution; the acquired-only FA map is about as "
            "good here.".format(*small)
        )
    index = choose_slices(mask)
    zooms = view.zooms(img.header.get_zooms()[:3])
    sl = _Slices(index, [f"z = {z}" for z in index], mask[:, :, index], zooms[1] / zooms[0])

    figs: dict = {"directions": _directions_figure(run, fig_dir, output_dir)}
    # Only the shown slices of the DWI stay in memory (the full array is dropped at once).
    data = view.array(np.asarray(img.dataobj, dtype=np.float32))[:, :, index, :]
    img.uncache()
    figs["examples"] = _example_figures(run, data, sl, fig_dir, output_dir)
    figs["fa"] = _fa_figure(run, view, sl, fig_dir, output_dir)
    figs["colorfa"] = _color_fa_figure(run, data, view.vectors(run.bvecs), sl, fig_dir, output_dir)
    figs["uncertainty"] = _uncertainty_figure(run, data, view, sl, fig_dir, output_dir)
    del data

    qc = _qc_table(files)
    if qc is None:
        run.notes.append("The QC table (_desc-qc_dwiqc.tsv) is missing.")
    engine = str(run.sidecar.get("UpsamplingEngine") or "unknown")
    snr = qc["clean_snr"] if qc is not None else None
    if snr is not None and engine.startswith("qid2"):
        run.notes.append(
            f"This scan is clean (S0/σ ≈ {snr:.0f}). On scans this clean the diffusion engine "
            "gains little and can lose: given half the directions of real scans with S0/σ of "
            "74-78, it was 4-9 % better than DTI on those directions alone, and up to "
            "6 % worse on simulated brains at SNR 80 (docs/results.md). "
            "Compare the FA maps before and after up-sampling; the acquired-only FA may be the "
            "better one here."
        )
    acq = np.asarray(run.acquired, dtype=int)
    return {
        "id": files.prefix,
        "title": files.prefix,
        "session": files.session,
        "source": run.sidecar.get("SourceFile"),
        "folder": _href(output_dir, files.dwi.parent),
        "engine": engine,
        "n_volumes": run.n_volumes,
        "n_acquired": len(run.acquired),
        "n_b0": run.n_b0,
        "n_synthesized": len(run.synthesized),
        "shells": [f"{b:g}" for b in run.shells],
        "slices": sl.labels,
        "figures": figs,
        "qc": qc,
        "provenance": _provenance(run),
        "methods": methods_paragraph(
            engine,
            run.sidecar.get("UpsamplingEngineSettings") or {},
            int(np.sum(run.shell_of[acq] >= 0)),
            len(run.synthesized),
            run.shells,
            version=run.sidecar.get("Qid2Version"),
            target_directions=run.sidecar.get("TargetDirections") or "repulsion",
            seed=run.sidecar.get("RandomSeed"),
        ),
        "notes": run.notes,
    }


# --------------------------------------------------------------------------- invocation


def _configs_for_log(log_path: Path) -> list[Path]:
    """Config files that belong to a log: ``config-<stamp>.json`` for ``qid2-<stamp>.log``."""
    log_path = Path(log_path)
    stamp = log_path.stem.removeprefix("qid2-")
    return [log_path.with_name(f"config-{stamp}.json"), log_path.with_suffix(".json")]


def find_config(
    output_dir: Path, log_path: Path | None = None
) -> tuple[Path | None, dict | None, bool]:
    """Find the config JSON of a qid2 invocation in ``<output_dir>/logs``.

    The config written with ``log_path`` (``logs/config-<stamp>.json`` next to
    ``logs/qid2-<stamp>.log``) is preferred; else the newest ``config-*.json`` (or other JSON).

    Parameters
    ----------
    output_dir : Path
        The qid2 derivative folder.
    log_path : Path, optional
        The invocation's log file.

    Returns
    -------
    path : Path or None
        The config file found.
    config : dict or None
        Its content.
    matches_log : bool
        Whether it is the config of ``log_path`` (not just the newest one).

    """
    own = _configs_for_log(log_path) if log_path is not None else []
    logs = Path(output_dir) / "logs"
    newest: list[Path] = []
    if logs.is_dir():
        newest = sorted(
            logs.glob("*.json"),
            key=lambda p: (p.name.startswith("config-"), p.stat().st_mtime, p.name),
            reverse=True,
        )
    for path in own + newest:
        if not path.is_file():
            continue
        try:
            config = _read_json(path)
        except InputError:
            continue
        if isinstance(config, dict):
            return path, config, path in own
    return None, None, False


def validation_summary(config_path: Path | None) -> dict | None:
    """Read the BIDS validator's summary of an invocation (``logs/bids-validator-<stamp>.json``).

    Parameters
    ----------
    config_path : Path or None
        The invocation's ``config-<stamp>.json``.

    Returns
    -------
    dict or None
        ``name``, ``summary``, ``codes`` (the most frequent warning codes with counts); None
        when the validator did not run (or the file is missing).

    """
    if config_path is None:
        return None
    stamp = Path(config_path).stem.removeprefix("config-")
    path = Path(config_path).with_name(f"bids-validator-{stamp}.json")
    if not path.is_file():
        return None
    try:
        data = _read_json(path)
    except InputError:
        return None
    codes = list((data.get("warning_codes") or {}).items())[:8]
    return {"name": path.name, "summary": data.get("summary", ""), "codes": codes}


def command_line(config: dict | None) -> str | None:
    """Return the command line stored in a config (``command_line``, ``command`` or ``argv``)."""
    if not config:
        return None
    for key in ("command_line", "command", "cmdline", "argv"):
        value = config.get(key)
        if isinstance(value, list | tuple):
            return shlex.join(str(v) for v in value)
        if isinstance(value, str) and value:
            return value
    return None


def build_subject_report(output_dir: Path, subject: str, *, log_path: Path | None = None) -> Path:
    """Build the participant report ``<output_dir>/sub-<label>.html`` from the qid2 outputs.

    Figures go to ``<output_dir>/sub-<label>/figures/``; every file is written atomically.

    Parameters
    ----------
    output_dir : Path
        The qid2 derivative folder.
    subject : str
        Subject label (``sub-`` prefix optional).
    log_path : Path, optional
        Log of the invocation, linked from the report.

    Returns
    -------
    Path
        The HTML report.

    Raises
    ------
    InputError
        When the subject has no up-sampled runs in ``output_dir``, or a run's files are broken.

    """
    from .. import __version__

    output_dir = Path(output_dir)
    label = subject.removeprefix("sub-")
    runs = find_subject_runs(output_dir, label)
    if not runs:
        raise InputError(
            output_dir / f"sub-{label}",
            f"no qid2 outputs (*{PREPROC_SUFFIX}) found for subject '{label}'",
        )
    fig_dir = output_dir / f"sub-{label}" / "figures"
    sections = [_run_section(files, output_dir, fig_dir) for files in runs]
    config_path, config, own_config = find_config(output_dir, log_path)
    html = render_template(
        "subject.html.j2",
        title=f"qid2 report: sub-{label}",
        subject=label,
        runs=sections,
        qc_help=QC_COLUMN_HELP,
        generated=_now(),
        report_version=__version__,
        generated_by=dataset_generated_by(output_dir),
        validation=validation_summary(config_path),
        log=None
        if log_path is None
        else {"href": _href(output_dir, Path(log_path)), "name": Path(log_path).name},
        config=None
        if config is None
        else {
            "name": config_path.name,
            "href": _href(output_dir, config_path),
            "command": command_line(config),
            "own": own_config,
            "items": [
                (key, value if isinstance(value, str) else json.dumps(value, default=str))
                for key, value in config.items()
            ],
        },
    )
    return atomic_write_text(output_dir / f"sub-{label}.html", html)
