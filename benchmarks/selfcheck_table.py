"""Compare the self-check QC of several qid2 outputs (one per engine) as a Markdown table.

Usage: python benchmarks/selfcheck_table.py OUT_A [OUT_B ...]
Each OUT is a qid2 output folder after the group level (it reads group_qc.tsv).
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def read_group(out: Path) -> dict[tuple[str, str], dict]:
    with open(out / "group_qc.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return {(r["source"], r["shell"]): r for r in rows}


def main(argv: list[str] | None = None) -> int:
    outs = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not outs:
        print(__doc__)
        return 2
    tables = [read_group(o) for o in outs]
    engines = [next(iter(t.values()))["engine"] for t in tables]
    keys = sorted(set.intersection(*(set(t) for t in tables)))
    head = ["run", "b", "acq", "hidden"]
    for e in engines:
        head += [f"{e} NRMSE", f"{e} FA MAE", f"{e} ΔFA mean"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in keys:
        first = tables[0][key]
        cells = [Path(key[0]).name.replace("_dwi.nii.gz", ""), key[1], first["n_acquired"]]
        cells.append(first["hidden_n"])
        for t in tables:
            r = t[key]
            delta = float(r["fa_mean_upsampled"]) - float(r["fa_mean_acquired"])
            cells += [f"{float(r['hidden_nrmse']):.3f}", f"{float(r['hidden_fa_mae']):.4f}"]
            cells.append(f"{delta:+.3f}")
        print("| " + " | ".join(cells) + " |")
    print()
    base = tables[0]
    for name, t in zip(engines[1:], tables[1:], strict=True):
        ratios = [float(t[k]["hidden_nrmse"]) / float(base[k]["hidden_nrmse"]) for k in keys]
        print(
            f"Median NRMSE ratio {name}/{engines[0]} over {len(keys)} runs: "
            f"{statistics.median(ratios):.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
