"""Speed and memory of the up-sampling engines and the QC steps, on arrays, in one process.

Run from the repository root::

    python benchmarks/bench_engines.py [--repeats N] [--bids ../shared/data/bids-real]
                                       [--no-hcp] [--out docs/benchmarks.md]

The script prints a Markdown document (tables and the machine they were measured on) to
stdout, progress to stderr, and with ``--out`` writes the same document to a file.

Rules followed (machines are shared and noisy): every time is the median of ``--repeats``
calls; every comparison is a ratio against the ``sh`` engine measured in the same process;
no number is written by hand. Memory is measured in a separate pass with :mod:`tracemalloc`
(numpy reports its buffers to it), so the timed calls are not slowed by tracing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# measure the code of this checkout, not whatever an editable install points at
sys.path.insert(0, str(REPO))
DEFAULT_BIDS_ARG = "../shared/data/bids-real"
DEFAULT_REPEATS = 3
HCP_SHAPE = (145, 174, 145)
HCP_N_DIRECTIONS = 30
HCP_BVAL = 1000.0
MIB = 2.0**20


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the Markdown document)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- measuring


def timed(func: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls of ``func``, and the last call's result.

    Each result is dropped before the next call, so at most one is alive at a time.
    """
    times, result = [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def median_seconds(func: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``func`` (results dropped)."""
    return timed(func, repeats)[0]


def peak_additional_mib(func: Callable[[], object]) -> float:
    """Peak memory allocated by one call of ``func`` above what was allocated before it.

    The result of ``func`` is counted while it is alive (it is real memory the step needs).
    """
    gc.collect()
    tracemalloc.start()
    try:
        result = func()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak / MIB


def max_rss_mib() -> float:
    """High-water mark of the process's resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- formatting


def fmt_seconds(value: float) -> str:
    """Three significant digits, never in scientific notation."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def fmt_ratio(value: float) -> str:
    """Two decimals, with the multiplication sign."""
    return f"{value:.2f}×"


def fmt_mib(value: float) -> str:
    """Whole MiB from 10 MiB up, one decimal below."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def markdown_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    """A padded Markdown table; columns whose index is in ``right`` are right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    widths = [max(w, 3) for w in widths]

    def line(cells: list[str]) -> str:
        padded = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(headers), "| " + " | ".join(rule) + " |", *map(line, rows)])


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.lower().startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def total_memory_gib() -> str:
    """Total RAM from /proc/meminfo, or '?'."""
    try:
        for row in Path("/proc/meminfo").read_text().splitlines():
            if row.startswith("MemTotal:"):
                return f"{int(row.split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return "? GiB RAM"


def blas_name() -> str:
    """Name of the BLAS numpy was built against (best effort)."""
    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info['name']} {info.get('version', '')}".strip()
    except Exception:  # older numpy, or an unexpected layout
        return "unknown BLAS"


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def thread_environment() -> list[str]:
    """``NAME=value`` for each thread-count variable the BLAS/OpenMP read that is set."""
    return [f"{name}={os.environ[name]}" for name in THREAD_VARIABLES if name in os.environ]


def thread_settings() -> str:
    """The thread-count variables that are set, or 'default threads'."""
    return ", ".join(thread_environment()) or "default threads"


def machine_line() -> str:
    """CPU, cores, memory and library versions, on one line."""
    import dipy

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({usable} usable), {total_memory_gib()}; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"numpy {np.__version__} ({blas_name()}, {thread_settings()}), dipy {dipy.__version__}"
    )


