"""The command line of qid2 (BIDS-Apps convention), built in one factory."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__
from ..engines.base import ENGINE_NAMES
from ..hpc_plugin import PLUGINS
from ..model.field_config import PRECISIONS, SYMMETRY_COUNTS


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def _t_start(value: str) -> int | str:
    if value.strip().lower() == "noise":
        return "noise"
    try:
        return _non_negative_int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a timestep (integer >= 0) or 'noise', got {value}"
        ) from None


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {value}")
    return path.resolve()


def _existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {value}")
    return path.resolve()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` only where the help does not already say it and X is a value."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose 'required' error shows the BIDS-Apps call."""

    def error(self, message: str):
        if "the following arguments are required" in message:
            message += (
                "; call it as: qid2 BIDS_DIR OUTPUT_DIR {participant,group} [options], e.g. "
                "qid2 /data/bids /data/derivatives/qid2 participant (see qid2 --help)"
            )
        super().error(message)


def _build_parser() -> argparse.ArgumentParser:
    """Build the qid2 argument parser.

    Returns
    -------
    argparse.ArgumentParser

    """
    parser = _Parser(
        prog="qid2",
        description=(
            "qid2: q-space (angular) up-sampling of diffusion MRI. Synthesises new gradient "
            "directions for each DWI run of a BIDS dataset, writes a BIDS derivative with DTI/FA "
            "quality control and an HTML report per participant."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "bids_dir",
        type=Path,
        help="the input dataset: raw BIDS, or QSIPrep-style derivatives (see --input-type)",
    )
    parser.add_argument(
        "output_dir", type=Path, help="the derivative dataset to write (created if missing)"
    )
    parser.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="'participant' processes runs; 'group' summarises the QC of all participants",
    )
    parser.add_argument("--version", action="version", version=f"qid2 {__version__}")

    select = parser.add_argument_group("Selecting data")
    select.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="participants to process, with or without 'sub-' (default: all)",
    )
    select.add_argument(
        "--session-id",
        nargs="+",
        metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )
    select.add_argument(
        "--bids-filter-file",
        type=_existing_file,
        metavar="FILE",
        help="JSON of extra pybids filters for the DWI query, "
        'e.g. {"dwi": {"acquisition": "hardi"}}',
    )
    select.add_argument(
        "--input-type",
        choices=["auto", "raw", "qsiprep"],
        default="auto",
        help="raw BIDS, or QSIPrep-style derivatives (*_space-*_desc-preproc_dwi with mask)",
    )
    select.add_argument(
        "--skip-bids-validation",
        action="store_true",
        help="do not run the BIDS validator on the input",
    )

    upsample = parser.add_argument_group("Up-sampling")
    upsample.add_argument(
        "--engine",
        choices=ENGINE_NAMES,
        default="qid2",
        help="qid2: the diffusion model; sh: regularised spherical harmonics; interp: the QID2 "
        "paper's interpolation baseline",
    )
    targets = upsample.add_mutually_exclusive_group()
    targets.add_argument(
        "--n-targets",
        type=_positive_int,
        metavar="N",
        help="new directions per shell (default: twice the acquired count)",
    )
    targets.add_argument(
        "--target-bvecs",
        type=_existing_file,
        metavar="FILE",
        help="new directions from a file (3 rows or 3 columns, unit vectors in image axes), "
        "used for every up-sampled shell",
    )
    upsample.add_argument(
        "--shells",
        nargs="+",
        type=_positive_float,
        metavar="B",
        help="b-values (s/mm²) of the shells to up-sample, each separately (default: all)",
    )
    upsample.add_argument(
        "--sh-order",
        type=_positive_int,
        metavar="L",
        help="SH engine: maximal even order (default: from the direction count, at most 8)",
    )
    upsample.add_argument(
        "--sh-lambda",
        type=float,
        default=0.006,
        metavar="λ",
        help="SH engine: Laplace–Beltrami regularisation weight",
    )
    upsample.add_argument(
        "--n-hidden",
        type=_non_negative_int,
        metavar="N",
        help="acquired directions per shell hidden for the self-check QC (default: ~10%%; 0 "
        "disables it)",
    )
    upsample.add_argument(
        "--random-seed",
        type=int,
        default=0,
        metavar="SEED",
        help="seed for target directions, the self-check and the diffusion sampler",
    )

    model = parser.add_argument_group("Diffusion engine (--engine qid2)")
    model.add_argument(
        "--model",
        type=_existing_dir,
        metavar="DIR",
        help="model folder (weights, config, card, checksums; written by qid2-train); default: "
        "the model shipped with qid2 (models/qid2-default), or $QID2_MODEL_DIR when set",
    )
    model.add_argument(
        "--sampler-steps",
        type=_positive_int,
        metavar="N",
        help="DDIM steps per sample (network evaluations); default: the model's setting for "
        "the device (shipped model: 2 on a GPU, 1 on the CPU)",
    )
    model.add_argument(
        "--sampler-t-start",
        type=_t_start,
        metavar="T",
        help="first timestep of the truncated chain, which starts from the SH prediction "
        "noised to T (smaller: closer to the SH prior); 'noise' runs the full chain from pure "
        "noise; default: the model's setting",
    )
    model.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=1.0,
        metavar="τ",
        help="scale of the sampler's noise (0: deterministic, all samples equal)",
    )
    model.add_argument(
        "--n-samples",
        type=_positive_int,
        metavar="K",
        help="samples per synthesised slice (and per mirrored copy, see --symmetries): their "
        "mean is the output, their standard deviation the uncertainty map; default: the "
        "model's setting for the device (shipped model: 2 on a GPU, 1 on the CPU)",
    )
    model.add_argument(
        "--symmetries",
        type=int,
        choices=SYMMETRY_COUNTS,
        metavar="S",
        help="run the model on S mirrored copies of each slice (1, 2, 4 or 8) "
        "and average them: more accurate, S times the cost; default: the model's setting "
        "for the device (shipped model: 4 on a GPU, 4 on the CPU)",
    )
    model.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the network runs; auto: a CUDA GPU when there is one (mixed precision), "
        "else the CPU",
    )
    model.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="precision of the network: auto (bfloat16 on a GPU; on the CPU, bfloat16 where "
        "the model was validated with it and the CPU runs it natively, else float32), "
        "float32, or bfloat16",
    )
    model.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="network batch: slices for SH-field models such as the default, (slice, "
        "direction) pairs for per-target models (default: from the free memory; halved "
        "automatically when memory runs out)",
    )

    perf = parser.add_argument_group("Performance and execution")
    perf.add_argument(
        "-w",
        "--work-dir",
        type=Path,
        default=Path("work"),
        help="Nipype working folder; rerunning with the same folder reuses finished steps",
    )
    perf.add_argument(
        "--nprocs",
        "--n-cpus",
        type=_positive_int,
        metavar="N",
        help="processes Nipype runs at once (default: all CPUs)",
    )
    perf.add_argument(
        "--omp-nthreads",
        type=_positive_int,
        metavar="N",
        help="threads per process for numerical libraries (default: min(8, nprocs))",
    )
    perf.add_argument(
        "--mem-gb", type=_positive_float, metavar="GB", help="memory limit for scheduling"
    )
    perf.add_argument(
        "--nipype-plugin",
        choices=PLUGINS,
        help="how Nipype runs the steps: MultiProc (processes on this machine, GPU slots for "
        "the diffusion engine), Linear (one at a time), SLURM (each step an sbatch job, "
        "waits), SLURMGraph (submits the whole graph as dependent jobs and returns) "
        "(default: the plugin file's, else MultiProc)",
    )
    perf.add_argument(
        "--plugin-file",
        type=_existing_file,
        metavar="FILE",
        help="YAML as for fMRIPrep's --use-plugin: 'plugin: NAME' and 'plugin_args: {...}' "
        "(e.g. sbatch_args, max_jobs; values here win over --nprocs/--mem-gb)",
    )
    perf.add_argument(
        "--stop-on-first-crash",
        action="store_true",
        help="stop at the first failing step instead of finishing the other runs",
    )
    perf.add_argument(
        "--write-graph", action="store_true", help="write the workflow graph into logs/"
    )
    perf.add_argument(
        "--reports-only",
        action="store_true",
        help="only rebuild the HTML reports from existing outputs",
    )
    perf.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more messages (-vv for debugging)",
    )
    return parser
