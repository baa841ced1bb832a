"""Run methods on evaluation cases, time them and score them: one row per (case, method)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from ..qc import fit_dti
from .cases import EvalCase
from .methods import Method, predict_heldout
from .metrics import fa_mae, nrmse, psnr, rish_features, ssim, volume_ssim

#: The row of the full acquisition itself (scored against the truth only; simulations).
FULL = "full"
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
    "fa_mae_truth",
    "fa_ssim_truth",
    "nrmse_truth",
    "psnr_truth",
    "ssim_truth",
    *(f"rish_l{ell}_nmse_truth" for ell in RISH_ORDERS),
)


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
    fa: np.ndarray,
    fa_reference: np.ndarray,
    prediction: np.ndarray | None,
    reference_volumes: np.ndarray,
    rish: dict,
    rish_reference: dict,
    mask: np.ndarray,
) -> dict:
    """Every metric of one method against one reference (acquired or truth)."""
    suffix = "" if prefix == "acquired" else "_truth"
    row = {
        f"fa_mae{suffix}": fa_mae(fa, fa_reference, mask),
        f"fa_ssim{suffix}": ssim(fa, fa_reference, mask, data_range=1.0),
    }
    nan = float("nan")
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
) -> list[dict]:
    """Run every method on one case and score it.

    Each method predicts the held-out volumes from the input subset; DTI on the merged
    acquisition (input + predicted volumes, in the full acquisition's order) gives its FA, which
    is compared with DTI on the full acquisition (and, for simulations, on the noise-free
    truth). ``none`` is DTI on the input subset alone. Synthesised volumes are compared with the
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

    Returns
    -------
    list of dict
        One row per method (keys: `COLUMNS`; metrics that do not apply are NaN), plus, for a
        case with a truth, a ``full`` row: the full acquisition scored against the truth (the
        floor set by the noise).

    """
    mask = case.mask
    labels = case.shell_labels
    held = case.heldout_indices
    inputs = case.input_indices
    fa_ref = fit_dti(case.data, case.bvals, case.bvecs, mask, b0_threshold=case.b0_threshold).fa
    rish_ref = _rish_by_shell(case.data, case.bvecs, labels, mask)
    truth = case.truth
    if truth is not None:
        fa_truth = fit_dti(truth, case.bvals, case.bvecs, mask, b0_threshold=case.b0_threshold).fa
        rish_truth = _rish_by_shell(truth, case.bvecs, labels, mask)
    base = {
        "group": case.group,
        "case": case.name,
        "protocol": case.protocol(),
        "n_input": int(np.sum(case.bvals[inputs] > case.b0_threshold)),
        "n_heldout": int(held.size),
    }
    rows = []
    for method in methods:
        start = time.perf_counter()
        prediction = predict_heldout(method, case)
        seconds = time.perf_counter() - start
        if prediction is None:
            data, bvals, bvecs = case.data[..., inputs], case.bvals[inputs], case.bvecs[inputs]
            sub_labels = labels[inputs]
        else:
            data = case.data.copy()
            data[..., held] = prediction
            bvals, bvecs, sub_labels = case.bvals, case.bvecs, labels
        fa = fit_dti(data, bvals, bvecs, mask, b0_threshold=case.b0_threshold).fa
        rish = _rish_by_shell(data, bvecs, sub_labels, mask)
        row = {**base, "method": method.label, "seconds": seconds}
        row.update(
            _score_against(
                "acquired", fa, fa_ref, prediction, case.data[..., held], rish, rish_ref, mask
            )
        )
        if truth is not None:
            row.update(
                _score_against(
                    "truth", fa, fa_truth, prediction, truth[..., held], rish, rish_truth, mask
                )
            )
        rows.append(_complete(row))
        if log is not None:
            log(
                f"{case.group}/{case.name} {method.label}: FA MAE {row['fa_mae']:.4f}, "
                f"{seconds:.1f} s"
            )
    if truth is not None:
        row = {**base, "method": FULL, "n_input": int(held.size + base["n_input"])}
        row["n_heldout"] = 0
        row.update(
            _score_against(
                "truth", fa_ref, fa_truth, None, truth[..., held], rish_ref, rish_truth, mask
            )
        )
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

    Returns
    -------
    list of dict
        All rows, case by case.

    """
    rows = []
    for case in cases:
        rows.extend(evaluate_case(case, methods, log=log))
    return rows
