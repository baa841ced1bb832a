"""Per-pair CPU time of the qid2 sampler by implementation variant, measured in one process.

Run from the repository root::

    python benchmarks/profile_qid2_cpu.py [--threads 2] [--slices 2] [--targets 8]
                                          [--repeats 3] [--cases prisma hcp]
                                          [--variants baseline fused new new-b4 ...]
                                          [--profile] [--out FILE]

Cases: ``prisma``, a few central slices of ``sub-prisma_ses-ortho`` from
``../shared/data/bids-real`` (72×72 in-plane; a 72×72×36 phantom when the data are absent) and
``hcp``, a few central slices of the HCP-size phantom (145×174, 30 directions at b=1000), both
with their brain mask and the first ``--targets`` directions the app would plan. Each run calls
`qid2_bidsapp.model.inference.synthesise_shell` with the shipped model's CPU sampler defaults,
exactly as the engine does.

Variants switch implementation choices that must not change the result beyond float round-off:
``baseline`` is the code before the CPU speed-ups (MONAI's einsum attention, NCHW weights,
automatic batch); ``fused`` adds fused attention; ``new`` (the current default) adds
channels-last weights; ``new-bN`` is ``new`` with a batch of N pairs; ``new-nocl-bN`` likewise
without channels-last. Variants run interleaved, ``--repeats`` rounds, on the same data in the
same process, so the machine's load hits them alike; the table gives the median per-pair time,
its ratio to ``baseline``'s median, the median over rounds of the ratio within a round (more
robust when the load changes between rounds), and the largest difference of the predicted
signal from ``baseline``'s, divided by S0 (inside the mask). Timings are wall-clock seconds per
(slice, target) pair (K samples x n_steps network evaluations each).

``--profile`` also runs torch.profiler over one ``baseline`` and one ``new`` run of each case
and prints the operators' share of the CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_qid2 import load_case as bench_load_case  # noqa: E402
from bench_qid2 import real_cases  # noqa: E402

PRISMA = "prisma_ses-ortho"


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[profile-qid2] {message}", file=sys.stderr, flush=True)


def central(n_total: int, n: int) -> slice:
    """The `n` central indices of `n_total`."""
    n = max(1, min(n, n_total))
    start = n_total // 2 - n // 2
    return slice(start, start + n)


def load_case(name: str, n_slices: int, bids: Path):
    """Return (label, data, table, mask, n_targets) of a case, cut to its central slices.

    The data come from `bench_qid2.load_case`, as in the end-to-end benchmark.
    """
    if name == "hcp":
        data, table, mask, n_targets = bench_load_case({"kind": "hcp", "slices": n_slices})
        return "hcp-size phantom", data, table, mask, n_targets
    cases = real_cases(bids, [PRISMA])
    if cases:
        data, table, mask, n_targets = bench_load_case(cases[0])
        label = f"sub-{PRISMA}"
    else:  # no real data: a phantom of the same size
        from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal
        from qid2_bidsapp.gradients import GradientTable

        bvals = np.r_[0.0, np.full(20, 1000.0)]
        bvecs = np.vstack([np.zeros(3), hemisphere_directions(20, 0)])
        data, mask = phantom_signal((72, 72, 36), bvals, bvecs)
        table, label, n_targets = GradientTable(bvals, bvecs), "72x72 phantom (no real data)", None
    keep = central(data.shape[2], n_slices)
    return label, np.ascontiguousarray(data[:, :, keep]), table, mask[:, :, keep], n_targets


class Case:
    """Everything `synthesise_shell` needs for one shell of one case."""

    def __init__(self, name: str, n_slices: int, n_targets: int, bids: Path):
        from qid2_bidsapp.model.data import model_frame_bvecs, sh_prior_matrix
        from qid2_bidsapp.upsampling import mean_b0, plan_targets

        label, data, table, mask, planned = load_case(name, n_slices, bids)
        plan = plan_targets(table, sorted(table.shells), n_targets=planned)[0]
        affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # the engine's frame without an affine
        self.label = label
        self.signal = data[..., plan.acquired_indices].astype(np.float32)
        self.b0 = mean_b0(data, table)
        self.mask = mask
        self.bval = float(plan.bval)
        self.frame_in = model_frame_bvecs(table.bvecs[plan.acquired_indices], affine, 2)
        self.frame_out = model_frame_bvecs(plan.targets[:n_targets], affine, 2)
        self.prior = sh_prior_matrix(self.frame_in, self.frame_out)
        self.n_slices = int(mask.any(axis=(0, 1)).sum())
        self.n_pairs = self.n_slices * len(self.frame_out)

    def describe(self) -> str:
        from qid2_bidsapp.model.inference import SliceGrid, padded_shape

        grid = SliceGrid.from_mask(self.mask, 4)
        h, w = grid.shape
        ph, pw = padded_shape((h, w), 4)
        return (
            f"{self.label}: {self.signal.shape[0]}×{self.signal.shape[1]} slices, crop {h}×{w} "
            f"(padded {ph}×{pw}, {100 * (ph * pw / (h * w) - 1):.1f} % padding), "
            f"{self.n_slices} slices × {len(self.frame_out)} targets = {self.n_pairs} pairs"
        )


VARIANTS = {
    # name: (fused attention, channels-last, batch size or None for automatic)
    "baseline": (False, False, None),
    "fused": (True, False, None),
    "new": (True, True, None),
}


def variant_spec(name: str) -> tuple[bool, bool, int | None]:
    """Parse a variant name (see the module docstring)."""
    if name in VARIANTS:
        return VARIANTS[name]
    for prefix, cl in (("new-nocl-b", False), ("new-b", True), ("baseline-b", None)):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            size = int(name[len(prefix) :])
            return (cl is not None, bool(cl), size)
    raise SystemExit(f"unknown variant {name!r}")


@contextlib.contextmanager
def applied(network, name: str):
    """Switch the network and the inference module to a variant for the ``with`` block."""
    from qid2_bidsapp.model import inference
    from qid2_bidsapp.model.network import set_fused_attention

    fused, cl, _ = variant_spec(name)
    previous = inference.CPU_CHANNELS_LAST
    set_fused_attention(network, fused)
    inference.CPU_CHANNELS_LAST = cl
    try:
        yield variant_spec(name)[2]
    finally:
        inference.CPU_CHANNELS_LAST = previous
        set_fused_attention(network, True)


def run_once(network, sampler, settings, case: Case, batch: int | None):
    """One `synthesise_shell` call; return (seconds, mean, batch size used)."""
    from qid2_bidsapp.model.inference import synthesise_shell

    start = time.perf_counter()
    mean, _, used = synthesise_shell(
        network,
        sampler,
        case.signal,
        case.b0,
        case.mask,
        case.frame_in,
        case.frame_out,
        case.bval,
        case.prior,
        settings,
        seed=0,
        margin=4,
        batch_size=batch,
    )
    return time.perf_counter() - start, mean, used


def profile_table(network, sampler, settings, case: Case, name: str, top: int) -> str:
    """torch.profiler's operator table of one run, as Markdown (share of self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with applied(network, name) as batch, profile(activities=[ProfilerActivity.CPU]) as prof:
        run_once(network, sampler, settings, case, batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    lines = [
        f"Top operators, `{name}` on {case.label} (torch.profiler, self CPU time):",
        "",
        "| operator | self CPU (s) | share | calls |",
        "| --- | ---: | ---: | ---: |",
    ]
    for event in events[:top]:
        lines.append(
            f"| `{event.key}` | {event.self_cpu_time_total / 1e6:.2f} | "
            f"{100 * event.self_cpu_time_total / total:.1f} % | {event.count} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--slices", type=int, default=2, help="central slices per case")
    parser.add_argument("--targets", type=int, default=8, help="target directions per case")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--cases", nargs="+", default=["prisma", "hcp"], choices=["prisma", "hcp"])
    parser.add_argument(
        "--variants", nargs="+", default=["baseline", "fused", "new", "new-b4", "new-b16"]
    )
    parser.add_argument("--model", type=Path, default=REPO / "models" / "qid2-per-target")
    parser.add_argument("--bids", type=Path, default=REPO.parent / "shared" / "data" / "bids-real")
    parser.add_argument("--profile", action="store_true", help="also print operator profiles")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    for name in args.variants:
        variant_spec(name)
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")

    import torch

    from qid2_bidsapp.model.checkpoint import load_model
    from qid2_bidsapp.model.inference import SamplerSettings
    from qid2_bidsapp.model.sampler import Qid2Sampler

    torch.set_num_threads(args.threads)
    network, config, info = load_model(args.model)
    network.eval()
    sampler = Qid2Sampler(config)
    settings = SamplerSettings(
        t_start=200, temperature=1.0, eta=0.0, **config.sampler_defaults["cpu"]
    )
    out = [
        "# qid2 CPU sampler: per-pair time by variant",
        "",
        f"- Command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`",
        f"- Model `{info['model_id']}`, sampler {settings.to_dict()}; torch {torch.__version__}, "
        f"{args.threads} thread(s), {args.repeats} interleaved rounds (medians)",
    ]
    profiles = []
    for case_name in args.cases:
        case = Case(case_name, args.slices, args.targets, args.bids)
        log(case.describe())
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        reference, diffs, used = None, dict.fromkeys(args.variants, 0.0), {}
        for name in args.variants:  # warm-up, and the outputs to compare
            with applied(network, name) as batch:
                _, mean, used[name] = run_once(network, sampler, settings, case, batch)
            if reference is None:
                reference = mean
            scale = np.where(case.mask, case.b0, np.inf)[..., None]
            diffs[name] = float(np.max(np.abs(mean - reference) / scale))
        for round_ in range(args.repeats):
            for name in args.variants:
                with applied(network, name) as batch:
                    seconds, _, _ = run_once(network, sampler, settings, case, batch)
                times[name].append(seconds / case.n_pairs)
            log(
                f"{case_name} round {round_ + 1}: "
                + ", ".join(f"{n} {1e3 * t[-1]:.0f} ms" for n, t in times.items())
            )
        base = statistics.median(times["baseline"])
        out += [
            "",
            f"## {case.label}",
            "",
            case.describe(),
            "",
            "| variant | batch | per pair (ms), median | min–max (ms) | speed-up (medians) | "
            "speed-up (median of rounds) | max abs diff (S/S0) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in args.variants:
            med = statistics.median(times[name])
            rounds = statistics.median(
                b / t for b, t in zip(times["baseline"], times[name], strict=True)
            )
            out.append(
                f"| {name} | {used[name]} | {1e3 * med:.1f} | {1e3 * min(times[name]):.1f}–"
                f"{1e3 * max(times[name]):.1f} | {base / med:.2f}× | {rounds:.2f}× | "
                f"{diffs[name]:.1e} |"
            )
        if args.profile:
            for name in ("baseline", "new"):
                profiles += ["", profile_table(network, sampler, settings, case, name, 12)]
    text = "\n".join(out + profiles) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
