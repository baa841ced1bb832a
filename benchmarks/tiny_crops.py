"""qid2 on tiny fields of view cut from held-out real scans, against DTI on the given directions.

Run from the repository root::

    python benchmarks/tiny_crops.py [--model models/qid2-default] [--bids ../shared/data/bids-real]
                                    [--participants uih vanderbilt] [--crops 6] [--size 10]
                                    [--seed 0] [--out FILE]

DIPY's small_64D and small_25 are the only tiny real scans in ``qid2-eval``, and they were looked
at while the small-field training option was designed. This benchmark makes more such scans
from runs never used in training: from each DWI run of the given participants it cuts
``--crops`` boxes of ``size x size`` voxels in plane (all slices, or ``--size`` slices if the
run has more), centred on random voxels whose whole box is at least 90 % brain. Each box is
then a case of its own, split as ``qid2-eval`` splits a run (half of each shell given), and
scored against DTI on its full acquisition with `evaluation.harness.evaluate_case`.

The Markdown table goes to stdout (and ``--out``), progress to stderr. Per run it gives the
median over the boxes of qid2's FA MAE divided by that of ``none`` (DTI on the given
directions) and of ``sh``, how many boxes qid2 made worse than ``none``, and the mean signed FA
bias of each method against the full acquisition.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Smallest share of brain voxels in a box.
MIN_BRAIN_SHARE = 0.9
METHODS = ("sh", "none", "qid2")


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[tiny-crops] {message}", file=sys.stderr, flush=True)


def crop_case(case, corner: tuple[int, int, int], size: tuple[int, int, int], index: int):
    """Return the case restricted to the box at ``corner`` (same split, same directions).

    Parameters
    ----------
    case : EvalCase
        A real case.
    corner, size : tuple of int
        Box start and extent along the three voxel axes.
    index : int
        Box number (for the name).

    Returns
    -------
    EvalCase
    """
    box = tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))
    affine = case.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.asarray(corner, float) + affine[:3, 3]
    return dataclasses.replace(
        case,
        name=f"{case.name}_box-{index}",
        data=np.ascontiguousarray(case.data[box]),
        mask=np.ascontiguousarray(case.mask[box]),
        affine=affine,
        truth=None if case.truth is None else case.truth[box],
    )


def box_corners(
    mask: np.ndarray, size: tuple[int, int, int], n: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """Up to ``n`` box corners whose box is at least `MIN_BRAIN_SHARE` brain.

    Parameters
    ----------
    mask : ndarray of bool
        Brain mask.
    size : tuple of int
        Box extent.
    n : int
        Boxes wanted.
    rng : numpy.random.Generator
        Draws the centres.

    Returns
    -------
    list of tuple of int
    """
    centres = np.argwhere(mask)
    corners: list[tuple[int, int, int]] = []
    for k in rng.permutation(len(centres))[: 200 * n]:
        corner = tuple(
            int(np.clip(c - s // 2, 0, dim - s))
            for c, s, dim in zip(centres[k], size, mask.shape, strict=True)
        )
        box = tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))
        if mask[box].mean() >= MIN_BRAIN_SHARE and corner not in corners:
            corners.append(corner)
        if len(corners) == n:
            break
    return corners


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    from qid2_bidsapp.evaluation.cases import load_bids_cases
    from qid2_bidsapp.evaluation.harness import evaluate_case
    from qid2_bidsapp.evaluation.methods import Method

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "qid2-default"))
    parser.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "bids-real")
    parser.add_argument("--participants", nargs="+", default=["uih", "vanderbilt"])
    parser.add_argument("--crops", type=int, default=6)
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    methods = [
        Method("sh", "sh"),
        Method("none", "none"),
        Method("qid2", "qid2", {"model_dir": args.model}),
    ]
    rng = np.random.default_rng(args.seed)
    began = time.perf_counter()
    rows = []
    for case in load_bids_cases(args.bids, participant_labels=args.participants):
        size = [args.size] * 3
        size[case.slice_axis] = min(args.size, case.data.shape[case.slice_axis])
        corners = box_corners(case.mask, tuple(size), args.crops, rng)
        log(f"{case.name}: {len(corners)} boxes of {'x'.join(map(str, size))}")
        per_box = []
        for i, corner in enumerate(corners):
            scored = evaluate_case(crop_case(case, corner, tuple(size), i), methods)
            per_box.append({r["method"]: (r["fa_mae"], r["fa_bias"]) for r in scored})
        rows.append((case.name, "x".join(map(str, size)), per_box))

    model = Path(args.model).resolve()
    shown = model.relative_to(REPO) if model.is_relative_to(REPO) else model
    lines = [
        f"Model `{shown}`; {args.crops} boxes per run, seed {args.seed}; "
        f"{time.perf_counter() - began:.0f} s.",
        "",
        "FA against DTI on each box's full acquisition (half of each shell given).",
        "",
        "| run | box | boxes | qid2 / none: median (range) | qid2 worse than none | "
        "qid2 / sh: median | mean FA bias: none / qid2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size, per_box in rows:
        if not per_box:
            lines.append(f"| {name} | {size} | 0 | | | | |")
            continue
        to_none = np.array([b["qid2"][0] / b["none"][0] for b in per_box])
        to_sh = np.array([b["qid2"][0] / b["sh"][0] for b in per_box])
        bias = {m: np.mean([b[m][1] for b in per_box]) for m in ("none", "qid2")}
        lines.append(
            f"| {name} | {size} | {len(per_box)} | {np.median(to_none):.3f} "
            f"({to_none.min():.2f}–{to_none.max():.2f}) | {int((to_none > 1).sum())} | "
            f"{np.median(to_sh):.3f} | {bias['none']:+.4f} / {bias['qid2']:+.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
