"""Run methods on evaluation cases, time them and score them: one row per (case, method)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from ..qc import fit_dti, masked_mae
from .cases import EvalCase
from .methods import Method, predict_heldout
from .metrics import fa_mae, nrmse, psnr, rish_features, ssim, volume_ssim

#: The row of the full acquisition itself (scored against the truth only; simulations).
FULL = "full"
#: The row of a perfect up-sampler (simulations): the noise-free signal at every held-out
#: direction, merged with the noisy given volumes: what an exact prediction would gain there.
PERFECT = "perfect"
#: Row names that are not methods (`qid2-eval` refuses them as variant names).
REFERENCE_ROWS = (FULL, PERFECT)
#: RISH orders reported.
RISH_ORDERS = (0, 2, 4)

#: Columns of a result row, in table order.
COLUMNS = (
    "group",
    "case",
    "protocol",
    "method",
    "n_input",
    "n_heldout",
    "seconds",
    "fa_mae",
    "fa_ssim",
    "nrmse",
    "psnr",
    "ssim",
    *(f"rish_l{ell}_nmse" for ell in RISH_ORDERS),
    "fa_bias",
    "fa_mae_wm",
    "fa_bias_wm",
    "md_mae",
    "equiv_dirs",
    "csd_acc",
    "csd_peak_deg",
    "fa_mae_truth",
    "fa_ssim_truth",
    "nrmse_truth",
    "psnr_truth",
    "ssim_truth",
    *(f"rish_l{ell}_nmse_truth" for ell in RISH_ORDERS),
    "fa_bias_truth",
    "fa_mae_wm_truth",
    "fa_bias_wm_truth",
    "md_mae_truth",
    "equiv_dirs_truth",
    "csd_acc_truth",
    "csd_peak_deg_truth",
)
#: MD errors are reported in 10^-3 mm^2/s.
MD_UNIT = 1e-3
#: White matter of the HARDI metrics: reference FA above this (`hardi.WM_FA`).
WM_FA_FOR_HARDI = 0.3
#: White matter of the ``fa_mae_wm`` / ``fa_bias_wm`` columns: reference FA at or above this.
WM_FA = 0.3


def _rish_by_shell(
    signal: np.ndarray, bvecs: np.ndarray, labels: np.ndarray, mask: np.ndarray
) -> dict[int, dict[int, np.ndarray]]:
    """RISH features of every shell of a (sub)acquisition: {shell: {l: (V,)}}."""
    return {
        int(shell): rish_features(signal[..., labels == shell], bvecs[labels == shell], mask)
        for shell in np.unique(labels[labels > 0])
    }


def _rish_nmse(
    test: dict[int, dict[int, np.ndarray]], reference: dict[int, dict[int, np.ndarray]]
) -> dict[int, float]:
    """NMSE of RISH features per order, averaged over the shells of the reference."""
    from .metrics import nmse

    return {
        ell: float(np.mean([nmse(test[s][ell], reference[s][ell]) for s in reference]))
        for ell in RISH_ORDERS
    }


def _score_against(
    prefix: str,
    dti,
    dti_reference,
    prediction: np.ndarray | None,
    reference_volumes: np.ndarray,
    rish: dict,
    rish_reference: dict,
    mask: np.ndarray,
) -> dict:
    """Every metric of one method against one reference (acquired or truth)."""
    suffix = "" if prefix == "acquired" else "_truth"
    fa, fa_reference = dti.fa, dti_reference.fa
    wm = mask & (fa_reference >= WM_FA)
    nan = float("nan")
    row = {
        f"fa_mae{suffix}": fa_mae(fa, fa_reference, mask),
        f"fa_ssim{suffix}": ssim(fa, fa_reference, mask, data_range=1.0),
        f"fa_bias{suffix}": float(np.mean(fa[mask] - fa_reference[mask])) if mask.any() else 0.0,
        f"fa_mae_wm{suffix}": fa_mae(fa, fa_reference, wm) if wm.any() else nan,
        f"fa_bias_wm{suffix}": float(np.mean(fa[wm] - fa_reference[wm])) if wm.any() else nan,
        f"md_mae{suffix}": masked_mae(dti.md / MD_UNIT, dti_reference.md / MD_UNIT, mask),
    }
    if prediction is not None:
        peak = float(reference_volumes[mask].max())
        masked_pred = prediction * mask[..., None]
        masked_ref = reference_volumes * mask[..., None]
        row[f"nrmse{suffix}"] = nrmse(prediction, reference_volumes, mask)
        row[f"psnr{suffix}"] = psnr(prediction, reference_volumes, mask, data_range=peak)
        row[f"ssim{suffix}"] = volume_ssim(masked_pred, masked_ref, mask, data_range=peak)
    else:
        row.update({f"nrmse{suffix}": nan, f"psnr{suffix}": nan, f"ssim{suffix}": nan})
    for ell, value in _rish_nmse(rish, rish_reference).items():
        row[f"rish_l{ell}_nmse{suffix}"] = value
    return row


def evaluate_case(
    case: EvalCase,
    methods: Iterable[Method],
    *,
    log: Callable[[str], None] | None = None,
    hardi: bool = False,
    equivalence: bool = False,
) -> list[dict]:
    """Run every method on one case and score it.

    Each method predicts the held-out volumes from the input subset; DTI on the merged
    acquisition (input + predicted volumes, in the full acquisition's order) gives its FA and
    MD, which are compared with DTI on the full acquisition (and, for simulations, on the
    noise-free truth): FA MAE, FA SSIM, signed FA bias (mean of merged - reference in the mask),
    FA MAE and bias in white matter (reference FA >= `WM_FA`),
    MD MAE. ``none`` is DTI on the input subset alone. Synthesised volumes are compared with the
    acquired (and the true) held-out volumes; RISH features (SH order 4) of each shell of the
    merged acquisition with those of the full one. Every metric is computed in ``case.mask``.

    Parameters
    ----------
    case : EvalCase
        The case.
    methods : iterable of Method
        Methods to run, in order.
    log : callable, optional
        Called with one line per finished method.
    hardi : bool
        Also score CSD on the merged data against CSD on the reference (`hardi.hardi_metrics`:
        ACC and main-peak angle in white matter).
    equivalence : bool
        Also report each method's equivalent number of acquired directions
        (`equivalence.equivalent_directions`).

    Returns
    -------
    list of dict
        One row per method (keys: `COLUMNS`; metrics that do not apply are NaN), plus, for a
        case with a truth, a ``perfect`` row (`PERFECT`: the noise-free held-out volumes as
        the prediction, scored like a method) and a ``full`` row: the full acquisition scored
        against the truth (the floor set by the noise).

    """
    mask = case.mask
    labels = case.shell_labels
    held = case.heldout_indices
    inputs = case.input_indices
    thr = case.b0_threshold
    dti_ref = fit_dti(case.data, case.bvals, case.bvecs, mask, b0_threshold=thr)
    rish_ref = _rish_by_shell(case.data, case.bvecs, labels, mask)
    references = {"acquired": (case.data, dti_ref, rish_ref)}
    truth = case.truth
    if truth is not None:
        dti_truth = fit_dti(truth, case.bvals, case.bvecs, mask, b0_threshold=thr)
        references["truth"] = (truth, dti_truth, _rish_by_shell(truth, case.bvecs, labels, mask))
    suffix = {"acquired": "", "truth": "_truth"}
    base = {
        "group": case.group,
        "case": case.name,
        "protocol": case.protocol(),
        "n_input": int(np.sum(case.bvals[inputs] > thr)),
        "n_heldout": int(held.size),
    }
    curves = {}
    if equivalence:
        from .equivalence import subset_curve

        n_in = int(np.min([np.sum(labels[inputs] == s) for s in np.unique(labels[held])]))
        curves = subset_curve(
            case.data, case.bvals, case.bvecs, labels, mask,
            {name: ref[1].fa for name, ref in references.items()},
            b0_threshold=thr, include=(n_in,),
        )  # fmt: skip
    wm = mask & (dti_ref.fa > WM_FA_FOR_HARDI)
    odf_cache: dict[str, np.ndarray] = {}

    def score(row, data, bvals, bvecs, dti, rish, prediction, against=references):
        for name, (ref_data, ref_dti, ref_rish) in against.items():
            ref_volumes = ref_data[..., held]
            row.update(
                _score_against(name, dti, ref_dti, prediction, ref_volumes, rish, ref_rish, mask)
            )
            if name in curves:
                from .equivalence import equivalent_directions

                row[f"equiv_dirs{suffix[name]}"] = equivalent_directions(
                    curves[name], row[f"fa_mae{suffix[name]}"]
                )
            if hardi:
                from .hardi import hardi_metrics

                metrics, odf_cache[name] = hardi_metrics(
                    data, bvals, bvecs, ref_data, case.bvals, case.bvecs, wm,
                    b0_threshold=thr, reference_odf=odf_cache.get(name),
                )  # fmt: skip
                row[f"csd_acc{suffix[name]}"] = metrics["csd_acc"]
                row[f"csd_peak_deg{suffix[name]}"] = metrics["csd_peak_deg"]

    def scored_row(label: str, prediction: np.ndarray | None, seconds: float) -> dict:
        """Merge a prediction into the input (or keep the input alone), fit and score it."""
        if prediction is None:
            data, bvals, bvecs = case.data[..., inputs], case.bvals[inputs], case.bvecs[inputs]
            sub_labels = labels[inputs]
        else:
            data = case.data.copy()
            data[..., held] = prediction
            bvals, bvecs, sub_labels = case.bvals, case.bvecs, labels
        dti = fit_dti(data, bvals, bvecs, mask, b0_threshold=thr)
        rish = _rish_by_shell(data, bvecs, sub_labels, mask)
        row = {**base, "method": label, "seconds": seconds}
        score(row, data, bvals, bvecs, dti, rish, prediction)
        return _complete(row)

    rows = []
    for method in methods:
        start = time.perf_counter()
        prediction = predict_heldout(method, case)
        seconds = time.perf_counter() - start
        row = scored_row(method.label, prediction, seconds)
        rows.append(row)
        if log is not None:
            log(
                f"{case.group}/{case.name} {method.label}: FA MAE {row['fa_mae']:.4f}, "
                f"{seconds:.1f} s"
            )
    if truth is not None:
        rows.append(scored_row(PERFECT, truth[..., held], float("nan")))
        row = {**base, "method": FULL, "n_input": int(held.size + base["n_input"])}
        row["n_heldout"] = 0
        truth_only = {"truth": references["truth"]}
        score(row, case.data, case.bvals, case.bvecs, dti_ref, rish_ref, None, truth_only)
        rows.append(_complete(row))
    return rows


def _complete(row: dict) -> dict:
    """Fill missing columns with NaN and order the keys as `COLUMNS`."""
    return {key: row.get(key, float("nan")) for key in COLUMNS}


def evaluate(
    cases: Iterable[EvalCase],
    methods: list[Method],
    *,
    log: Callable[[str], None] | None = None,
    hardi: bool = False,
    equivalence: bool = False,
) -> list[dict]:
    """Run `evaluate_case` on every case.

    Parameters
    ----------
    cases : iterable of EvalCase
        Cases (may be a generator: each is loaded, scored and released in turn).
    methods : list of Method
        Methods to run on each.
    log : callable, optional
        Progress lines.
    hardi, equivalence : bool
        Extra metrics (see `evaluate_case`).

    Returns
    -------
    list of dict
        All rows, case by case.

    """
    rows = []
    for case in cases:
        rows.extend(evaluate_case(case, methods, log=log, hardi=hardi, equivalence=equivalence))
    return rows
