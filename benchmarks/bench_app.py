"""Wall time and peak memory of whole app runs: the default engine next to ``--engine sh``.

Run from the repository root::

    python benchmarks/bench_app.py [--bids ../shared/data/bids-real] [--participants uih ...]
                                   [--model DIR] [--repeats 3] [--nprocs 2] [--out FILE]

For each participant, ``qid2 BIDS OUT participant --participant-label P`` runs in a fresh
process with a fresh work folder and output folder, alternating ``--engine sh`` and the default
engine (``qid2``, with ``--model`` when given) ``--repeats`` times; the table gives the median
wall time of each, their ratio (qid2 / sh, from runs made in this process, interleaved so that
machine load affects both alike) and the largest peak resident memory of any process of the
run (``ru_maxrss`` that ``wait4`` reports: the largest process of the run's tree, Nipype's
workers included). Everything the app does is
timed: BIDS validation, preflight, up-sampling, DTI, self-check, reports.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_engines import load_average, machine_line, markdown_table  # noqa: E402


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[bench-app] {message}", file=sys.stderr, flush=True)


def one_run(bids: Path, participant: str, engine: str, model: str | None, nprocs: int) -> dict:
    """Run the app once in a fresh process; return wall time and peak memory."""
    with tempfile.TemporaryDirectory(prefix="qid2-bench-app-") as tmp:
        out, work = Path(tmp) / "out", Path(tmp) / "work"
        command = [
            sys.executable, "-m", "qid2_bidsapp.cli.run", str(bids), str(out), "participant",
            "--participant-label", participant, "--engine", engine, "-w", str(work),
            "--nprocs", str(nprocs),
        ]  # fmt: skip
        if engine == "qid2" and model:
            command += ["--model", model]
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{engine} on sub-{participant} failed:\n{err[-2000:]}")
        # wait4's ru_maxrss: the largest process of the run's tree (workers it waited for)
        return {"seconds": seconds, "rss_mib": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids", type=Path, default=Path("../shared/data/bids-real"))
    parser.add_argument("--participants", nargs="+", default=["uih", "vanderbilt"])
    parser.add_argument("--model", help="model folder for the qid2 runs (default: shipped)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.bids.is_dir():
        print(f"bench-app: {args.bids}: not found", file=sys.stderr)
        return 1
    command = "python benchmarks/bench_app.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    started_load = load_average()
    rows = []
    for participant in args.participants:
        times: dict[str, list[float]] = {"sh": [], "qid2": []}
        rss: dict[str, float] = {"sh": 0.0, "qid2": 0.0}
        for k in range(args.repeats):
            for engine in ("sh", "qid2"):
                result = one_run(args.bids, participant, engine, args.model, args.nprocs)
                times[engine].append(result["seconds"])
                rss[engine] = max(rss[engine], result["rss_mib"])
                log(f"sub-{participant} {engine} run {k + 1}: {result['seconds']:.1f} s")
        sh, qid2 = statistics.median(times["sh"]), statistics.median(times["qid2"])
        rows.append(
            [
                f"sub-{participant}",
                f"{sh:.1f}",
                f"{qid2:.1f}",
                f"{qid2 / sh:.2f}×",
                f"{rss['sh']:.0f}",
                f"{rss['qid2']:.0f}",
                " / ".join(f"{t:.0f}" for t in times["qid2"]),
            ]
        )
    table = markdown_table(
        ["participant", "sh (s)", "qid2 (s)", "qid2 / sh", "sh peak RSS (MiB)",
         "qid2 peak RSS (MiB)", "qid2 runs (s)"],
        rows,
        right={1, 2, 3, 4, 5},
    )  # fmt: skip
    document = "\n".join(
        [
            f"<!-- written by `{command}`; re-run it to refresh, do not edit by hand -->",
            "",
            f"- Command: `{command}`",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- Machine: {machine_line()}",
            f"- Load average (1/5/15 min) at start: {started_load}",
            f"- Model: {args.model or 'the shipped default'}; `--nprocs {args.nprocs}`; "
            f"{args.repeats} run(s) per engine, interleaved; medians.",
            "",
            "Whole `qid2 ... participant` runs (validation, preflight, up-sampling, DTI, "
            "self-check, reports), each in a fresh process with fresh output and work folders.",
            "",
            table,
            "",
        ]
    )
    print(document)
    if args.out:
        args.out.write_text(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
