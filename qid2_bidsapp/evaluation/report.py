"""Tables (TSV, Markdown) and a figure of evaluation rows."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .harness import COLUMNS, FULL, PERFECT
from .methods import CLASSICAL

#: Ratio under which a method counts as beating the best classical method by >= 15 %.
TARGET_RATIO = 0.85

#: Summary columns: (row key, header, format).
_SUMMARY = (
    ("fa_mae", "FA MAE", ".4f"),
    ("fa_ssim", "FA SSIM", ".3f"),
    ("nrmse", "NRMSE", ".3f"),
    ("psnr", "PSNR dB", ".1f"),
    ("ssim", "SSIM", ".3f"),
    ("rish_l0_nmse", "RISH0 NMSE", ".4f"),
    ("rish_l2_nmse", "RISH2 NMSE", ".3f"),
    ("rish_l4_nmse", "RISH4 NMSE", ".3f"),
)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


#: Optional summary columns shown when any row has them: (key, header, format).
_OPTIONAL = (
    ("fa_bias", "FA bias", "+.4f"),
    ("fa_mae_wm", "FA MAE in WM", ".4f"),
    ("fa_bias_wm", "FA bias in WM", "+.4f"),
    ("md_mae", "MD MAE (1e-3 mm²/s)", ".4f"),
    ("equiv_dirs", "≈ N acquired", ".1f"),
    ("csd_acc", "CSD ACC", ".3f"),
    ("csd_peak_deg", "CSD peak error °", ".1f"),
)


def _fmt(value, spec: str) -> str:
    if _is_number(value) and math.isinf(value):
        return "< smallest" if value < 0 else "> full"
    return format(value, spec) if _is_number(value) else "—"


def _median(values: Iterable) -> float:
    numbers = [float(v) for v in values if _is_number(v)]
    return statistics.median(numbers) if numbers else float("nan")


def add_ratios(rows: list[dict]) -> list[dict]:
    """Add each row's FA MAE relative to the best classical method of its case.

    The best classical method of a case is the lower FA MAE of ``sh`` and ``none`` (DTI on the
    input subset) among those evaluated. Adds ``best_classical``, ``ratio`` (FA MAE against the
    full acquisition) and, where there is a truth, ``ratio_truth``; a ratio below 0.85 means the
    method beats the best classical one by at least 15 %.

    Parameters
    ----------
    rows : list of dict
        Rows of `~qid2_bidsapp.evaluation.harness.evaluate`.

    Returns
    -------
    list of dict
        The same rows (changed in place).

    """
    by_case: dict[tuple, list[dict]] = {}
    for row in rows:
        by_case.setdefault((row["group"], row["case"]), []).append(row)
    for case_rows in by_case.values():
        classical = [r for r in case_rows if r["method"] in CLASSICAL]
        for suffix in ("", "_truth"):
            key = f"fa_mae{suffix}"
            candidates = [r for r in classical if _is_number(r.get(key))]
            best = min(candidates, key=lambda r: r[key]) if candidates else None
            for row in case_rows:
                value = row.get(key)
                ok = best is not None and _is_number(value) and row["method"] != FULL
                row[f"ratio{suffix}"] = value / best[key] if ok and best[key] > 0 else float("nan")
                if suffix == "":
                    row["best_classical"] = best["method"] if best is not None else ""
    return rows


def write_tsv(rows: list[dict], path: Path) -> None:
    """Write rows as a tab-separated table (NaN as ``n/a``).

    Parameters
    ----------
    rows : list of dict
        Result rows (with or without ratios).
    path : Path
        Destination.

    """
    extra = [k for k in ("best_classical", "ratio", "ratio_truth") if rows and k in rows[0]]
    columns = [*COLUMNS, *extra]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            cells = []
            for key in columns:
                value = row.get(key, "")
                if isinstance(value, float):
                    cells.append("n/a" if math.isnan(value) else f"{value:.6g}")
                else:
                    cells.append(str(value))
            writer.writerow(cells)


def read_tsv(path: Path) -> list[dict]:
    """Read rows written by `write_tsv` (numbers as float, ``n/a`` as NaN).

    Parameters
    ----------
    path : Path
        A ``results.tsv``.

    Returns
    -------
    list of dict

    """
    text_columns = {"group", "case", "protocol", "method", "best_classical"}
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle, delimiter="\t"):
            row = {}
            for key, value in raw.items():
                if key in text_columns:
                    row[key] = value
                else:
                    row[key] = float("nan") if value == "n/a" else float(value)
            rows.append(row)
    return rows


def _groups(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["group"] for r in rows))


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def summary_markdown(rows: list[dict]) -> str:
    """Markdown summary: per group, the median over cases of every metric per method.

    Parameters
    ----------
    rows : list of dict
        Rows with ratios (`add_ratios`).

    Returns
    -------
    str
        One table per group. ``vs best classical``: median over cases of the method's FA MAE
        divided by the best classical FA MAE of the same case (< 0.85: beats it by >= 15 %).
        Groups with a truth add the FA metrics against the noise-free truth.

    """
    lines = []
    for group in _groups(rows):
        group_rows = [r for r in rows if r["group"] == group]
        cases = list(dict.fromkeys(r["case"] for r in group_rows))
        protocols = sorted({r["protocol"] for r in group_rows})
        has_truth = any(_is_number(r.get("fa_mae_truth")) for r in group_rows)
        lines.append(f"### {group}: {len(cases)} case(s), {'; '.join(protocols)}")
        lines.append("")
        head = ["method", "FA MAE", "vs best classical", "FA SSIM"]
        if has_truth:
            head += ["FA MAE (truth)", "vs best (truth)", "FA SSIM (truth)"]
        head += [h for _, h, _ in _SUMMARY[2:]]
        optional = [
            (key + sfx, header + (" (truth)" if sfx else ""), spec)
            for key, header, spec in _OPTIONAL
            for sfx in ("", "_truth")
            if any(_is_number(r.get(key + sfx)) for r in group_rows)
        ]
        head += [h for _, h, _ in optional] + ["seconds"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for method in _methods(group_rows):
            mr = [r for r in group_rows if r["method"] == method]

            def med(key, rows_=mr):
                return _median(r.get(key) for r in rows_)

            cells = [method, _fmt(med("fa_mae"), ".4f"), _fmt(med("ratio"), ".2f")]
            cells.append(_fmt(med("fa_ssim"), ".3f"))
            if has_truth:
                cells += [_fmt(med("fa_mae_truth"), ".4f"), _fmt(med("ratio_truth"), ".2f")]
                cells.append(_fmt(med("fa_ssim_truth"), ".3f"))
            cells += [_fmt(med(key), spec) for key, _, spec in _SUMMARY[2:]]
            cells += [_fmt(med(key), spec) for key, _, spec in optional]
            cells.append(_fmt(med("seconds"), ".2f"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.extend(_verdicts(group_rows))
        lines.append("")
    return "\n".join(lines)


def _verdicts(group_rows: list[dict]) -> list[str]:
    """One line per non-classical method: how it compares with the best classical method."""
    lines = []
    winners = [r["best_classical"] for r in group_rows if r.get("best_classical")]
    n_cases = len({r["case"] for r in group_rows})
    counts = {
        m: sum(1 for r in group_rows if r["method"] == m and r.get("best_classical") == m)
        for m in CLASSICAL
    }
    if winners:
        parts = [f"`{m}` in {c}" for m, c in counts.items() if c]
        lines.append(
            f"Best classical method (lower FA MAE of sh, none): {', '.join(parts)} "
            f"of {n_cases} case(s)."
        )
    for method in _methods(group_rows):
        if method in CLASSICAL or method == FULL:
            continue
        if method == PERFECT:
            lines.extend(_perfect_line(group_rows))
            continue
        ratio = _median(r.get("ratio") for r in group_rows if r["method"] == method)
        if not _is_number(ratio):
            continue
        change = (1.0 - ratio) * 100.0
        verdict = (
            f"beats it by {change:.0f} % (target >= 15 %: met)"
            if ratio <= TARGET_RATIO
            else (
                f"better by {change:.0f} %, short of the 15 % target by {15 - change:.0f} points"
                if change > 0
                else f"worse by {-change:.0f} % (target: 15 % better)"
            )
        )
        lines.append(
            f"- `{method}`: median FA MAE ratio to the best classical method "
            f"{ratio:.2f}: {verdict}."
        )
        worse = _worse_than_none(group_rows, method)
        if worse is not None:
            n_worse, n_cases_m, names = worse
            listed = f" ({', '.join(names)})" if names else ""
            lines.append(
                f"  Worse than DTI on the given directions (`none`) in {n_worse} of "
                f"{n_cases_m} case(s){listed}."
            )
    return lines


def _perfect_line(group_rows: list[dict]) -> list[str]:
    """Return the line on the ``perfect`` row: what an exact prediction would gain here."""
    rows = [r for r in group_rows if r["method"] == PERFECT]
    parts = [
        f"{_median(r.get(key) for r in rows):.2f} {label}"
        for key, label in (
            ("ratio", "against the full acquisition"),
            ("ratio_truth", "against the truth"),
        )
        if _is_number(_median(r.get(key) for r in rows))
    ]
    if not parts:
        return []
    return [
        f"- `perfect` (the noise-free signal at the held-out directions, merged with the given "
        f"volumes: what an exact prediction would gain here): median FA MAE ratio to the best "
        f"classical method {' and '.join(parts)}."
    ]


def _worse_than_none(group_rows: list[dict], method: str) -> tuple[int, int, list[str]] | None:
    """Cases where `method` has a higher FA MAE than ``none`` (the safety claim)."""
    none = {r["case"]: r.get("fa_mae") for r in group_rows if r["method"] == "none"}
    if not none:
        return None
    pairs = [
        (r["case"], r.get("fa_mae"), none.get(r["case"]))
        for r in group_rows
        if r["method"] == method and r["case"] in none
    ]
    pairs = [(c, a, b) for c, a, b in pairs if _is_number(a) and _is_number(b)]
    names = [c for c, a, b in pairs if a > b]
    return len(names), len(pairs), names


def per_case_markdown(rows: list[dict], key: str = "fa_mae", spec: str = ".4f") -> str:
    """Markdown table of one metric: a row per case, a column per method.

    Parameters
    ----------
    rows : list of dict
        Result rows (with ratios: the best classical method is named per case).
    key : str, optional
        The metric.
    spec : str, optional
        Number format.

    Returns
    -------
    str

    """
    methods = [
        m for m in _methods(rows) if any(_is_number(r.get(key)) for r in rows if r["method"] == m)
    ]
    head = ["group", "case", "protocol", *methods, "best classical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = dict.fromkeys((r["group"], r["case"]) for r in rows)
    for group, case in seen:
        case_rows = {r["method"]: r for r in rows if r["group"] == group and r["case"] == case}
        first = next(iter(case_rows.values()))
        cells = [group, case, first["protocol"]]
        cells += [_fmt(case_rows[m].get(key), spec) if m in case_rows else "—" for m in methods]
        cells.append(first.get("best_classical", "") or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_fa_mae(rows: list[dict], path: Path, *, key: str = "fa_mae") -> None:
    """Figure: FA MAE of every method on every case, one panel per group.

    Parameters
    ----------
    rows : list of dict
        Result rows.
    path : Path
        PNG to write.
    key : str, optional
        Metric to plot (``fa_mae`` or ``fa_mae_truth``).

    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        g for g in _groups(rows) if any(_is_number(r.get(key)) for r in rows if r["group"] == g)
    ]
    fig, axes = plt.subplots(
        1, max(1, len(groups)), figsize=(4.5 * max(1, len(groups)) + 1, 4.2), squeeze=False
    )
    for ax, group in zip(axes[0], groups, strict=False):
        group_rows = [r for r in rows if r["group"] == group and _is_number(r.get(key))]
        cases = list(dict.fromkeys(r["case"] for r in group_rows))
        methods = _methods(group_rows)
        width = 0.8 / max(1, len(methods))
        x = np.arange(len(cases))
        for k, method in enumerate(methods):
            values = {r["case"]: r[key] for r in group_rows if r["method"] == method}
            heights = [values.get(c, np.nan) for c in cases]
            ax.bar(x + (k - (len(methods) - 1) / 2) * width, heights, width, label=method)
        ax.set_xticks(x)
        ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
        ax.set_title(group, fontsize=10)
        ax.set_ylabel("FA MAE" + (" (vs truth)" if key.endswith("_truth") else ""))
        ax.set_yscale("log")
        ax.grid(axis="y", which="both", alpha=0.3)
    if groups:
        axes[0][0].legend(fontsize=8)
    fig.suptitle("FA mean absolute error in the mask (log scale, lower is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
