"""BIDS discovery with pybids: entities, filters, input types, inherited gradient files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qid2_bidsapp.bids import collect_dwi_runs, detect_input_type, load_bids_filter_file
from qid2_bidsapp.errors import InputError


def test_collects_every_run_with_entities(example_bids_ro):
    runs = collect_dwi_runs(example_bids_ro)
    assert [r.stem for r in runs] == ["sub-01", "sub-02_ses-1_dir-AP"]
    assert runs[1].session == "1" and runs[1].entities["direction"] == "AP"
    assert all(r.space == "orig" and r.mask is None and r.bval and r.bvec for r in runs)
    assert str(runs[1].output_dir_rel) == "sub-02/ses-1/dwi"


def test_participant_and_session_selection(example_bids_ro):
    assert [
        r.subject for r in collect_dwi_runs(example_bids_ro, participant_labels=["sub-02"])
    ] == ["02"]
    assert [r.subject for r in collect_dwi_runs(example_bids_ro, participant_labels=["01"])] == [
        "01"
    ]
    assert [r.subject for r in collect_dwi_runs(example_bids_ro, session_ids=["ses-1"])] == ["02"]
    with pytest.raises(InputError, match="session"):
        collect_dwi_runs(example_bids_ro, session_ids=["9"])


def test_bids_filter_file(example_bids_ro, tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"dwi": {"direction": "AP"}}))
    runs = collect_dwi_runs(example_bids_ro, bids_filters=load_bids_filter_file(path))
    assert [r.stem for r in runs] == ["sub-02_ses-1_dir-AP"]
    path.write_text("{not json")
    with pytest.raises(InputError, match="f.json: is not valid JSON"):
        load_bids_filter_file(path)
    path.write_text(json.dumps({"t1w": {}}))
    with pytest.raises(InputError, match="unknown queries"):
        load_bids_filter_file(path)


def test_inherited_gradient_files(example_bids, tmp_path):
    """Raw BIDS may put dwi.bval/dwi.bvec at the top of the dataset (inheritance)."""
    dwi_dir = example_bids / "sub-01" / "dwi"
    for ext in ("bval", "bvec"):
        shutil.move(dwi_dir / f"sub-01_dwi.{ext}", example_bids / f"dwi.{ext}")
    runs = collect_dwi_runs(example_bids, participant_labels=["01"])
    assert runs[0].bval == example_bids / "dwi.bval"


def test_input_type_detection(example_bids_ro, tmp_path):
    assert detect_input_type(example_bids_ro) == "raw"
    with pytest.raises(InputError, match="dataset_description.json"):
        detect_input_type(tmp_path)
    (tmp_path / "dataset_description.json").write_text('{"DatasetType": "derivative"}')
    assert detect_input_type(tmp_path) == "qsiprep"


def test_no_dwi(tmp_path):
    (tmp_path / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    (tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="no 'dwi"):
        collect_dwi_runs(tmp_path)


def test_validator_runs_with_an_unwritable_home(example_bids_ro, monkeypatch):
    from qid2_bidsapp.validation import run_validator

    home = Path("/nonexistent-qid2-home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DENO_DIR", raising=False)
    result = run_validator(example_bids_ro)
    assert not result.errors, result.summary()
    assert not home.exists()  # deno's cache went to a private temporary folder
