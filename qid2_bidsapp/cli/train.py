"""``qid2-train``: train, resume or export a QID² model from a JSON/TOML configuration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Qid2Error
from ..model.field_config import MODEL_PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    """Return the ``qid2-train`` argument parser.

    Returns
    -------
    argparse.ArgumentParser

    """
    parser = argparse.ArgumentParser(
        prog="qid2-train",
        description=(
            "Train the QID² diffusion model (self-supervised on BIDS DWI and/or synthetic "
            "phantoms). Training stops cleanly at --max-minutes and resumes when the same "
            "command is run again; the finished model is written to <output>/<name>/."
        ),
    )
    parser.add_argument("config", type=Path, help="training configuration (.json or .toml)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this many minutes of this run, saving a resumable state",
    )
    parser.add_argument("--steps", type=int, default=None, help="total steps (overrides config)")
    parser.add_argument(
        "--output", type=Path, default=None, help="output folder (overrides config)"
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="resume from <output>/training_state.pt when present (default); --no-resume "
        "deletes that state and the log and starts over",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="where to train (default: the config's, 'auto' = CUDA if available)",
    )
    parser.add_argument(
        "--export",
        action="store_true",
        help="do not train: write the model folder from the saved state now",
    )
    parser.add_argument(
        "--export-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="SH-field models: how the exported weights are stored (float16 halves the file)",
    )
    parser.add_argument(
        "--export-cpu-precision",
        choices=MODEL_PRECISIONS,
        default=None,
        help="SH-field models: the precision the model was validated with on the CPU, which "
        "the app's --precision auto uses where the CPU runs bfloat16 natively (default: the "
        "run's setting, float32 unless its config names another)",
    )
    return parser


def load_config(args: argparse.Namespace):
    """Read the configuration file and apply the command-line overrides.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments.

    Returns
    -------
    TrainConfig

    """
    from ..model.train import TrainConfig

    config = TrainConfig.from_file(args.config)
    overrides = {
        "max_minutes": args.max_minutes,
        "steps": args.steps,
        "device": args.device,
        "output": None if args.output is None else str(args.output.resolve()),
    }
    values = config.to_dict()
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def is_field_config(path: Path) -> bool:
    """Whether a configuration file is an SH-field one (``"kind": "sh-field"``, JSON).

    Parameters
    ----------
    path : Path
        The configuration file.

    Returns
    -------
    bool

    """
    import json

    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == "sh-field"
    except (OSError, ValueError, AttributeError):
        return False


def run_field(args: argparse.Namespace) -> Path:
    """Train, resume or export an SH-field model (`qid2_bidsapp.model.field_train`).

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments; ``--device`` overrides the configuration's ``device``.

    Returns
    -------
    Path
        The model folder (``--export`` or finished) or the training state.

    """
    import dataclasses

    from ..model.field_train import STATE_NAME, FieldTrainConfig, export_model, train_field

    config = FieldTrainConfig.from_file(args.config)
    overrides = {
        "steps": args.steps,
        "output": None if args.output is None else str(args.output),
        "device": args.device,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    output = Path(config.output)
    if args.export:  # never touches the state, whatever --resume says
        if not (output / STATE_NAME).is_file():
            raise Qid2Error(f"{output / STATE_NAME}: no training state to export")
        return export_model(
            output,
            output / config.name,
            weights_dtype=args.export_dtype,
            cpu_precision=args.export_cpu_precision,
        )
    if not args.resume:
        for name in (STATE_NAME, "train_log.jsonl"):
            (output / name).unlink(missing_ok=True)
    state = train_field(config, max_minutes=args.max_minutes)
    steps = _state_step(state)
    if steps >= config.steps:
        return export_model(output, output / config.name, weights_dtype=args.export_dtype)
    return state


def _state_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def main(argv: list[str] | None = None) -> int:
    """Run ``qid2-train``.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success (finished, exported, or stopped at the time limit), 1 on an error.

    """
    args = build_parser().parse_args(argv)
    try:
        try:
            from ..model.train import train
        except ImportError as err:
            raise Qid2Error(
                f"training needs the model extra (pip install 'qid2[model]'): {err}"
            ) from None
        if is_field_config(args.config):
            result = run_field(args)
        else:
            config = load_config(args)
            result = train(config, resume=args.resume, export_only=args.export)
    except Qid2Error as exc:
        print(f"qid2-train: error: {exc}", file=sys.stderr)
        return 1
    print(f"qid2-train: {'model' if result.is_dir() else 'state'}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
