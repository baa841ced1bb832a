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
        default="sh",
        help="up-sampling engine (sh, interp, or qid2: the diffusion model, minutes on a CPU)",
    )
    args = parser.parse_args(argv)
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
        print(f"qid2-example: open {out / 'sub-01.html'} (participant) and {out / 'group.html'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