def code_location() -> str:
    """Where ``qid2_bidsapp`` was imported from, and the checkout's commit."""
    import subprocess

    import qid2_bidsapp

    where = Path(qid2_bidsapp.__file__).resolve().parent
    commit = subprocess.run(
        ["git", "-C", str(where), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"`{where}` (commit {commit or 'unknown'})"


def load_average() -> str:
    """1-, 5- and 15-minute load averages (how busy the shared machine was)."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unavailable"


# --------------------------------------------------------------------------- workload


@dataclass
class Subject:
    """One DWI run on arrays, ready to benchmark."""

    name: str
    data: np.ndarray  # (X, Y, Z, V) float32
    table: object  # GradientTable
    mask: np.ndarray  # (X, Y, Z) bool


def engines() -> dict:
    """The two classical engines with their command-line defaults."""
    from qid2_bidsapp.engines.base import get_engine

    return {"sh": get_engine("sh"), "interp": get_engine("interp")}


def predict_all(subject: Subject, plans: list, engine, mask: np.ndarray | None) -> np.ndarray:
    """What the ``Upsample`` node runs: every shell through ``engine``, concatenated."""
    from qid2_bidsapp.upsampling import upsample_shells

    synth, _, _, _ = upsample_shells(subject.data, subject.table, plans, engine, mask)
    return synth


def merged_volumes(subject: Subject, plans: list, engine) -> tuple:
    """Acquired + synthesised volumes with their b-values and b-vectors."""
    from qid2_bidsapp.upsampling import merge_volumes, upsample_shells

    synth, bvals, bvecs, _ = upsample_shells(subject.data, subject.table, plans, engine, None)
    return merge_volumes(subject.data, subject.table, synth, bvals, bvecs)


def time_merged_dti(
    subject: Subject, plans: list, repeats: int, *, free_acquired: bool = False
) -> tuple[float, float]:
    """Median time of the DTI fit on acquired + ``sh``-synthesised volumes in the mask.

    Returns the median seconds and the size of the merged array in MiB. With
    ``free_acquired`` the subject's acquired volumes are dropped once merged (saves memory).
    """
    from qid2_bidsapp.qc import fit_dti

    merged, bvals, bvecs = merged_volumes(subject, plans, engines()["sh"])
    if free_acquired:
        subject.data = None
        gc.collect()
    seconds = median_seconds(lambda: fit_dti(merged, bvals, bvecs, subject.mask), repeats)
    return seconds, merged.nbytes / MIB


def warm_up() -> None:
    """Import and exercise every code path once on a tiny array, so no timing pays for it."""
    from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal
    from qid2_bidsapp.gradients import GradientTable
    from qid2_bidsapp.qc import fit_dti, hidden_direction_check
    from qid2_bidsapp.upsampling import plan_targets

    bvals = np.r_[0.0, np.full(12, 1000.0)]
    bvecs = np.vstack([np.zeros(3), hemisphere_directions(12, 0)])
    data, brain = phantom_signal((6, 6, 4), bvals, bvecs)
    subject = Subject("warm-up", data, GradientTable(bvals, bvecs), brain)
    plans = plan_targets(subject.table, [1000], n_targets=4)
    for engine in engines().values():
        predict_all(subject, plans, engine, None)
    merged, mbvals, mbvecs = merged_volumes(subject, plans, engines()["sh"])
    fit_dti(merged, mbvals, mbvecs, brain)
    hidden_direction_check(data, bvals, bvecs, plans[0].acquired_indices, engines()["sh"], brain)


# --------------------------------------------------------------------------- real runs


def load_subject(run) -> Subject:
    """Read one BIDS run into float32 arrays with the app's own readers and brain mask."""
    from qid2_bidsapp.upsampling import brain_mask, load_dwi_header, mean_b0, read_gradients

    img = load_dwi_header(run.dwi)
    table = read_gradients(run.dwi, run.bval, run.bvec, run.bmatrix, img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return Subject(run.stem, data, table, brain_mask(mean_b0(data, table)))


@dataclass
class RunResult:
    """Measurements of one real run."""

    name: str
    shape: tuple
    shells: str
    n_acquired: int
    n_targets: int
    n_mask: int
    seconds: dict
    peak_mib: dict
    output_mib: float


def bench_real_subject(subject: Subject, repeats: int) -> RunResult:
    """Time every step of one run and measure the engines' peak memory."""
    from qid2_bidsapp.qc import fit_dti, hidden_direction_check
    from qid2_bidsapp.upsampling import plan_targets

    table = subject.table
    shells = sorted(table.shells)
    plans = plan_targets(table, shells)
    engine = engines()
    seconds = {"plan": median_seconds(lambda: plan_targets(table, shells), repeats)}
    for name, eng in engine.items():
        seconds[name] = median_seconds(lambda e=eng: predict_all(subject, plans, e, None), repeats)

    # the app fits the acquired data too; its FA is the self-check's reference
    seconds["dti_acquired"], fit = timed(
        lambda: fit_dti(subject.data, table.bvals, table.bvecs, subject.mask), repeats
    )
    fa_reference = fit.fa
    del fit
    seconds["dti"] = time_merged_dti(subject, plans, repeats)[0]

    def self_check() -> list:
        return [
            hidden_direction_check(
                subject.data,
                table.bvals,
                table.bvecs,
                plan.acquired_indices,
                engine["sh"],
                subject.mask,
                fa_reference=fa_reference,
            )
            for plan in plans
        ]

    seconds["check"] = median_seconds(self_check, repeats)

    peak = {
        name: peak_additional_mib(lambda e=eng: predict_all(subject, plans, e, None))
        for name, eng in engine.items()
    }
    n_targets = sum(len(p.targets) for p in plans)
    return RunResult(
        name=subject.name,
        shape=subject.data.shape,
        shells=", ".join(f"{b}: {len(table.shells[b])}" for b in shells),
        n_acquired=sum(len(table.shells[b]) for b in shells),
        n_targets=n_targets,
        n_mask=int(subject.mask.sum()),
        seconds=seconds,
        peak_mib=peak,
        output_mib=float(np.prod(subject.data.shape[:3])) * n_targets * 4 / MIB,
    )


def real_runs(bids_dir: Path) -> list:
    """The DWI runs of the real dataset, or an empty list when it is absent."""
    from qid2_bidsapp.bids import collect_dwi_runs

    if not (bids_dir / "dataset_description.json").exists():
        return []
    return collect_dwi_runs(bids_dir)


def real_tables(results: list[RunResult], repeats: int) -> str:
    """The three Markdown tables of the real-data section."""
    inputs = markdown_table(
        ["run", "shape (X×Y×Z×V)", "shells (b: dirs)", "acquired", "targets", "mask voxels"],
        [
            [
                r.name,
                "×".join(map(str, r.shape)),
                r.shells,
                str(r.n_acquired),
                str(r.n_targets),
                str(r.n_mask),
            ]
            for r in results
        ],
        right={3, 4, 5},
    )
    steps = [("plan", "plan_targets"), ("sh", "sh predict"), ("interp", "interp predict")]
    steps += [("dti_acquired", "DTI fit (acquired, mask)"), ("dti", "DTI fit (merged, mask)")]
    steps += [("check", "self-check (sh)")]
    seconds = markdown_table(
        ["run", *[label for _, label in steps]],
        [[r.name, *[fmt_seconds(r.seconds[k]) for k, _ in steps]] for r in results],
        right=set(range(1, len(steps) + 1)),
    )
    ratio_keys = [k for k, _ in steps if k != "sh"]
    ratio_rows = [[r.name, *[r.seconds[k] / r.seconds["sh"] for k in ratio_keys]] for r in results]
    columns = list(zip(*ratio_rows, strict=True))[1:]
    ratio_rows.append(["**median of runs**", *map(statistics.median, columns)])
    ratios = markdown_table(
        ["run", *[f"{label} / sh predict" for k, label in steps if k != "sh"]],
        [[row[0], *map(fmt_ratio, row[1:])] for row in ratio_rows],
        right=set(range(1, len(ratio_keys) + 1)),
    )
    memory_rows = [
        [r.name, r.peak_mib["sh"], r.peak_mib["interp"], r.peak_mib["interp"] / r.peak_mib["sh"]]
        + [r.output_mib]
        for r in results
    ]
    memory = markdown_table(
        ["run", "sh peak (MiB)", "interp peak (MiB)", "interp / sh", "synthesised output (MiB)"],
        [
            [row[0], fmt_mib(row[1]), fmt_mib(row[2]), fmt_ratio(row[3]), fmt_mib(row[4])]
            for row in memory_rows
        ],
        right={1, 2, 3, 4},
    )
    return "\n\n".join(
        [
            "### Inputs\n\n" + inputs,
            f"### Median wall time (s) over {repeats} repeat(s)\n\n" + seconds,
            "### Ratios of median times against `sh` predict (same process)\n\n" + ratios,
            "### Peak additional memory of one engine call (`tracemalloc`)\n\n" + memory,
        ]
    )


def real_section(bids_arg: str, repeats: int) -> str:
    """Benchmark every run of the real dataset; a one-line message when it is absent."""
    bids_dir = Path(bids_arg)
    if not bids_dir.is_absolute() and bids_arg == DEFAULT_BIDS_ARG:
        bids_dir = REPO / bids_arg
    title = f"## Real DWI runs (`{bids_arg}`)\n\n"
    runs = real_runs(bids_dir)
    if not runs:
        log(f"{bids_arg}: no BIDS dataset there; real-data section skipped")
        return title + f"_Skipped: no BIDS dataset at `{bids_arg}`._"
    results = []
    for k, run in enumerate(runs, start=1):
        log(f"real run {k}/{len(runs)}: {run.stem}")
        results.append(bench_real_subject(load_subject(run), repeats))
        gc.collect()
    rss = f"Max RSS of the process after this section: {fmt_mib(max_rss_mib())} MiB."
    return title + real_tables(results, repeats) + "\n\n" + rss


# --------------------------------------------------------------------------- HCP-size


def make_hcp_subject(shape: tuple[int, int, int]) -> tuple[Subject, float]:
    """Noise-free phantom of ``shape``: 1 b0 + 30 directions at b=1000 (float32)."""
    from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal
    from qid2_bidsapp.gradients import GradientTable

    start = time.perf_counter()
    bvals = np.r_[0.0, np.full(HCP_N_DIRECTIONS, HCP_BVAL)]
    bvecs = np.vstack([np.zeros(3), hemisphere_directions(HCP_N_DIRECTIONS, 0)])
    data, brain = phantom_signal(shape, bvals, bvecs)
    seconds = time.perf_counter() - start
    return Subject("hcp-size phantom", data, GradientTable(bvals, bvecs), brain), seconds


def hcp_section(shape: tuple[int, int, int], repeats: int) -> str:
    """Benchmark the engines and the DTI fit on an HCP-size synthetic subject."""
    from qid2_bidsapp.upsampling import plan_targets

    log(f"HCP-size: generating the phantom {shape} (not timed as a step)")
    subject, gen_seconds = make_hcp_subject(shape)
    rss_generated = max_rss_mib()
    plans = plan_targets(subject.table, [int(HCP_BVAL)])
    n_targets = sum(len(p.targets) for p in plans)
    rows = []  # (label, seconds, peak MiB or None, RSS after)

    log("HCP-size: plan_targets")
    plan_s = median_seconds(lambda: plan_targets(subject.table, [int(HCP_BVAL)]), repeats)
    rows.append(("plan_targets", plan_s, None, max_rss_mib()))
    for name, eng in engines().items():
        for mask_label, mask in (("mask=None", None), ("brain mask", subject.mask)):
            log(f"HCP-size: {name} predict, {mask_label}")

            def call(e=eng, m=mask):
                return predict_all(subject, plans, e, m)

            seconds = median_seconds(call, repeats)
            peak = peak_additional_mib(call)
            rows.append((f"{name} predict ({mask_label})", seconds, peak, max_rss_mib()))

    log("HCP-size: DTI fit on the merged data in the mask")
    data_mib = subject.data.nbytes / MIB
    dti_s, merged_mib = time_merged_dti(subject, plans, repeats, free_acquired=True)
    rows.append(("DTI fit (merged, mask)", dti_s, None, max_rss_mib()))

    baseline = rows[1][1]  # sh predict, mask=None
    table = markdown_table(
        [
            "step",
            "median (s)",
            "/ sh predict (mask=None)",
            "peak additional (MiB)",
            "max RSS after (MiB)",
        ],
        [
            [
                label,
                fmt_seconds(s),
                fmt_ratio(s / baseline),
                "—" if peak is None else fmt_mib(peak),
                fmt_mib(rss),
            ]
            for label, s, peak, rss in rows
        ],
        right={1, 2, 3, 4},
    )
    n_vox = int(np.prod(shape))
    facts = (
        f"Grid {'×'.join(map(str, shape))} ({n_vox} voxels), 1 b0 + {HCP_N_DIRECTIONS} "
        f"directions at b={HCP_BVAL:g} → {n_targets} targets; brain mask from the phantom: "
        f"{int(subject.mask.sum())} voxels ({100 * subject.mask.mean():.0f} %). "
        f"Acquired data {fmt_mib(data_mib)} MiB, merged data {fmt_mib(merged_mib)} MiB (float32). "
        f"Generating the phantom took {fmt_seconds(gen_seconds)} s (not part of any step); "
        f"max RSS after generating it: {fmt_mib(rss_generated)} MiB."
    )
    title = f"## HCP-size synthetic subject ({repeats} repeat(s), medians)\n\n"
    return title + facts + "\n\n" + table


# --------------------------------------------------------------------------- document


METHOD = """\
## Method

- Every step runs on in-memory arrays in this one process (no Nipype, no file I/O inside a
  timed call); times are **medians** over the repeats, and ratios compare medians measured in
  the same process against the `sh` engine, which is the baseline.
- *sh / interp predict*: `upsample_shells` with the engine at its command-line defaults, every
  up-sampled shell, `mask=None` as the app runs the classical engines (slicing the shell,
  `predict`, concatenating).
- *plan_targets*: choosing the new directions (default 2× the acquired count per shell).
- *DTI fit (merged, mask)*: `qc.fit_dti` (DIPY WLS) on acquired + `sh`-synthesised volumes in
  the brain mask (real runs: `median_otsu` of the mean b0, as the app computes it; HCP-size:
  the phantom's brain).
- *DTI fit (acquired, mask)*: the same fit on the acquired volumes only (the app runs it too);
  its FA is the reference the self-check is given, as in the app.
- *self-check (sh)*: `qc.hidden_direction_check` with the `sh` engine on every up-sampled
  shell (predicting ~10 % hidden directions, then one more DTI fit in the mask).
- *Peak additional memory*: the `tracemalloc` peak of one extra call, measured in a separate
  pass (output array included); *max RSS* is the process's high-water mark
  (`resource.getrusage`), so it only grows through the run.
- Thread-count variables set for the run are part of the command and the machine line; on a
  busy shared machine, `OPENBLAS_NUM_THREADS=1` gives steadier times (a multi-threaded BLAS
  call waits for its slowest thread, i.e. for a core someone else is using).
"""


def header(command: str) -> str:
    """Title, provenance (command, date, machine) and method."""
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        "# Benchmarks\n\n"
        f"<!-- written by `{command}`; re-run it to refresh, do not edit by hand -->\n\n"
        "Speed and memory of the up-sampling engines and the QC steps.\n\n"
        f"- Command: `{command}`\n"
        f"- Date: {date}\n"
        f"- Code: `qid2_bidsapp` from {code_location()}\n"
        f"- Machine: {machine_line()}\n"
        f"- Load average (1/5/15 min) at start: {load_average()}\n\n" + METHOD
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="timed calls per step (default: %(default)s)",
    )
    parser.add_argument(
        "--bids",
        default=DEFAULT_BIDS_ARG,
        help=f"real BIDS dataset (default: {DEFAULT_BIDS_ARG}, relative to the repository root)",
    )
    parser.add_argument("--no-hcp", action="store_true", help="skip the HCP-size subject")
    parser.add_argument(
        "--hcp-shape",
        type=int,
        nargs=3,
        default=list(HCP_SHAPE),
        metavar=("X", "Y", "Z"),
        help="grid of the HCP-size subject (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="also write the document to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the document, optionally write it to ``--out``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # thread variables are read by the BLAS at start-up: they belong to the command
    command = shlex.join([*thread_environment(), "python", "benchmarks/bench_engines.py", *argv])
    sections = [header(command)]
    print(sections[0], flush=True)
    log("warming up (imports, first calls)")
    warm_up()
    sections.append(real_section(args.bids, args.repeats))
    print(sections[-1] + "\n", flush=True)
    if not args.no_hcp:
        sections.append(hcp_section(tuple(args.hcp_shape), args.repeats))
        print(sections[-1] + "\n", flush=True)
    footer = (
        f"Max RSS of the whole benchmark process: {fmt_mib(max_rss_mib())} MiB. "
        f"Load average (1/5/15 min) at the end: {load_average()}."
    )
    sections.append(footer)
    print(footer, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n\n".join(s.rstrip("\n") for s in sections) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
