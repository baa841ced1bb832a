"""Group report: every run's QC table gathered into ``group_qc.tsv`` and ``group.html``."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np

from ..derivatives import atomic_write_text
from ..errors import InputError
from . import figures
from .subject import (
    QC_COLUMN_HELP,
    TEXT_COLUMNS,
    _href,
    _now,
    dataset_generated_by,
    format_value,
    read_tsv,
    render_template,
)

__all__ = ["build_group_report", "collect_qc", "robust_outliers"]

QC_GLOB = "sub-*/**/*_desc-qc_dwiqc.tsv"
NO_OUTPUTS = "no qid2 participant outputs found (run the participant level first)"
SUMMARY_COLUMNS = (
    "gap_acquired_deg",
    "gap_merged_deg",
    "hidden_nrmse",
    "hidden_fa_mae",
    "fa_mean_acquired",
    "fa_mean_upsampled",
    "fa_mae_upsampled_vs_acquired",
    "fa_change_upsampled",
    "noise_sigma_rel",
    "runtime_s",
)


def collect_qc(output_dir: Path) -> tuple[list[str], list[dict[str, str]], list[Path]]:
    """Read every run's QC table in the qid2 output.

    Parameters
    ----------
    output_dir : Path
        The qid2 derivative folder.

    Returns
    -------
    columns : list of str
        The union of the tables' headers, in order of first appearance.
    rows : list of dict
        All rows, in file order (files sorted by path); absent cells are ``"n/a"``.
    paths : list of Path
        The QC tables read.

    """
    paths = sorted(p for p in Path(output_dir).glob(QC_GLOB) if p.is_file())
    columns: list[str] = []
    rows: list[dict[str, str]] = []
    for path in paths:
        cols, file_rows = read_tsv(path)
        columns += [c for c in cols if c not in columns]
        rows += file_rows
    return columns, [{c: r.get(c, "n/a") or "n/a" for c in columns} for r in rows], paths


def _tsv_text(columns: list[str], rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=columns, delimiter="\t", lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _floats(rows: list[dict[str, str]], column: str) -> np.ndarray:
    out = np.full(len(rows), np.nan)
    for i, row in enumerate(rows):
        try:
            out[i] = float(row.get(column, "n/a"))
        except (TypeError, ValueError):
            pass
    return out


def _labels(rows: list[dict[str, str]]) -> list[str]:
    """Label per row: the run's entities (from its source file name) and the shell.

    ``sub-uih_dir-AP b=928`` and ``sub-uih_dir-PA b=930`` stay apart even though their
    b-values differ only by rounding; rows without a source fall back to subject and session.
    """

    def base(row: dict[str, str]) -> str:
        source = Path(str(row.get("source") or "")).name.split(".")[0]
        if source and source != "n/a":
            run = source.removesuffix("_dwi")
        else:
            sub = "sub-" + str(row.get("subject") or "?").removeprefix("sub-")
            ses = str(row.get("session") or "n/a")
            run = sub + ("" if ses == "n/a" else "_ses-" + ses.removeprefix("ses-"))
        return f"{run} b={format_value(row.get('shell'))}"

    labels = [base(r) for r in rows]
    counts = Counter(labels)
    seen: Counter = Counter()
    for i, label in enumerate(list(labels)):
        if counts[label] > 1:  # the same run twice (should not happen): number them
            seen[label] += 1
            labels[i] = f"{label} ({seen[label]})"
    return labels


def robust_outliers(values: np.ndarray, threshold: float = 3.5) -> np.ndarray:
    """Flag values far above the group (robust z-score from median and MAD).

    Parameters
    ----------
    values : ndarray
        One value per row (NaN for missing).
    threshold : float, optional
        Robust z-score above which a value is flagged.

    Returns
    -------
    ndarray of bool
        True where a value is a high outlier (never with fewer than 4 finite values).

    """
    values = np.asarray(values, dtype=float)
    ok = np.isfinite(values)
    flags = np.zeros(values.shape, dtype=bool)
    if ok.sum() < 4:
        return flags
    med = np.median(values[ok])
    mad = np.median(np.abs(values[ok] - med)) * 1.4826
    if mad <= 0:
        return flags
    flags[ok] = (values[ok] - med) / mad > threshold
    return flags


def _summary(rows: list[dict[str, str]], columns: list[str]) -> list[dict]:
    out = []
    for col in (c for c in SUMMARY_COLUMNS if c in columns):
        v = _floats(rows, col)
        v = v[np.isfinite(v)]
        if v.size:
            stats = (np.min(v), np.median(v), np.max(v))
            out.append(
                {
                    "name": col,
                    "help": QC_COLUMN_HELP.get(col, ""),
                    "n": int(v.size),
                    "values": [format_value(str(x)) for x in stats],
                }
            )
    return out


def _group_figures(rows: list[dict[str, str]], output_dir: Path) -> list[dict]:
    fig_dir = output_dir / "group" / "figures"
    labels = _labels(rows)
    specs = []
    path = figures.plot_run_values(
        labels,
        _floats(rows, "hidden_nrmse"),
        fig_dir / "group_desc-hiddennrmse_qc.png",
        ylabel="hidden NRMSE",
        title="Self-check: NRMSE of hidden acquired volumes predicted from the rest",
    )
    specs.append(
        (
            path,
            "Self-check NRMSE per run and shell (lower is better; near the noise "
            "level is the best possible).",
            "hidden NRMSE per run",
        )
    )
    path = figures.plot_run_values(
        labels,
        _floats(rows, "hidden_fa_mae"),
        fig_dir / "group_desc-hiddenfamae_qc.png",
        ylabel="hidden FA MAE",
        title="Self-check: mean |ΔFA| when hidden volumes are replaced by predictions",
    )
    specs.append((path, "Self-check effect on FA per run and shell.", "hidden FA MAE per run"))
    path = figures.plot_fa_scatter(
        _floats(rows, "fa_mean_acquired"),
        _floats(rows, "fa_mean_upsampled"),
        labels,
        fig_dir / "group_desc-fa_qc.png",
    )
    specs.append(
        (
            path,
            "Mean FA in the brain mask: DTI on acquired volumes only against DTI on "
            "the merged DWI. Points on the dashed line mean up-sampling left mean FA "
            "unchanged.",
            "mean FA acquired vs upsampled",
        )
    )
    path = figures.plot_gaps(
        labels,
        _floats(rows, "gap_acquired_deg"),
        _floats(rows, "gap_merged_deg"),
        fig_dir / "group_desc-gaps_qc.png",
    )
    specs.append(
        (
            path,
            "Largest angular gap between directions (degrees, antipodally "
            "symmetric) before (blue) and after (orange) up-sampling.",
            "angular gaps before and after",
        )
    )
    return [
        {"href": _href(output_dir, p), "caption": caption, "alt": alt} for p, caption, alt in specs
    ]


def _table_rows(rows: list[dict[str, str]], columns: list[str], output_dir: Path) -> list[dict]:
    # a row is flagged by its own trust verdict (docs/outputs.md), whatever the group's size
    flags = [str(r.get("trust", "")) == "warn" for r in rows]
    out = []
    for row, flag in zip(rows, flags, strict=True):
        sub = str(row.get("subject", "")).removeprefix("sub-")
        page = output_dir / f"sub-{sub}.html"
        out.append(
            {
                "link": page.name if page.is_file() else None,
                "cells": [
                    {"text": format_value(row.get(c), c), "num": c not in TEXT_COLUMNS}
                    for c in columns
                ],
                "flag": bool(flag),
            }
        )
    return out


def build_group_report(output_dir: Path) -> tuple[Path, Path]:
    """Gather all runs' QC tables into ``group_qc.tsv`` and build ``group.html``.

    Figures go to ``<output_dir>/group/figures/``; every file is written atomically.

    Parameters
    ----------
    output_dir : Path
        The qid2 derivative folder (after the participant level).

    Returns
    -------
    tsv : Path
        ``<output_dir>/group_qc.tsv``: every row of every run's QC table, same columns.
    html : Path
        ``<output_dir>/group.html``.

    Raises
    ------
    InputError
        When no participant outputs (QC tables) are found.

    """
    from .. import __version__

    output_dir = Path(output_dir)
    columns, rows, paths = collect_qc(output_dir)
    if not rows:
        raise InputError(output_dir, NO_OUTPUTS)
    tsv = atomic_write_text(output_dir / "group_qc.tsv", _tsv_text(columns, rows))
    subjects = sorted({str(r.get("subject", "")).removeprefix("sub-") for r in rows})
    html = render_template(
        "group.html.j2",
        title="qid2 group report",
        columns=[{"name": c, "help": QC_COLUMN_HELP.get(c, "")} for c in columns],
        rows=_table_rows(rows, columns, output_dir),
        n_subjects=len(subjects),
        n_runs=len(paths),
        n_rows=len(rows),
        summary=_summary(rows, columns),
        figures=_group_figures(rows, output_dir),
        subjects=[
            {
                "label": s,
                "href": f"sub-{s}.html" if (output_dir / f"sub-{s}.html").is_file() else None,
            }
            for s in subjects
        ],
        tsv_name=tsv.name,
        generated=_now(),
        report_version=__version__,
        generated_by=dataset_generated_by(output_dir),
    )
    return tsv, atomic_write_text(output_dir / "group.html", html)
