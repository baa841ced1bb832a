"""Derivative dataset bookkeeping: names, description, all-or-nothing publication."""

from __future__ import annotations

import json

import pytest

from qid2_bidsapp.bids import collect_dwi_runs
from qid2_bidsapp.derivatives import (
    check_output_dir,
    publish,
    run_output_paths,
    write_dataset_description,
)
from qid2_bidsapp.errors import InputError


def test_names_follow_qsiprep_conventions(example_bids_ro, tmp_path):
    run = collect_dwi_runs(example_bids_ro)[1]
    paths = run_output_paths(run, tmp_path)
    assert paths["dwi"].name == "sub-02_ses-1_dir-AP_space-orig_desc-preproc_dwi.nii.gz"
    assert paths["mask"].name == "sub-02_ses-1_dir-AP_space-orig_desc-brain_mask.nii.gz"
    assert str(paths["dwi"]).split("_desc-preproc_dwi")[0] + "_desc-brain_mask.nii.gz" == str(
        paths["mask"]
    )
    assert paths["fa_upsampled"].name.endswith(
        "_model-tensor_param-fa_desc-upsampled_dwimap.nii.gz"
    )
    assert paths["dwi"].parent == tmp_path / "sub-02" / "ses-1" / "dwi"


def test_dataset_description(tmp_path, example_bids_ro):
    path = write_dataset_description(tmp_path / "out", example_bids_ro)
    info = json.loads(path.read_text())
    assert info["DatasetType"] == "derivative"
    assert {"Name", "Version", "CodeURL"} <= set(info["GeneratedBy"][0])
    assert info["SourceDatasets"][0]["URL"] == example_bids_ro.resolve().as_uri()
    assert (tmp_path / "out" / ".bidsignore").exists()
    check_output_dir(example_bids_ro, tmp_path / "out")  # ours: accepted again
    other = tmp_path / "other_input"
    other.mkdir()
    with pytest.raises(InputError, match="another input dataset"):
        check_output_dir(other, tmp_path / "out")


def test_output_dir_checks(example_bids_ro, tmp_path):
    with pytest.raises(InputError):
        check_output_dir(example_bids_ro, example_bids_ro)
    with pytest.raises(InputError, match="contain"):
        check_output_dir(example_bids_ro, example_bids_ro.parent)
    check_output_dir(example_bids_ro, example_bids_ro / "derivatives" / "qid2")


def test_publish_is_all_or_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("A")
    (src / "b").write_text("B")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        publish({src / "a": out / "a", src / "missing": out / "m", src / "b": out / "b"})
    assert not [p for p in out.rglob("*") if p.is_file()]
    publish({src / "a": out / "x" / "a", src / "b": out / "b"})
    assert (out / "x" / "a").read_text() == "A" and (out / "b").read_text() == "B"
    (src / "a").write_text("A2")
    publish({src / "a": out / "x" / "a"})
    assert (out / "x" / "a").read_text() == "A2"
    assert not list(out.rglob(".*.tmp"))


def test_container_info_prefers_apptainer_over_the_image_variables(monkeypatch):
    from qid2_bidsapp.derivatives import container_info

    monkeypatch.setenv("QID2_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("QID2_CONTAINER_TAG", "qid2:0.1.0")
    monkeypatch.delenv("APPTAINER_CONTAINER", raising=False)
    assert container_info() == {"Type": "docker", "Tag": "qid2:0.1.0"}
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/qid2.sif")
    assert container_info() == {"Type": "apptainer", "Tag": "qid2:0.1.0"}


def test_reports_and_figures_get_the_umask_mode_not_owner_only(tmp_path):
    import os

    import matplotlib.figure

    from qid2_bidsapp.derivatives import atomic_write_text
    from qid2_bidsapp.reports.figures import save_figure

    previous = os.umask(0o022)
    try:
        page = atomic_write_text(tmp_path / "sub-01.html", "<html></html>")
        png = save_figure(matplotlib.figure.Figure(), tmp_path / "f.png")
    finally:
        os.umask(previous)
    assert page.stat().st_mode & 0o777 == 0o644
    assert png.stat().st_mode & 0o777 == 0o644


def test_publish_sweeps_stale_temporary_files_and_removes_obsolete_outputs(tmp_path):
    from qid2_bidsapp.derivatives import publish

    out = tmp_path / "out"
    folder = out / "sub-01" / "dwi"
    folder.mkdir(parents=True)
    stale = folder / f".sub-01_dwi.nii.gz.{'a' * 32}.tmp"  # left by a killed run
    stale.write_text("half a file")
    other = folder / ".not-ours.tmp"
    other.write_text("someone else's")
    old_map = folder / "sub-01_model-qid2_param-std_dwimap.nii.gz"  # from a qid2-engine run
    old_map.write_text("stale uncertainty")
    src = tmp_path / "new.txt"
    src.write_text("new output")
    written = publish({src: folder / "sub-01_dwi.nii.gz"}, output_dir=out, obsolete=[old_map])
    assert written == [folder / "sub-01_dwi.nii.gz"]
    assert not stale.exists() and not old_map.exists()
    assert other.exists()  # only qid2's own temporary names are swept
    assert sorted(p.name for p in folder.iterdir()) == [".not-ours.tmp", "sub-01_dwi.nii.gz"]
