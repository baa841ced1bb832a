"""``qid2-eval``: score up-sampling methods against full acquisitions (the evaluation harness)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import EngineUnavailableError, Qid2Error
from ..model.field_config import PRECISIONS, SYMMETRY_COUNTS
from .parser import _non_negative_int, _positive_int, _t_start

DEFAULT_METHODS = "sh,interp,none,qid2,mrtrix"


def _on_off(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


#: ``--qid2-variant`` keys and the engine options they set.
VARIANT_KEYS = {
    "steps": ("n_steps", int),
    "t_start": ("t_start", lambda v: "noise" if v.lower() == "noise" else int(v)),
    "temperature": ("temperature", float),
    "samples": ("n_samples", int),
    "symmetries": ("symmetries", int),
    "log_mean": ("log_mean_from_prior", _on_off),
    "eta": ("eta", float),
    "adapt": ("adapt_steps", int),
    "adapt_lr": ("adapt_lr", float),
    "slice_axis": ("slice_axis", int),
    "precision": ("precision", str),
}

#: Real scans bundled with DIPY that --dipy accepts (`evaluation.cases.DIPY_CASES`).
DIPY_CASE_NAMES = ("small_64D", "small_25")

DEFINITIONS = """\
Protocol: each case is a full acquisition; every b=0 volume and the best-spread subset of each
shell (lowest antipodal electrostatic energy) are given to the method, which predicts the other
(held-out) directions. FA: single-tensor WLS DTI on input + predicted volumes (`none`: on the
input alone), compared in the brain mask with DTI on the full acquisition (and, for simulations,
on the noise-free truth: the `(truth)` columns; the `full` row is the full acquisition itself
against the truth, the floor set by the noise; the `perfect` row merges the given volumes with
the noise-free signal at the held-out directions: what an exact prediction would gain). FA SSIM:
Gaussian-window SSIM (σ = 1.5 voxels, 3D, data range 1) averaged in the mask. NRMSE / PSNR /
SSIM: predicted vs acquired held-out volumes in the mask (peak = the reference's maximum in the
mask). RISH NMSE: rotation-invariant SH features (order 4, λ = 0.006, DIPY descoteaux07 basis)
of input + predicted volumes vs those of the full acquisition, averaged over shells. `vs best
classical`: median over cases of the method's FA MAE divided by the lower FA MAE of `sh` and
`none` on the same case (< 0.85 = beats the best classical method by at least 15 %). seconds:
prediction time per case (median). FA bias: mean of (merged FA - reference FA) in the mask,
signed (negative: the method lowers FA). MD MAE: in 10^-3 mm^2/s. `≈ N acquired`
(`--equivalent-directions`): DTI is fitted on best-spread subsets of N directions of the full
acquisition (all b=0 kept); the method's FA MAE is matched on that curve (linear interpolation):
its data are worth N acquired directions ("> full": better than the full scan against the truth;
"< smallest": worse than 6 directions). CSD (`--hardi`): DIPY constrained spherical
deconvolution (one response, from the reference; order from the direction count, 6-8) on the
merged data vs on the reference, in white matter (reference FA > 0.3, at most 6000 voxels):
median fODF angular correlation (ACC, orders >= 2) and median angle between the largest fODF
peaks.
"""


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return number


def _slab(value: str) -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP, got {value!r}") from None
    if not 0 <= start < stop:
        raise argparse.ArgumentTypeError(f"need 0 <= START < STOP, got {value!r}")
    return start, stop


def _variant(value: str) -> tuple[str, dict]:
    name, _, settings = value.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"variant needs a name such as fast:steps=5, got {value}")
    from ..evaluation.harness import REFERENCE_ROWS

    if name in REFERENCE_ROWS:
        raise argparse.ArgumentTypeError(
            f"variant name {name!r} is taken by a reference row ({', '.join(REFERENCE_ROWS)})"
        )
    options = {}
    for item in filter(None, settings.split(",")):
        key, _, raw = item.partition("=")
        if key not in VARIANT_KEYS or not raw:
            raise argparse.ArgumentTypeError(
                f"variant setting {item!r}: use key=value with key in {', '.join(VARIANT_KEYS)}"
            )
        option, convert = VARIANT_KEYS[key]
        try:
            options[option] = convert(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"variant setting {item!r}: bad value") from None
    return name, options


def build_parser() -> argparse.ArgumentParser:
    """Return the ``qid2-eval`` argument parser.

    Returns
    -------
    argparse.ArgumentParser

    """
    parser = argparse.ArgumentParser(
        prog="qid2-eval",
        description=(
            "Evaluate q-space up-sampling: give each method a uniform subset of a full "
            "acquisition, predict the rest, and score FA (MAE, SSIM) against DTI on the full "
            "acquisition (and the noise-free truth for simulations), the synthesised volumes "
            "(NRMSE, PSNR, SSIM), RISH L0/L2/L4 NMSE and wall time. Writes results.tsv, "
            "results.md and fa_mae.png to --out."
        ),
    )
    cases = parser.add_argument_group("Cases")
    cases.add_argument(
        "--bids",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="BIDS dataset (raw or QSIPrep-style): every DWI run is a case (repeatable)",
    )
    cases.add_argument(
        "--participant-label", nargs="+", metavar="LABEL", help="only these subjects of --bids"
    )
    cases.add_argument(
        "--dipy",
        action="append",
        default=[],
        choices=sorted(DIPY_CASE_NAMES),
        help="a real scan bundled with DIPY (offline; small_64D: 64 directions at b=1000, "
        "10x10x10 voxels; small_25: 25 directions at b=2000, 10x8x2 voxels), "
        "split by --fraction (repeatable)",
    )
    cases.add_argument(
        "--fraction",
        type=_fraction,
        default=0.5,
        help="fraction of each shell's directions given as input for --bids runs (default 0.5)",
    )
    cases.add_argument(
        "--simulated",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="N simulated held-out brains (qid2_bidsapp.sim), each in the protocols 30 -> 90 and "
        "15 -> 45 directions at b=1000",
    )
    cases.add_argument(
        "--snr", type=float, default=20.0, help="SNR of the simulated brains (default 20)"
    )
    cases.add_argument(
        "--sim-slab",
        type=_slab,
        metavar="START:STOP",
        help="simulate only axial slices START..STOP-1 of each brain (the 2.5 mm grid has 73): "
        "a whole brain takes the CPU engine of qid2 tens of minutes",
    )
    cases.add_argument(
        "--phantom",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="N small analytic crossing-fibre phantoms (15 -> 30 directions, SNR --snr): a "
        "quick check with a known truth",
    )
    meth = parser.add_argument_group("Methods")
    meth.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated methods (default {DEFAULT_METHODS}); 'none' is DTI on the input "
        "subset; qid2 is skipped without a model, mrtrix without amp2sh/sh2amp",
    )
    meth.add_argument("--model", type=Path, metavar="DIR", help="qid2 model folder")
    meth.add_argument(
        "--sampler-steps",
        type=_positive_int,
        metavar="N",
        help="default: the model's setting for the device, as in the app",
    )
    meth.add_argument("--sampler-t-start", type=_t_start, metavar="T")
    meth.add_argument("--temperature", type=float, default=1.0, metavar="τ")
    meth.add_argument(
        "--n-samples",
        type=_positive_int,
        metavar="K",
        help="default: the model's setting for the device, as in the app",
    )
    meth.add_argument(
        "--symmetries",
        type=int,
        choices=SYMMETRY_COUNTS,
        metavar="S",
        help="mirrored copies of each slice averaged; default: the model's setting, as in the app",
    )
    meth.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    meth.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="network precision, as in the app (auto: the model's setting for the device)",
    )
    meth.add_argument("--batch-size", type=_positive_int, metavar="N")
    meth.add_argument(
        "--qid2-variant",
        type=_variant,
        action="append",
        default=[],
        metavar="NAME:KEY=V,...",
        help="extra qid2 method 'qid2-NAME' with other sampler settings, e.g. "
        "fast:steps=5,samples=1 (keys: steps, t_start, temperature, samples, symmetries, eta, "
        "log_mean = 0 or 1 (the model's log_mean_from_prior), adapt = --adapt-steps, "
        "adapt_lr, slice_axis = the voxel axis the slices are cut along, precision); repeatable",
    )
    meth.add_argument("--sh-order", type=int, help="fixed SH order of 'sh' (default: auto)")
    meth.add_argument("--sh-lambda", type=float, default=0.006, help="regularisation of 'sh'")
    meth.add_argument("--n-neighbours", type=_positive_int, default=3, help="R of 'interp'")
    meth.add_argument("--mrtrix-lmax", type=int, help="amp2sh -lmax (default: MRtrix3's)")
    extra = parser.add_argument_group("extra metrics")
    extra.add_argument(
        "--hardi",
        action="store_true",
        help="also run DIPY CSD on the merged and the reference data: fODF ACC and main-peak "
        "angular error in white matter (reference FA > 0.3)",
    )
    extra.add_argument(
        "--equivalent-directions",
        action="store_true",
        help="also fit DTI on best-spread subsets of N acquired directions and report, per "
        "method, the N whose FA error matches it",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed (phantoms, simulation, qid2)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def resolve_methods(args: argparse.Namespace) -> tuple[list, list[str]]:
    """Turn ``--methods`` and the engine settings into methods; skip unavailable ones.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments.

    Returns
    -------
    methods : list of Method
    notes : list of str
        One line per skipped method, saying why.

    """
    from ..evaluation.methods import METHOD_KINDS, Method, mrtrix_available

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHOD_KINDS]
    if unknown or not names:
        raise Qid2Error(
            f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from "
            f"{', '.join(METHOD_KINDS)}"
        )
    methods, notes = [], []
    for name in dict.fromkeys(names):
        if name == "sh":
            methods.append(
                Method("sh", "sh", {"sh_order": args.sh_order, "sh_lambda": args.sh_lambda})
            )
        elif name == "interp":
            methods.append(Method("interp", "interp", {"n_neighbours": args.n_neighbours}))
        elif name == "none":
            methods.append(Method("none", "none"))
        elif name == "mrtrix":
            if mrtrix_available():
                methods.append(Method("mrtrix", "mrtrix", {"lmax": args.mrtrix_lmax}))
            else:
                notes.append("mrtrix skipped: amp2sh/sh2amp (MRtrix3) not on the PATH")
        elif name == "qid2":
            methods.extend(_qid2_methods(args, notes))
    return methods, notes


def _qid2_methods(args: argparse.Namespace, notes: list[str]) -> list:
    from ..engines.base import get_engine
    from ..evaluation.methods import Method

    base = {
        "model_dir": None if args.model is None else str(args.model),
        "n_steps": args.sampler_steps,
        "t_start": args.sampler_t_start,
        "temperature": args.temperature,
        "n_samples": args.n_samples,
        "symmetries": args.symmetries,
        "device": args.device,
        "precision": args.precision,
        "seed": args.seed,
    }
    if args.batch_size:
        base["batch_size"] = args.batch_size
    try:
        engine = get_engine("qid2", **base)  # checks the model once (checksums, settings)
    except EngineUnavailableError as err:
        if args.model is not None and not Path(args.model).is_dir():
            raise Qid2Error(f"--model {args.model}: not a folder") from None
        notes.append(f"qid2 skipped: {err}")
        return []
    try:
        precision = engine.resolved_precision()
    except EngineUnavailableError as err:
        notes.append(f"qid2 skipped: {err}")
        return []
    notes.append(
        f"qid2: model {engine.info['model_id']}, device {engine.settings()['device']}, "
        f"precision {precision} (variants may set their own)"
    )
    base["expected_sha256"] = engine.info["sha256"]
    methods = [Method("qid2", "qid2", base)]
    for name, options in args.qid2_variant:
        methods.append(Method(f"qid2-{name}", "qid2", {**base, **options}))
    return methods


def iter_cases(args: argparse.Namespace):
    """Yield the cases asked for, BIDS runs first, then phantoms, then simulations.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments.

    Yields
    ------
    EvalCase

    """
    from ..evaluation.cases import (
        load_bids_cases,
        load_dipy_case,
        phantom_case,
        simulated_cases,
    )

    for bids in args.bids:
        yield from load_bids_cases(
            bids, fraction=args.fraction, participant_labels=args.participant_label
        )
    for name in args.dipy:
        yield load_dipy_case(name, fraction=args.fraction)
    for k in range(args.phantom):
        yield phantom_case(snr=args.snr, seed=args.seed + k, name=f"phantom-{k:02d}")
    if args.simulated:
        yield from simulated_cases(args.simulated, snr=args.snr, seed=args.seed, slab=args.sim_slab)


def _has_number(value) -> bool:
    return isinstance(value, int | float) and value == value


def render_markdown(rows: list[dict], notes: list[str], command: str) -> str:
    """Render ``results.md``: command, machine, definitions, summary and per-case tables.

    Parameters
    ----------
    rows : list of dict
        Rows with ratios.
    notes : list of str
        Skipped methods.
    command : str
        The command line.

    Returns
    -------
    str

    """
    from ..evaluation.report import per_case_markdown, summary_markdown

    today = datetime.date.today().isoformat()
    lines = [
        "# qid2-eval results",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Run on {today}, {platform.node() or 'unknown host'}: {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}.",
        "",
        *(f"- {note}" for note in notes),
        "" if notes else "",
        DEFINITIONS,
        summary_markdown(rows),
        "## FA MAE per case",
        "",
        per_case_markdown(rows, "fa_mae"),
        "",
    ]
    truth_rows = [r for r in rows if _has_number(r.get("fa_mae_truth"))]
    if truth_rows:
        lines += [
            "## FA MAE against the truth per case",
            "",
            per_case_markdown(truth_rows, "fa_mae_truth"),
            "",
        ]
    lines += ["![FA MAE per case](fa_mae.png)", ""]
    return "\n".join(lines)


def _write_outputs(rows: list[dict], notes: list[str], command: str, out: Path) -> None:
    """Write results.tsv, results.md and fa_mae.png into ``out`` (all or nothing)."""
    from ..evaluation.report import plot_fa_mae, write_tsv

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qid2-eval-", dir=out) as tmp:
        tmp = Path(tmp)
        write_tsv(rows, tmp / "results.tsv")
        (tmp / "results.md").write_text(render_markdown(rows, notes, command))
        plot_fa_mae(rows, tmp / "fa_mae.png")
        for name in ("results.tsv", "results.md", "fa_mae.png"):
            shutil.move(str(tmp / name), str(out / name))


def main(argv: list[str] | None = None) -> int:
    """Run ``qid2-eval``.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 on an error (one line on stderr, nothing written), 2 on bad usage.

    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.bids or args.simulated or args.phantom or args.dipy):
        parser.error(
            "nothing to evaluate: give --bids DIR, --dipy NAME, --simulated N and/or --phantom N"
        )
    argv_used = sys.argv[1:] if argv is None else argv
    command = "qid2-eval " + " ".join(shlex.quote(a) for a in argv_used)

    def log(line: str) -> None:
        if not args.quiet:
            print(f"qid2-eval: {line}", file=sys.stderr, flush=True)

    try:
        from ..evaluation.harness import evaluate
        from ..evaluation.report import add_ratios

        for bids in args.bids:
            if not bids.is_dir():
                raise Qid2Error(f"{bids}: --bids folder not found")
        methods, notes = resolve_methods(args)
        for note in notes:
            log(note)
        if not methods:
            raise Qid2Error("no method left to run (see the notes above)")
        rows = add_ratios(
            evaluate(
                iter_cases(args),
                methods,
                log=log,
                hardi=args.hardi,
                equivalence=args.equivalent_directions,
            )
        )
        if not rows:
            raise Qid2Error("no case to evaluate")
        _write_outputs(rows, notes, command, args.out)
    except Qid2Error as exc:
        print(f"qid2-eval: error: {exc}", file=sys.stderr)
        return 1
    log(f"wrote {args.out / 'results.md'}, results.tsv and fa_mae.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
