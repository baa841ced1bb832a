"""Wall time and peak memory of the ``qid2`` engine next to ``sh``, one child process per run.

Run from the repository root::

    python benchmarks/bench_qid2.py [--model DIR] [--bids ../shared/data/bids-real]
                                    [--runs prisma_ses-ortho ...] [--hcp-slices N | --no-hcp]
                                    [--device auto|cpu|cuda] [--threads N] [--out FILE]

For each case (every real run of the dataset, and an HCP-size phantom of 145×174×145 with
30 → 90 directions at b=1000) the script starts a fresh Python process per engine, which
loads the data, plans the targets as the app does, and times ``upsample_shells`` with the
engine (``sh`` at its defaults without a mask, as the app runs it; ``qid2`` at the model's
default sampler settings for the device, with the brain mask). A child reports its wall time,
its peak resident memory (``ru_maxrss``: data, model and all buffers included) and, on CUDA,
the peak GPU memory allocated by torch. Ratios are against ``sh`` on the same case in the same
run of this script. The Markdown tables go to stdout (and ``--out``), progress to stderr.

``--hcp-slices N`` keeps only the N central slices of the HCP-size phantom (the CPU needs
about an hour for the whole volume); the table then says so and gives the per-slice time and
a linear extrapolation to 145 slices, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_engines import (  # noqa: E402
    HCP_SHAPE,
    code_location,
    fmt_ratio,
    fmt_seconds,
    load_average,
    machine_line,
    markdown_table,
)

HCP_TARGETS = 60  # 30 acquired -> 90 directions


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[bench-qid2] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- child side


def load_case(case: dict):
    """Return (data, table, mask, n_targets) for a case description."""
    from qid2_bidsapp.gradients import GradientTable

    if case["kind"] == "hcp":
        from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal

        bvals = np.r_[0.0, np.full(30, 1000.0)]
        bvecs = np.vstack([np.zeros(3), hemisphere_directions(30, 0)])
        data, brain = phantom_signal(tuple(HCP_SHAPE), bvals, bvecs)
        n = case.get("slices")
        if n:
            mid = HCP_SHAPE[2] // 2
            keep = slice(mid - n // 2, mid - n // 2 + n)
            data, brain = np.ascontiguousarray(data[:, :, keep]), brain[:, :, keep]
        return data, GradientTable(bvals, bvecs), brain, HCP_TARGETS
    from qid2_bidsapp.upsampling import brain_mask, load_dwi_header, mean_b0, read_gradients

    img = load_dwi_header(case["dwi"])
    table = read_gradients(case["dwi"], case["bval"], case["bvec"], None, img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data, table, brain_mask(mean_b0(data, table)), None


def run_child(case: dict, engine_name: str, options: dict) -> dict:
    """Load one case, run one engine over every shell, return the measurements."""
    from qid2_bidsapp.engines.base import get_engine
    from qid2_bidsapp.upsampling import plan_targets, upsample_shells

    data, table, mask, n_targets = load_case(case)
    shells = sorted(table.shells)
    plans = plan_targets(table, shells, n_targets=n_targets)
    engine = get_engine(engine_name, **(options if engine_name == "qid2" else {}))
    engine_mask = None if engine_name == "sh" else mask
    cuda = False
    if engine_name == "qid2":
        import torch

        cuda = torch.cuda.is_available() and options.get("device") != "cpu"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    upsample_shells(data, table, plans, engine, engine_mask)
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "shape": list(data.shape),
        "n_targets": sum(len(p.targets) for p in plans),
        "n_mask_slices": int(mask.any(axis=(0, 1)).sum()),
    }
    if engine_name == "qid2":
        settings = engine.settings()
        result["sampler"] = settings["sampler"]
        result["device"] = settings["device"]
        result["precision"] = settings["precision"]
        result["batch_size_used"] = settings["batch_size_used"]
        result["model_id"] = settings["model_id"]
        if cuda:
            import torch

            result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# --------------------------------------------------------------------------- parent side


def child(case: dict, engine: str, options: dict, threads: int | None) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    env = dict(os.environ)
    if threads:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
    spec = json.dumps({"case": case, "engine": engine, "options": options})
    proc = subprocess.run(
        [sys.executable, __file__, "--child", spec],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{engine} on {case['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def real_cases(bids_dir: Path, only: list[str] | None) -> list[dict]:
    """One case per DWI run of the dataset (optionally only runs whose stem contains a name)."""
    from qid2_bidsapp.bids import collect_dwi_runs

    if not (bids_dir / "dataset_description.json").exists():
        return []
    cases = []
    for run in collect_dwi_runs(bids_dir):
        name = run.stem.replace("_dwi", "")
        if only and not any(o in name for o in only):
            continue
        cases.append(
            {
                "kind": "real",
                "name": name,
                "dwi": str(run.dwi),
                "bval": str(run.bval),
                "bvec": str(run.bvec),
            }
        )
    return cases


def build_document(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    """The Markdown document of the measurements."""
    table_rows = []
    for row in rows:
        sh, q = row["sh"], row["qid2"]
        shape = "×".join(str(v) for v in q["shape"])
        note = ""
        if row["case"].get("slices"):
            per_slice = q["seconds"] / max(q["n_mask_slices"], 1)
            note = (
                f"{row['case']['slices']} central slices; extrapolated to 145: "
                f"{fmt_seconds(per_slice * 145)} s (not measured)"
            )
        table_rows.append(
            [
                row["case"]["name"],
                shape,
                str(q["n_targets"]),
                fmt_seconds(sh["seconds"]),
                f"{sh['max_rss_mib']:.0f}",
                fmt_seconds(q["seconds"]),
                fmt_ratio(q["seconds"] / sh["seconds"]),
                f"{q['max_rss_mib']:.0f}",
                "—" if "gpu_peak_mib" not in q else f"{q['gpu_peak_mib']:.0f}",
                str(q["batch_size_used"]),
                note,
            ]
        )
    first = rows[0]["qid2"] if rows else {}
    sampler = first.get("sampler", {})
    table = markdown_table(
        [
            "case",
            "shape",
            "targets",
            "sh (s)",
            "sh max RSS (MiB)",
            "qid2 (s)",
            "qid2 / sh",
            "qid2 max RSS (MiB)",
            "GPU peak (MiB)",
            "batch",
            "note",
        ],
        table_rows,
        right={2, 3, 4, 5, 6, 7, 8, 9},
    )
    return "\n".join(
        [
            "# qid2 engine speed and memory",
            "",
            f"<!-- written by `{command}`; re-run it to refresh, do not edit by hand -->",
            "",
            f"- Command: `{command}`",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- Code: {code_location()}",
            f"- Machine: {machine_line()}",
            f"- Load average (1/5/15 min) at start: {args.load_at_start}",
            f"- Model: `{first.get('model_id', '?')}`; device {first.get('device', '?')}, "
            f"precision {first.get('precision', '?')}; "
            f"sampler {json.dumps(sampler)} (the model's defaults for this device unless "
            "given on the command line)",
            "",
            "Each cell is one run of a fresh process (load, plan, `upsample_shells`); *max RSS* "
            "is that process's peak resident memory, data and model included. `sh` runs "
            "without a mask as the app runs it; `qid2` runs inside the brain mask (outside it "
            "the output is the SH prior).",
            "",
            table,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="model folder (default: the shipped default model)")
    parser.add_argument("--bids", default="../shared/data/bids-real")
    parser.add_argument("--runs", nargs="*", help="only runs whose name contains one of these")
    parser.add_argument("--no-real", action="store_true", help="skip the real runs")
    parser.add_argument("--no-hcp", action="store_true", help="skip the HCP-size phantom")
    parser.add_argument("--hcp-slices", type=int, help="only this many central HCP slices")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sampler-steps", type=int, help="default: the model's for the device")
    parser.add_argument("--n-samples", type=int, help="default: the model's for the device")
    parser.add_argument("--threads", type=int, help="torch/BLAS threads of the children")
    parser.add_argument("--out", type=Path, help="also write the document here")
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_child(spec["case"], spec["engine"], spec["options"])))
        return 0

    args.load_at_start = load_average()
    options = {"model_dir": args.model, "device": args.device, "num_threads": args.threads}
    if args.sampler_steps:
        options["n_steps"] = args.sampler_steps
    if args.n_samples:
        options["n_samples"] = args.n_samples
    cases = [] if args.no_real else real_cases(Path(args.bids), args.runs)
    if not args.no_hcp:
        cases.append({"kind": "hcp", "name": "hcp-size phantom", "slices": args.hcp_slices})
    rows = []
    for case in cases:
        row = {"case": case}
        for engine in ("sh", "qid2"):
            log(f"{case['name']}: {engine}")
            row[engine] = child(case, engine, options, args.threads)
            log(f"{case['name']}: {engine} {row[engine]['seconds']:.1f} s")
        rows.append(row)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    document = build_document(rows, args, command)
    print(document)
    if args.out:
        args.out.write_text(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
