"""The app on every real scan in ../shared/data/bids-real (skipped when absent)."""

from __future__ import annotations

import pytest

from qid2_bidsapp.bids import collect_dwi_runs
from qid2_bidsapp.cli.run import main

from .helpers import assert_valid_derivative, check_run_outputs, read_tsv

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_all_real_runs_participant_and_group(real_bids, tmp_path):
    runs = collect_dwi_runs(real_bids)
    assert len(runs) == 10  # 5 prisma sessions, uih AP/PA, xa30 AP/PA, vanderbilt
    out = tmp_path / "out"
    status = main(
        [str(real_bids), str(out), "participant", "--engine", "sh", "-w", str(tmp_path / "w")]
    )
    assert status == 0
    assert main([str(real_bids), str(out), "group"]) == 0
    import nibabel as nib

    for run in runs:
        merged = out / run.output_dir_rel / f"{run.stem}_space-orig_desc-preproc_dwi.nii.gz"
        check_run_outputs(merged, nib.load(run.dwi).shape[3])
    rows = read_tsv(out / "group_qc.tsv")
    assert len(rows) == 10
    assert {r["subject"] for r in rows} == {"prisma", "uih", "xa30", "vanderbilt"}
    for row in rows:
        assert float(row["gap_merged_deg"]) < float(row["gap_acquired_deg"])
        assert float(row["hidden_nrmse"]) > 0
    assert_valid_derivative(out)
    for subject in ("prisma", "uih", "xa30", "vanderbilt"):
        assert (out / f"sub-{subject}.html").exists()
