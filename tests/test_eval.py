"""The evaluation harness (qid2-eval): split, metrics, methods, harness, report and CLI."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from qid2_bidsapp.cli.eval import main as eval_main
from qid2_bidsapp.engines.sh import apply_direction_matrix, sh_prediction_matrix
from qid2_bidsapp.evaluation.cases import (
    DIPY_CASES,
    EvalCase,
    load_bids_cases,
    load_dipy_case,
    phantom_case,
    restrict_directions,
)
from qid2_bidsapp.evaluation.harness import COLUMNS, evaluate_case
from qid2_bidsapp.evaluation.methods import (
    Method,
    mrtrix_available,
    mrtrix_predict,
    predict_heldout,
)
from qid2_bidsapp.evaluation.metrics import (
    nmse,
    nrmse,
    psnr,
    rish_features,
    ssim,
    ssim_map,
    volume_ssim,
)
from qid2_bidsapp.evaluation.report import _verdicts, add_ratios, read_tsv
from qid2_bidsapp.evaluation.split import best_spread_subset, subset_energy, uniform_split
from qid2_bidsapp.gradients import largest_angular_gap_deg, select_target_directions
from qid2_bidsapp.qc import fit_dti

from .helpers import read_tsv as read_plain_tsv


def _random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# --------------------------------------------------------------------------- split


def test_best_spread_subset_is_deterministic_and_uniform():
    bvecs = select_target_directions(np.empty((0, 3)), 90, seed=3)
    subset = best_spread_subset(bvecs, 30)
    assert subset.tolist() == best_spread_subset(bvecs, 30).tolist()
    assert subset.size == 30 and np.all(np.diff(subset) > 0)
    # more uniform than every one of 200 random subsets of the same size
    rng = np.random.default_rng(0)
    randoms = [rng.choice(90, 30, replace=False) for _ in range(200)]
    energy = subset_energy(bvecs, subset)
    assert energy < min(subset_energy(bvecs, r) for r in randoms)
    gap = largest_angular_gap_deg(bvecs[subset])
    assert gap < min(largest_angular_gap_deg(bvecs[r], n_grid=1500) for r in randoms[:20])
    # antipodal symmetry: flipping directions (d and -d are the same) changes nothing
    flipped = bvecs * np.where(np.arange(90) % 3 == 0, -1.0, 1.0)[:, None]
    assert best_spread_subset(flipped, 30).tolist() == subset.tolist()


def test_best_spread_subset_takes_one_of_each_near_pair():
    axes = np.eye(3)
    near = axes + 0.05 * np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    bvecs = np.vstack([axes, near])  # 0,3 ~ x; 1,4 ~ y; 2,5 ~ z
    chosen = best_spread_subset(bvecs, 3)
    assert sorted(int(i) % 3 for i in chosen) == [0, 1, 2]
    with pytest.raises(ValueError):
        best_spread_subset(bvecs, 7)


def test_uniform_split_keeps_b0_and_half_of_each_shell():
    d1 = select_target_directions(np.empty((0, 3)), 15, seed=1)
    d2 = select_target_directions(np.empty((0, 3)), 20, seed=2)
    bvals = np.concatenate([[0], np.full(15, 1000.0), [5], np.full(20, 2000.0)])
    bvecs = np.vstack([np.zeros((1, 3)), d1, np.zeros((1, 3)), d2])
    keep = uniform_split(bvals, bvecs)
    assert keep.tolist() == uniform_split(bvals, bvecs).tolist()
    assert {0, 16} <= set(keep.tolist())  # every b=0 (b <= 50) volume
    assert np.sum(bvals[keep] == 1000) == 8  # ceil(15 / 2)
    assert np.sum(bvals[keep] == 2000) == 10
    assert np.sum(bvals[uniform_split(bvals, bvecs, n_input=6)] == 2000) == 6
    with pytest.raises(ValueError, match="n_input"):
        uniform_split(bvals, bvecs, n_input=15)


# --------------------------------------------------------------------------- metrics


def test_metrics_of_identical_images():
    rng = np.random.default_rng(1)
    ref = rng.uniform(100, 1000, (10, 9, 8, 3))
    mask = np.zeros(ref.shape[:3], bool)
    mask[2:8, 2:7, 2:6] = True
    assert nrmse(ref, ref, mask) == 0.0
    assert psnr(ref, ref, mask) == math.inf
    assert volume_ssim(ref, ref, mask) == pytest.approx(1.0, abs=1e-12)
    assert ssim(ref[..., 0], ref[..., 0], mask, data_range=1000.0) == pytest.approx(1.0)
    assert nmse(ref, ref) == 0.0
    bvecs = select_target_directions(np.empty((0, 3)), 3, seed=0)
    features = rish_features(ref, bvecs, mask, order=2)
    assert set(features) == {0, 2} and features[0].shape == (mask.sum(),)


def test_metrics_of_known_perturbations():
    rng = np.random.default_rng(2)
    ref = rng.uniform(100, 1000, (12, 11, 10, 4))
    mask = np.ones(ref.shape[:3], bool)
    assert nrmse(ref * 1.05, ref, mask) == pytest.approx(0.05, rel=1e-12)
    peak = ref.max()
    assert psnr(ref + 10.0, ref, mask) == pytest.approx(20 * np.log10(peak / 10.0), rel=1e-12)
    assert psnr(ref + 10.0, ref, mask, data_range=1000.0) == pytest.approx(40.0, rel=1e-12)
    assert nmse(ref * 0.9, ref) == pytest.approx(0.01, rel=1e-12)


def test_ssim_of_constant_images_is_the_analytic_value():
    a = np.full((12, 12, 12), 0.5)
    b = np.full((12, 12, 12), 0.25)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1)  # variance terms: C2 / C2
    np.testing.assert_allclose(ssim_map(a, b, 1.0), expected, rtol=1e-12)


def test_ssim_matches_scikit_image_golden_value():
    # skimage 0.26.0, structural_similarity(a, b, data_range=1.0, gaussian_weights=True,
    # sigma=1.5, use_sample_covariance=False) returned 0.9516193816774681 for these arrays; it
    # averages the map with a 5-voxel border cropped.
    rng = np.random.default_rng(0)
    a = rng.random((20, 18, 12))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    ours = ssim_map(a, b, 1.0)[5:-5, 5:-5, 5:-5].mean()
    assert ours == pytest.approx(0.9516193816774681, abs=1e-10)
    skimage = pytest.importorskip("skimage.metrics")
    theirs = skimage.structural_similarity(
        a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_rish_features_known_values_and_rotation_invariance():
    bvecs = select_target_directions(np.empty((0, 3)), 60, seed=4)
    # a constant signal c: only l = 0, c00 = c sqrt(4 pi) in the orthonormal basis
    const = np.full((2, 2, 1, 60), 3.0)
    features = rish_features(const, bvecs, lambda_=0.0)
    np.testing.assert_allclose(features[0], 4 * np.pi * 9.0, rtol=1e-10)
    np.testing.assert_allclose(features[2], 0.0, atol=1e-10)
    np.testing.assert_allclose(features[4], 0.0, atol=1e-10)
    # (gᵀDg)² has orders 0, 2, 4 only: its RISH do not change when D is rotated
    tensor = np.diag([1.7, 0.4, 0.3])
    rot = _random_rotation(5)

    def signal(d):
        return (np.einsum("ni,ij,nj->n", bvecs, d, bvecs) ** 2).reshape(1, 1, 1, -1)

    plain = rish_features(signal(tensor), bvecs, lambda_=0.0)
    turned = rish_features(signal(rot @ tensor @ rot.T), bvecs, lambda_=0.0)
    for ell in (0, 2, 4):
        np.testing.assert_allclose(turned[ell], plain[ell], rtol=1e-8)
    assert plain[4][0] > 0.01 * plain[0][0]


# --------------------------------------------------------------------------- methods, harness

# Golden values: computed once with this code (2026-11-21, numpy 2 / dipy 1.x, 2-core dev
# machine) by evaluate_case(phantom_case(), [Method("sh", "sh")]): the analytic crossing phantom
# of qid2_bidsapp.data.example, 16x16x4, 2 b=0 + 30 b=1000 directions, Rician noise SNR 20,
# seed 0; 15 of the 30 directions given; the sh engine at its defaults (order 4, λ = 0.006).
GOLDEN_SH = {
    "fa_mae": 0.041416468259950094,
    "nrmse": 0.1332844684659606,
    "fa_mae_truth": 0.07744696647680914,
    "nrmse_truth": 0.08830658451972424,
}


@pytest.fixture(scope="module")
def phantom():
    return phantom_case()


def test_harness_reproduces_the_sh_baseline_numbers(phantom):
    assert phantom.protocol() == "b1000: 15->30"
    rows = evaluate_case(phantom, [Method("sh", "sh"), Method("none", "none")])
    sh, none, perfect, full = rows
    assert [r["method"] for r in rows] == ["sh", "none", "perfect", "full"]
    assert list(sh) == list(COLUMNS)
    for key, value in GOLDEN_SH.items():
        assert sh[key] == pytest.approx(value, rel=1e-5), key

    # the same numbers computed independently, without the harness
    inputs = phantom.input_indices[phantom.bvals[phantom.input_indices] > 0]
    held = phantom.heldout_indices
    matrix = sh_prediction_matrix(phantom.bvecs[inputs], phantom.bvecs[held], 4, 0.006)
    predicted = apply_direction_matrix(phantom.data[..., inputs], matrix, phantom.mask)
    np.testing.assert_allclose(predict_heldout(Method("sh", "sh"), phantom), predicted, rtol=1e-6)
    assert sh["nrmse"] == pytest.approx(nrmse(predicted, phantom.data[..., held], phantom.mask))
    merged = phantom.data.copy()
    merged[..., held] = predicted
    fa = fit_dti(merged, phantom.bvals, phantom.bvecs, phantom.mask).fa
    fa_full = fit_dti(phantom.data, phantom.bvals, phantom.bvecs, phantom.mask).fa
    assert sh["fa_mae"] == pytest.approx(np.abs(fa - fa_full)[phantom.mask].mean(), rel=1e-6)
    fa_sub = fit_dti(
        phantom.data[..., phantom.input_indices],
        phantom.bvals[phantom.input_indices],
        phantom.bvecs[phantom.input_indices],
        phantom.mask,
    ).fa
    assert none["fa_mae"] == pytest.approx(np.abs(fa_sub - fa_full)[phantom.mask].mean())
    # refitting the same regularised SH to input + its own SH predictions returns the same
    # coefficients, so RISH of sh equals RISH of the input alone: checks the merge order
    for ell in (0, 2, 4):
        assert sh[f"rish_l{ell}_nmse"] == pytest.approx(none[f"rish_l{ell}_nmse"], rel=1e-6)
    assert math.isnan(none["nrmse"]) and math.isnan(full["fa_mae"])
    assert 0 < full["fa_mae_truth"] < none["fa_mae_truth"]  # 30 directions beat 15
    # the perfect row predicts the noise-free held-out signal: exact against the truth, and
    # its FA is that of the given volumes merged with it, computed here without the harness
    assert perfect["nrmse_truth"] == 0.0 and perfect["nrmse"] > 0
    merged[..., held] = phantom.truth[..., held]
    fa_perfect = fit_dti(merged, phantom.bvals, phantom.bvecs, phantom.mask).fa
    assert perfect["fa_mae"] == pytest.approx(np.abs(fa_perfect - fa_full)[phantom.mask].mean())
    assert perfect["fa_mae_truth"] < min(sh["fa_mae_truth"], none["fa_mae_truth"])
    # an identity "prediction" of the held-out volumes scores perfectly
    assert nrmse(phantom.data[..., held], phantom.data[..., held], phantom.mask) == 0.0


def test_ratios_name_the_best_classical_method(phantom):
    rows = add_ratios(
        evaluate_case(
            phantom, [Method("sh", "sh"), Method("none", "none"), Method("interp", "interp")]
        )
    )
    by = {r["method"]: r for r in rows}
    best = min(("sh", "none"), key=lambda m: by[m]["fa_mae"])
    assert by["sh"]["best_classical"] == best
    assert by[best]["ratio"] == pytest.approx(1.0)
    assert by["interp"]["ratio"] == pytest.approx(by["interp"]["fa_mae"] / by[best]["fa_mae"])
    assert math.isnan(by["full"]["ratio"])
    perfect = by["perfect"]
    assert perfect["ratio_truth"] == pytest.approx(
        perfect["fa_mae_truth"] / min(by["sh"]["fa_mae_truth"], by["none"]["fa_mae_truth"])
    )
    (line,) = [v for v in _verdicts(rows) if v.startswith("- `perfect`")]
    assert f"{perfect['ratio']:.2f} against the full acquisition" in line
    assert f"{perfect['ratio_truth']:.2f} against the truth" in line


def test_restrict_directions_makes_the_smaller_protocol():
    case = phantom_case(n_full=40, n_input=20, seed=1)
    small = restrict_directions(case, 24, 8, group="small")
    assert small.protocol() == "b1000: 8->24"
    assert small.data.shape[3] == 2 + 24 and small.truth.shape == small.data.shape
    assert small.heldout_indices.size == 16


def test_case_rejects_bad_input():
    case = phantom_case()
    with pytest.raises(Exception, match="DTI needs at least 6"):
        EvalCase(
            name="x",
            group="g",
            data=case.data,
            bvals=case.bvals,
            bvecs=case.bvecs,
            mask=case.mask,
            affine=case.affine,
            input_indices=[0, 1, 2, 3, 4],
        )


@pytest.mark.skipif(not mrtrix_available(), reason="MRtrix3 (amp2sh, sh2amp) not installed")
def test_mrtrix_matches_the_unregularised_sh_fit_on_an_oblique_grid():
    case = phantom_case(n_full=40, n_input=20, oblique=True)
    inputs = case.input_indices[case.bvals[case.input_indices] > 0]
    held = case.heldout_indices
    ours = apply_direction_matrix(
        case.data[..., inputs],
        sh_prediction_matrix(case.bvecs[inputs], case.bvecs[held], 4, 0.0),
    )
    theirs = mrtrix_predict(
        case.data[..., inputs], case.bvecs[inputs], case.bvecs[held], 1000, case.affine, lmax=4
    )
    scale = ours[case.mask].max()
    np.testing.assert_allclose(theirs[case.mask], ours[case.mask], atol=1e-5 * scale)


# --------------------------------------------------------------------------- BIDS cases, CLI


def test_bids_cases_multi_shell(example_bids_ro):
    cases = load_bids_cases(example_bids_ro)
    assert [c.protocol() for c in cases] == ["b1000: 8->15", "b1000: 6->12, b2000: 6->12"]
    rows = evaluate_case(cases[1], [Method("sh", "sh"), Method("interp", "interp")])
    assert all(np.isfinite(r["fa_mae"]) and np.isfinite(r["rish_l2_nmse"]) for r in rows)
    assert all(r["n_heldout"] == 12 for r in rows)


def test_cli_end_to_end(example_bids_ro, tmp_path, monkeypatch):
    empty = tmp_path / "no-model"
    empty.mkdir()
    monkeypatch.setenv("QID2_MODEL_DIR", str(empty))  # no model: qid2 is skipped with a note
    out = tmp_path / "eval"
    status = eval_main(
        [
            "--bids",
            str(example_bids_ro),
            "--phantom",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--methods",
            "sh,interp,none,qid2,mrtrix",
        ]
    )
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == ["fa_mae.png", "results.md", "results.tsv"]
    rows = read_tsv(out / "results.tsv")
    methods = ["sh", "interp", "none"] + (["mrtrix"] if mrtrix_available() else [])
    cases = {(r["group"], r["case"]) for r in rows}
    assert len(cases) == 3  # two example runs + one phantom
    for case in cases:
        got = [r["method"] for r in rows if (r["group"], r["case"]) == case]
        assert got[: len(methods)] == methods
    assert all(r["method"] != "qid2" for r in rows)
    plain = read_plain_tsv(out / "results.tsv")
    assert "ratio" in plain[0] and "best_classical" in plain[0]
    text = (out / "results.md").read_text()
    assert "vs best classical" in text and "qid2 skipped" in text
    assert "| sh |" in text and "## FA MAE per case" in text
    assert (out / "fa_mae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_input_writes_nothing(example_bids_ro, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_main(["--bids", str(tmp_path / "missing"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    bids = Path(shutil.copytree(example_bids_ro, tmp_path / "bids"))
    bvec = next(bids.glob("sub-01/dwi/*_dwi.bvec"))
    bvec.write_text("1 0\n0 1\n")  # wrong number of columns
    assert eval_main(["--bids", str(bids), "--out", str(out), "--quiet", "--methods", "sh"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bvec) in err[0]
    assert eval_main(["--phantom", "1", "--out", str(out), "--methods", "sh,bogus"]) == 1
    assert not out.exists()


@pytest.mark.realdata
def test_real_run_split_half(real_bids):
    (case,) = load_bids_cases(real_bids, participant_labels=["vanderbilt"])
    assert case.protocol() == "b2000: 8->15"
    rows = add_ratios(evaluate_case(case, [Method("sh", "sh"), Method("none", "none")]))
    for row in rows:
        assert 0.005 < row["fa_mae"] < 0.1 and 0.5 < row["fa_ssim"] <= 1.0
    json.dumps(rows)  # plain numbers only


@pytest.mark.realdata
def test_simulated_cases_give_both_protocols_with_truth():
    from qid2_bidsapp.evaluation.cases import simulated_cases
    from qid2_bidsapp.sim import drivers_available

    if not drivers_available():
        pytest.skip("simulator driver maps (../shared/data/phantom) not present")
    first, second = simulated_cases(1, slab=(30, 33))
    assert (first.group, first.protocol()) == ("sim-30to90", "b1000: 30->90")
    assert (second.group, second.protocol()) == ("sim-15to45", "b1000: 15->45")
    assert first.truth.shape == first.data.shape and first.data.shape[2] == 3
    assert np.sum(first.bvals == 0) == 6
    by = {r["method"]: r for r in evaluate_case(second, [Method("none", "none")])}
    assert by["none"]["fa_mae_truth"] > by["full"]["fa_mae_truth"] > 0  # full beats its third
    assert by["none"]["fa_mae_truth"] > by["perfect"]["fa_mae_truth"] > 0


def test_sim_slab_option_is_parsed_and_checked():
    from qid2_bidsapp.cli.eval import build_parser

    parser = build_parser()
    args = parser.parse_args(["--simulated", "1", "--sim-slab", "30:40", "--out", "x"])
    assert args.sim_slab == (30, 40)
    for bad in ("40:30", "a:b", "30"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--simulated", "1", "--sim-slab", bad, "--out", "x"])


@pytest.mark.parametrize("name", ["full", "perfect"])
def test_variant_names_of_reference_rows_are_refused(name):
    from qid2_bidsapp.cli.eval import _variant

    with pytest.raises(argparse.ArgumentTypeError, match="reference row"):
        _variant(f"{name}:steps=2")


# ----------------------------------------------------------------------------- extra metrics


def test_equivalent_directions_interpolates_a_falling_curve():
    from qid2_bidsapp.evaluation.equivalence import direction_grid, equivalent_directions

    curve = [(6, 0.10), (10, 0.06), (20, 0.03), (40, 0.01)]
    assert equivalent_directions(curve, 0.06) == 10
    assert equivalent_directions(curve, 0.045) == pytest.approx(15.0)
    assert equivalent_directions(curve, 0.2) == float("-inf")
    assert equivalent_directions(curve, 0.001) == float("inf")
    grid = direction_grid(90, include=(30,))
    assert grid[0] == 6 and grid[-1] == 90 and 30 in grid


def test_extra_metrics_on_the_phantom(phantom):
    from qid2_bidsapp.evaluation.harness import evaluate_case

    rows = evaluate_case(
        phantom, [Method("none", "none"), Method("sh", "sh")], hardi=True, equivalence=True
    )
    by = {r["method"]: r for r in rows}
    n_in = by["none"]["n_input"]
    # DTI on the input subset is, by construction, worth its own direction count
    assert by["none"]["equiv_dirs"] == pytest.approx(n_in, abs=0.5)
    assert by["full"]["equiv_dirs_truth"] == pytest.approx(phantom.heldout_indices.size + n_in)
    for row in (by["none"], by["sh"]):
        assert 0.0 < row["csd_acc"] <= 1.0 and 0.0 <= row["csd_peak_deg"] < 90.0
        assert row["md_mae"] > 0 and np.isfinite(row["fa_bias"])
    assert by["sh"]["csd_acc"] > by["none"]["csd_acc"]  # more directions, closer fODF
    # white-matter columns: the same errors restricted to reference FA >= WM_FA
    from qid2_bidsapp.evaluation.harness import WM_FA
    from qid2_bidsapp.qc import fit_dti

    p = phantom
    fa_ref = fit_dti(p.data, p.bvals, p.bvecs, p.mask).fa
    ii = p.input_indices
    fa_none = fit_dti(p.data[..., ii], p.bvals[ii], p.bvecs[ii], p.mask).fa
    wm = p.mask & (fa_ref >= WM_FA)
    assert 0 < wm.sum() < p.mask.sum()
    err = (fa_none - fa_ref)[wm]
    assert by["none"]["fa_mae_wm"] == pytest.approx(np.abs(err).mean(), rel=1e-6)
    assert by["none"]["fa_bias_wm"] == pytest.approx(err.mean(), rel=1e-6, abs=1e-9)


def test_hardi_metrics_of_identical_data_are_perfect(phantom):
    from qid2_bidsapp.evaluation.hardi import hardi_metrics
    from qid2_bidsapp.qc import fit_dti

    fa = fit_dti(phantom.data, phantom.bvals, phantom.bvecs, phantom.mask).fa
    wm = phantom.mask & (fa > 0.3)
    args = (phantom.data, phantom.bvals, phantom.bvecs)
    metrics, _ = hardi_metrics(*args, *args, wm)
    assert metrics["csd_acc"] == pytest.approx(1.0)
    assert metrics["csd_peak_deg"] == pytest.approx(0.0)
    assert metrics["csd_voxels"] == min(int(wm.sum()), metrics["csd_voxels"]) > 0


@pytest.mark.parametrize("name", sorted(DIPY_CASES))
def test_dipy_cases_load_offline_and_split_in_half(name):
    from qid2_bidsapp.cli.eval import DIPY_CASE_NAMES

    assert set(DIPY_CASE_NAMES) == set(DIPY_CASES)
    case = load_dipy_case(name)
    n_dw = int(np.sum(case.bvals > case.b0_threshold))
    assert case.mask.sum() > 0
    assert len(np.unique(np.round(case.bvals[case.bvals > case.b0_threshold], -2))) == 1
    n_given = int(np.sum(case.bvals[case.input_indices] > case.b0_threshold))
    assert n_given in (n_dw // 2, (n_dw + 1) // 2)
    assert set(case.heldout_indices).isdisjoint(case.input_indices)
