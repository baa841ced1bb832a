"""``qid2-example``: run qid2 on the bundled synthetic example dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.example import make_example_dataset
from .run import main as qid2_main


def main(argv: list[str] | None = None) -> int:
    """Write the example BIDS dataset, run the participant and group levels, print the report.

    Parameters
    ----------
    argv : list of str, optional
        ``[folder] [--engine NAME]``.

    Returns
    -------
    int
        Exit status.

    """
    parser = argparse.ArgumentParser(
        prog="qid2-example",
        description="Run qid2 end to end on a small synthetic BIDS dataset made on the fly.",
    )
    parser.add_argument(
        "folder",
        nargs="?",
        type=Path,
        default=Path("qid2-example"),
        help="where to put the example (bids/, derivatives/, work/)",
    )
    parser.add_argument(
        "--engine",
        default="qid2",
        help="up-sampling engine: qid2 (default: the diffusion model; about a minute on a CPU), "
        "sh or interp (classical, seconds)",
    )
    args = parser.parse_args(argv)
    print(f"qid2-example: {_engine_line(args.engine)}")
    folder = args.folder.resolve()
    bids = folder / "bids"
    if not (bids / "dataset_description.json").exists():
        make_example_dataset(bids)
        print(f"qid2-example: wrote the example BIDS dataset to {bids}")
    out = folder / "derivatives" / "qid2"
    common = [str(bids), str(out)]
    status = qid2_main(
        [*common, "participant", "--engine", args.engine, "-w", str(folder / "work")]
    )
    if status == 0:
        status = qid2_main([*common, "group"])
    if status == 0:
        print(f"qid2-example: used {_engine_line(args.engine)}")
        print(f"qid2-example: open {out / 'sub-01.html'} (participant) and {out / 'group.html'}")
    return status


def _engine_line(engine: str) -> str:
    """Say which engine (and, for qid2, which model on which device) the example uses."""
    if engine != "qid2":
        return f"engine {engine} (classical; the diffusion engine is --engine qid2)"
    from ..engines.qid2 import default_model_dir, listed_weights_sha256, qid2_uses_cuda

    folder = default_model_dir()
    if folder is None:
        return "engine qid2 (no model installed: the run will stop and say how to get one)"
    sha = listed_weights_sha256(folder) or "unknown"
    device = "GPU" if qid2_uses_cuda("auto") else "CPU"
    return f"engine qid2 (diffusion model {folder.name}-{sha[:12]}, on the {device})"


if __name__ == "__main__":
    sys.exit(main())
