"""Where the qid2 model's FA gain is, and what bounds it: grey vs white matter on simulated brains.

Run from the repository root::

    python benchmarks/wm_limits.py [--model models/qid2-default] [--seeds 10010,10011,10012]
                                   [--snr 20] [--slab 28:44] [--out FILE]

For each simulated brain (by default seeds 10010-10012: neither the evaluation brains of
``qid2-eval --simulated 3``, seeds 10000-10002, nor training brains, seeds >= 1,000,000) and
each protocol (30 -> 90 and 15 -> 45 directions at b = 1000, as in ``qid2-eval``), DTI is fitted
to the merged data of several "up-samplers" and its FA is scored against the noise-free truth.
Each cell is that FA MAE divided by the FA MAE of DTI on the given directions (``none``), in the
whole brain mask, in white matter (true FA >= 0.3) and in the rest (grey matter, CSF):

* ``qid2``: the model's predictions of the held-out directions;
* ``qid2 + 30 % DTI``: those predictions blended 70/30 with the held-out signals predicted by a
  tensor fitted to the given directions (does the network over-smooth white matter?);
* ``oracle``: the noise-free held-out signals (what a perfect up-sampler would score; the given
  volumes keep their noise);
* ``full acquisition``: DTI on all acquired directions, noise included;
* ``given, smoothed``: DTI on the given directions after an in-plane Gaussian filter of
  0.5 voxel (how much plain spatial pooling helps).

The Markdown table goes to stdout (and ``--out``), progress to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: True-FA value above which a voxel counts as white matter.
WM_FA = 0.3
#: Weight of the tensor prediction in the blended row.
BLEND_WEIGHT = 0.3
#: In-plane Gaussian filter width (voxels) of the smoothed row.
SMOOTH_SIGMA = 0.5
ROWS = (
    "qid2",
    f"qid2 + {int(BLEND_WEIGHT * 100)} % DTI",
    "oracle",
    "full acquisition",
    "given, smoothed",
)


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[wm-limits] {message}", file=sys.stderr, flush=True)


def tensor_prediction(case) -> np.ndarray:
    """Held-out signals predicted by a tensor fitted (WLS) to a case's given directions.

    Parameters
    ----------
    case : EvalCase
        The case.

    Returns
    -------
    ndarray, shape (X, Y, Z, H), float32
        Predictions in the order of ``case.heldout_indices`` (0 outside the mask).
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    given, heldout = case.input_indices, case.heldout_indices
    b0 = case.bvals[given] < case.b0_threshold
    table = gradient_table(
        case.bvals[given], bvecs=case.bvecs[given], b0_threshold=case.b0_threshold
    )
    fit = TensorModel(table, fit_method="WLS").fit(case.data[..., given], mask=case.mask)
    s0 = case.data[..., given][..., b0].mean(axis=-1)
    targets = gradient_table(case.bvals[heldout], bvecs=case.bvecs[heldout], b0_threshold=0)
    predicted = np.nan_to_num(fit.predict(targets, S0=s0))
    return (predicted * case.mask[..., None]).astype(np.float32)


def smoothed(data: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """In-plane Gaussian filter of every volume, normalised inside the mask.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, V)
        Volumes.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask (voxels outside it do not leak in).
    sigma : float
        Filter width in voxels (in plane; none across slices).

    Returns
    -------
    ndarray, shape (X, Y, Z, V)
    """
    weight = gaussian_filter(mask.astype(np.float64), (sigma, sigma, 0))
    out = np.empty(data.shape, dtype=np.float64)
    for k in range(data.shape[-1]):
        out[..., k] = gaussian_filter(data[..., k] * mask, (sigma, sigma, 0))
    return out / np.maximum(weight, 1e-3)[..., None]


def score_rows(case, model: str) -> dict[str, tuple[float, float, float]]:
    """FA MAE of each row / that of DTI on the given directions, in (brain, WM, rest).

    Parameters
    ----------
    case : EvalCase
        A simulated case (with ``truth``).
    model : str
        qid2 model folder.

    Returns
    -------
    dict
        Row name -> (brain, white matter, rest) ratios; ``"none"`` -> the absolute FA MAEs.
    """
    from qid2_bidsapp.evaluation.methods import Method, predict_heldout
    from qid2_bidsapp.qc import fit_dti

    mask, given, heldout = case.mask, case.input_indices, case.heldout_indices
    fa_true = fit_dti(case.truth, case.bvals, case.bvecs, mask).fa
    regions = (mask, mask & (fa_true >= WM_FA), mask & (fa_true < WM_FA))

    def mae(fa):
        return np.array([np.mean(np.abs(fa - fa_true)[r]) for r in regions])

    def merged_fa(predicted):
        merged = case.data.copy()
        merged[..., heldout] = predicted
        return fit_dti(merged, case.bvals, case.bvecs, mask).fa

    none = mae(fit_dti(case.data[..., given], case.bvals[given], case.bvecs[given], mask).fa)
    qid2 = predict_heldout(Method("qid2", "qid2", {"model_dir": model}), case)
    tensor = tensor_prediction(case)
    given_smooth = smoothed(case.data[..., given], mask, SMOOTH_SIGMA)
    scores = {
        ROWS[0]: mae(merged_fa(qid2)),
        ROWS[1]: mae(merged_fa((1 - BLEND_WEIGHT) * qid2 + BLEND_WEIGHT * tensor)),
        ROWS[2]: mae(merged_fa(case.truth[..., heldout])),
        ROWS[3]: mae(fit_dti(case.data, case.bvals, case.bvecs, mask).fa),
        ROWS[4]: mae(fit_dti(given_smooth, case.bvals[given], case.bvecs[given], mask).fa),
    }
    out = {name: tuple(value / none) for name, value in scores.items()}
    out["none"] = tuple(none)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the grey/white-matter table."""
    from qid2_bidsapp.evaluation.cases import SIM_PROTOCOLS, SIM_SEED_OFFSET, simulated_cases

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "qid2-default"))
    parser.add_argument("--seeds", default="10010,10011,10012")
    parser.add_argument("--snr", type=float, default=20.0)
    parser.add_argument("--slab", default="28:44", help="slices START:STOP of the 2.5 mm grid")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    start, stop = (int(v) for v in args.slab.split(":"))

    results = {}
    began = time.perf_counter()
    for seed in seeds:
        log(f"brain {seed}")
        cases = simulated_cases(
            1,
            snr=args.snr,
            seed=seed - SIM_SEED_OFFSET,
            slab=(start, stop),
        )
        for case, (_, n_given, n_full) in zip(cases, SIM_PROTOCOLS, strict=True):
            results[(seed, n_given, n_full)] = score_rows(case, args.model)

    model = Path(args.model).resolve()
    shown = model.relative_to(REPO) if model.is_relative_to(REPO) else model
    lines = [
        f"Model `{shown}`; brains {args.seeds}, slices {args.slab}, SNR {args.snr:g}, "
        f"b = 1000; {time.perf_counter() - began:.0f} s.",
        "",
        "Cells: FA MAE against the noise-free truth / that of DTI on the given directions, as "
        f"brain / white matter (true FA >= {WM_FA}) / rest.",
        "",
    ]
    header = ["row"] + [f"{s}: {g} → {f}" for (s, g, f) in results]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines.append(
        "| none: FA MAE | "
        + " | ".join(" / ".join(f"{v:.4f}" for v in r["none"]) for r in results.values())
        + " |"
    )
    for row in ROWS:
        lines.append(
            f"| {row} | "
            + " | ".join(" / ".join(f"{v:.2f}" for v in r[row]) for r in results.values())
            + " |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
