"""The whole app end to end on the synthetic example dataset (real Nipype runs)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qid2_bidsapp.cli.run import main

from .helpers import assert_valid_derivative, check_run_outputs, read_tsv

pytestmark = pytest.mark.slow

RUNS = {
    "sub-01/dwi/sub-01_space-orig_desc-preproc_dwi.nii.gz": 17,
    "sub-02/ses-1/dwi/sub-02_ses-1_dir-AP_space-orig_desc-preproc_dwi.nii.gz": 26,
}


@pytest.fixture(scope="module")
def sh_run(example_bids_ro, tmp_path_factory):
    """One participant-level and one group-level run with the SH engine."""
    root = tmp_path_factory.mktemp("sh_run")
    out, work = root / "out", root / "work"
    common = [str(example_bids_ro), str(out)]
    assert main([*common, "participant", "--engine", "sh", "-w", str(work), "--nprocs", "2"]) == 0
    assert main([*common, "group"]) == 0
    return out, work


def test_outputs_are_complete_and_consistent(sh_run):
    out, _ = sh_run
    for rel, n_in in RUNS.items():
        sidecar = check_run_outputs(out / rel, n_in)
        assert sidecar["UpsamplingEngine"] == "sh"
        assert sidecar["RandomSeed"] == 0
        assert sidecar["ModelID"] is None
        stem = str(out / rel).split("_desc-preproc_dwi")[0]
        for suffix in (
            "_desc-brain_mask.nii.gz",
            "_dwiref.nii.gz",
            "_model-tensor_param-fa_desc-acquired_dwimap.nii.gz",
            "_model-tensor_param-fa_desc-upsampled_dwimap.nii.gz",
            "_desc-qc_dwiqc.tsv",
        ):
            assert Path(stem + suffix).exists(), suffix
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "qid2"
    assert description["SourceDatasets"]
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"


def test_default_targets_are_twice_the_acquired_directions(sh_run):
    out, _ = sh_run
    rows = read_tsv(next(out.glob("sub-02/ses-1/dwi/*_dwiqc.tsv")))
    assert [r["shell"] for r in rows] == ["1000", "2000"]
    for row in rows:
        assert int(row["n_synthesized"]) == 2 * int(row["n_acquired"]) == 24
        assert float(row["gap_merged_deg"]) < float(row["gap_acquired_deg"])
        assert 0 < float(row["hidden_nrmse"]) < 0.5
        assert 0 <= float(row["hidden_fa_mae"]) < 0.1


def test_synthesised_signal_matches_the_phantom(sh_run):
    """SH predictions at new directions track the noise-free analytic signal."""
    from qid2_bidsapp.data.example import phantom_signal

    out, _ = sh_run
    path = out / "sub-01/dwi/sub-01_space-orig_desc-preproc_dwi.nii.gz"
    img = nib.load(path)
    stem = str(path)[: -len(".nii.gz")]
    bvals, bvecs = np.loadtxt(stem + ".bval"), np.loadtxt(stem + ".bvec").T
    data = np.asarray(img.dataobj)
    truth, brain = phantom_signal(img.shape[:3], bvals[17:], bvecs[17:])
    err = np.linalg.norm(data[..., 17:][brain] - truth[brain]) / np.linalg.norm(truth[brain])
    assert err < 0.08  # noise (SNR 40) plus regularisation bias


def test_output_passes_bids_validator_and_pybids(sh_run):
    assert_valid_derivative(sh_run[0])


def test_reports_and_group_table(sh_run):
    out, _ = sh_run
    for subject in ("01", "02"):
        html = (out / f"sub-{subject}.html").read_text()
        assert "QID" in html and "sh" in html
    rows = read_tsv(out / "group_qc.tsv")
    assert len(rows) == 3  # sub-01 one shell, sub-02 two shells
    assert (out / "group.html").exists()
    assert list((out / "logs").glob("qid2-*.log")) and list((out / "logs").glob("config-*.json"))
    # the validator's findings are kept in the log folder and summarised in the report
    (report,) = (out / "logs").glob("bids-validator-*.json")
    found = json.loads(report.read_text())
    assert found["n_errors"] == 0 and found["n_warnings"] == len(found["warnings"])
    html = (out / "sub-01.html").read_text()
    assert "BIDS validation" in html and report.name in html
    # every run and shell has a trust verdict, in the TSV and in the report
    for row in rows:
        assert row["trust"] in ("pass", "warn") and row["noise_method"] != "n/a"
        assert float(row["hidden_nrmse_floor"]) > 0 and float(row["hidden_nrmse_sh"]) > 0
    assert "Can this up-sampling be trusted?" in html


def test_rerun_reuses_finished_steps(sh_run, example_bids_ro):
    out, work = sh_run
    result = next(work.rglob("sub_01_wf/upsample/result_upsample.pklz"))
    before = result.stat().st_mtime_ns
    common = [str(example_bids_ro), str(out)]
    assert main([*common, "participant", "--engine", "sh", "-w", str(work)]) == 0
    assert result.stat().st_mtime_ns == before, "the up-sampling step ran again"


def test_reports_only(sh_run, example_bids_ro):
    out, _ = sh_run
    report = out / "sub-01.html"
    report.unlink()
    status = main([str(example_bids_ro), str(out), "participant", "--reports-only"])
    assert status == 0 and report.exists()


def test_interp_engine_and_user_targets(example_bids_ro, tmp_path):
    targets = tmp_path / "targets.txt"
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3, 7))
    np.savetxt(targets, vectors / np.linalg.norm(vectors, axis=0), fmt="%.6f")
    out = tmp_path / "out"
    status = main(
        [
            str(example_bids_ro),
            str(out),
            "participant",
            "--engine",
            "interp",
            "--participant-label",
            "01",
            "--target-bvecs",
            str(targets),
            "-w",
            str(tmp_path / "w"),
            "--skip-bids-validation",
            "--random-seed",
            "3",
            "--write-graph",
        ]
    )
    assert status == 0
    sidecar = check_run_outputs(out / next(iter(RUNS)), 17)
    assert sidecar["UpsamplingEngine"] == "interp" and sidecar["RandomSeed"] == 3
    assert len(sidecar["SynthesizedVolumes"]) == 7
    assert not (out / "sub-02").exists()
    assert (out / "logs" / "graph.dot").exists()


def test_truncated_run_is_refused_before_anything_is_written(example_bids, tmp_path, capsys):
    """A run whose data cannot be read to the end stops the invocation in preflight."""
    broken = example_bids / "sub-02/ses-1/dwi/sub-02_ses-1_dir-AP_dwi.nii.gz"
    raw = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(raw[: len(raw) // 3]))  # header intact, data truncated
    out = tmp_path / "out"
    status = main(
        [
            str(example_bids),
            str(out),
            "participant",
            "--engine",
            "sh",
            "-w",
            str(tmp_path / "w"),
            "--skip-bids-validation",
        ]
    )
    assert status == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("qid2: error:")]
    assert len(lines) == 1 and broken.name in lines[0] and "truncated" in lines[0]
    assert not out.exists()


def test_qsiprep_style_input(example_bids_ro, tmp_path):
    """QSIPrep-shaped derivatives: the space label and the shipped mask carry through."""
    from qid2_bidsapp.gradients import read_fsl_gradients, write_mrtrix_gradients

    src = example_bids_ro / "sub-01" / "dwi"
    qsiprep = tmp_path / "qsiprep"
    dwi_dir = qsiprep / "sub-01" / "dwi"
    dwi_dir.mkdir(parents=True)
    (qsiprep / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "QSIPrep output",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "qsiprep", "Version": "1.0.0"}],
            }
        )
    )
    stem = dwi_dir / "sub-01_space-ACPC_desc-preproc_dwi"
    img = nib.load(src / "sub-01_dwi.nii.gz")
    nib.save(img, str(stem) + ".nii.gz")
    for ext in (".bval", ".bvec"):
        os.link(src / f"sub-01_dwi{ext}", str(stem) + ext)
    table = read_fsl_gradients(src / "sub-01_dwi.bval", src / "sub-01_dwi.bvec")
    write_mrtrix_gradients(table, img.affine, str(stem) + ".b")
    mask = np.zeros(img.shape[:3], np.uint8)
    mask[4:20, 4:20, :] = 1
    nib.save(
        nib.Nifti1Image(mask, img.affine), dwi_dir / "sub-01_space-ACPC_desc-brain_mask.nii.gz"
    )
    out = tmp_path / "out"
    assert (
        main([str(qsiprep), str(out), "participant", "--engine", "sh", "-w", str(tmp_path / "w")])
        == 0
    )
    merged = out / "sub-01/dwi/sub-01_space-ACPC_desc-preproc_dwi.nii.gz"
    check_run_outputs(merged, 17)
    used = np.asarray(nib.load(out / "sub-01/dwi/sub-01_space-ACPC_desc-brain_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(used, mask)
    assert_valid_derivative(out)
