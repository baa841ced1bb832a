"""QSIPrep -> qid2 -> QSIRecon: qid2 reads a QSIPrep derivative and writes one QSIRecon reads.

QSIRecon (``--input-type qsiprep``) indexes its input with pybids (``config.execution.init``:
``BIDSLayoutIndexer(validate=False)`` ignoring hidden files, ``config=["bids", "derivatives"]``),
takes every ``suffix="dwi", space=["T1w", "ACPC"], extension=["nii", "nii.gz"]`` file
(``utils/bids.get_iterable_dwis_and_anats``), then finds the rest by slicing the DWI name
(``interfaces/ingress.QSIPrepDWIIngress``): ``<name>.bval/.bvec/.b``,
``<name minus 'preproc_dwi'>brain_mask.nii*`` and ``<name minus 'desc-preproc_dwi'>dwiref.nii*``.
The tests below query qid2's output exactly that way.
"""

from __future__ import annotations

import json
import re
import subprocess
from glob import glob
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qid2_bidsapp.bids import collect_dwi_runs, detect_input_type
from qid2_bidsapp.cli.run import main
from qid2_bidsapp.data.example import make_example_run
from qid2_bidsapp.derivatives import write_dataset_description
from qid2_bidsapp.gradients import read_fsl_gradients, write_mrtrix_gradients

from .helpers import assert_valid_derivative, check_run_outputs

pytestmark = pytest.mark.slow


def _b0_mean(img: nib.Nifti1Image, bvals: np.ndarray) -> np.ndarray:
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data[..., bvals < 50].mean(axis=-1)


def write_qsiprep_run(root: Path, rel_stem: str, src_dwi: Path, src_bval: Path, src_bvec: Path):
    """Write one run the way QSIPrep names it: DWI, gradients, .b, mask, dwiref, sidecars."""
    from scipy import ndimage

    stem = root / rel_stem  # e.g. sub-01/dwi/sub-01_space-ACPC_desc-preproc_dwi
    stem.parent.mkdir(parents=True, exist_ok=True)
    img = nib.load(src_dwi)
    nib.save(img, f"{stem}.nii.gz")
    Path(f"{stem}.bval").write_text(Path(src_bval).read_text())
    Path(f"{stem}.bvec").write_text(Path(src_bvec).read_text())
    table = read_fsl_gradients(src_bval, src_bvec)
    write_mrtrix_gradients(table, img.affine, f"{stem}.b")
    Path(f"{stem}.b_table.txt").write_text("0 0 0 0\n")  # DSI Studio table, unused by qid2
    Path(f"{stem}.json").write_text(json.dumps({"RepetitionTime": 8.0}) + "\n")
    b0 = _b0_mean(img, np.loadtxt(src_bval).ravel())
    mask = ndimage.binary_fill_holes(b0 > 0.2 * np.percentile(b0, 99))
    base = str(stem).removesuffix("_desc-preproc_dwi")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), f"{base}_desc-brain_mask.nii.gz")
    nib.save(nib.Nifti1Image(b0, img.affine), f"{base}_dwiref.nii.gz")
    prefix = Path(base).name.split("_space-")[0]
    (stem.parent / f"{prefix}_desc-confounds_timeseries.tsv").write_text("framewise_disp\n0\n")
    (stem.parent / f"{prefix}_desc-ImageQC_dwi.csv").write_text("file_name,raw_ndc\nx,0.5\n")
    return mask


def write_qsiprep_dataset(root: Path, runs: dict[str, tuple[Path, Path, Path]]) -> dict:
    """A QSIPrep-shaped derivative: description, runs, anat, figures, reports and logs."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "QSIPrep output",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "qsiprep", "Version": "1.0.1"}],
            }
        )
    )
    masks = {rel: write_qsiprep_run(root, rel, *src) for rel, src in runs.items()}
    for subject in {rel.split("/")[0] for rel in runs}:
        anat = root / subject / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        ref = nib.load(next(iter(runs.values()))[0])
        t1 = nib.Nifti1Image(np.ones(ref.shape[:3], np.float32), ref.affine)
        nib.save(t1, anat / f"{subject}_space-ACPC_desc-preproc_T1w.nii.gz")
        nib.save(t1, anat / f"{subject}_space-ACPC_desc-brain_mask.nii.gz")
        (anat / f"{subject}_from-ACPC_to-MNI152NLin2009cAsym_mode-image_xfm.h5").write_bytes(b"")
        (root / subject / "figures").mkdir(exist_ok=True)
        (root / subject / "figures" / f"{subject}_desc-sdc_dwi.svg").write_text("<svg/>")
        (root / f"{subject}.html").write_text("<html></html>")
    (root / "logs").mkdir()
    (root / "logs" / "CITATION.md").write_text("QSIPrep\n")
    return masks


def qsirecon_layout(path: Path):
    """Index a dataset the way QSIRecon's ``config.execution.init`` does."""
    from bids.layout import BIDSLayout
    from bids.layout.index import BIDSLayoutIndexer

    ignore = [
        "code",
        "stimuli",
        "sourcedata",
        "models",
        re.compile(r"\/\.\w+|^\.\w+"),
        re.compile(r"sub-[a-zA-Z0-9]+(/ses-[a-zA-Z0-9]+)?/(beh|func|eeg|ieeg|meg|perf)"),
    ]
    return BIDSLayout(
        str(path),
        indexer=BIDSLayoutIndexer(validate=False, ignore=ignore),
        config=["bids", "derivatives"],
    )


def qsirecon_ingress(dwi_file: str) -> dict:
    """The files QSIRecon's ``QSIPrepDWIIngress`` finds beside one DWI (same name slicing)."""
    from nipype.utils.filemanip import split_filename

    out_root, fname, _ = split_filename(dwi_file)
    found = {"bval_file": f"{out_root}/{fname}.bval", "bvec_file": f"{out_root}/{fname}.bvec"}
    for name, pattern in (
        ("b_file", f"{out_root}/{fname}.b"),
        ("mask_file", f"{out_root}/{fname[:-11]}brain_mask.nii*"),
        ("dwi_ref", f"{out_root}/{fname[:-16]}dwiref.nii*"),
    ):
        files = glob(pattern)
        found[name] = files[0] if len(files) == 1 else None
    space = re.search(r"_(space-[a-zA-Z0-9]+)", fname)
    found["space_id"] = space.group(1) if space else None
    return found


def check_qsirecon_reads(out: Path, expected: dict[str, int], masks: dict[str, np.ndarray]):
    """QSIRecon's query finds one DWI per input run, with the same name, mask and dwiref."""
    from bids.layout import Query

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"  # QSIRecon refuses anything else
    layout = qsirecon_layout(out)
    dwis = layout.get(
        suffix="dwi", session=Query.OPTIONAL, space=["T1w", "ACPC"], extension=["nii", "nii.gz"]
    )
    found = sorted(Path(f.path).relative_to(out).as_posix() for f in dwis)
    assert found == sorted(f"{rel}.nii.gz" for rel in expected)
    for rel, n_in in expected.items():
        dwi = str(out / f"{rel}.nii.gz")
        ingress = qsirecon_ingress(dwi)
        assert ingress["space_id"] == re.search(r"_(space-[a-zA-Z0-9]+)", rel).group(1)
        for key in ("bval_file", "bvec_file", "b_file", "mask_file", "dwi_ref"):
            assert ingress[key] and Path(ingress[key]).is_file(), (rel, key)
        check_run_outputs(Path(dwi), n_in)
        # the mask QSIPrep made is the one qid2 used and ships
        used = np.asarray(nib.load(ingress["mask_file"]).dataobj) > 0
        np.testing.assert_array_equal(used, masks[rel] > 0)
        n_out = nib.load(dwi).shape[3]
        assert np.loadtxt(ingress["b_file"]).shape == (n_out, 4)
        assert nib.load(ingress["dwi_ref"]).shape == nib.load(dwi).shape[:3]


def test_qsiprep_to_qid2_to_qsirecon(tmp_path):
    raw = tmp_path / "raw"
    src = {}
    for rel, shells, seed in (
        ("sub-01/dwi/sub-01_space-ACPC_desc-preproc_dwi", {1000: 15}, 1),
        (
            "sub-02/ses-1/dwi/sub-02_ses-1_run-1_space-ACPC_desc-preproc_dwi",
            {1000: 12, 2000: 12},
            2,
        ),
    ):
        dwi = make_example_run(raw / f"{Path(rel).name}.nii.gz", shells, seed=seed)
        stem = str(dwi).removesuffix(".nii.gz")
        src[rel] = (dwi, Path(stem + ".bval"), Path(stem + ".bvec"))
    qsiprep = tmp_path / "derivatives" / "qsiprep"
    masks = write_qsiprep_dataset(qsiprep, src)
    assert detect_input_type(qsiprep) == "qsiprep"
    runs = collect_dwi_runs(qsiprep)
    assert [r.space for r in runs] == ["ACPC", "ACPC"]
    assert all(r.mask and r.bmatrix and r.bval and r.bvec for r in runs)

    out = tmp_path / "derivatives" / "qid2"
    work = tmp_path / "work"
    assert main([str(qsiprep), str(out), "participant", "--engine", "sh", "-w", str(work)]) == 0
    check_qsirecon_reads(
        out, {src_rel: 17 if "sub-01" in src_rel else 26 for src_rel in src}, masks
    )
    assert_valid_derivative(out)
    generated = json.loads((out / "dataset_description.json").read_text())
    assert generated["DatasetLinks"]["input"] == qsiprep.resolve().as_uri()


def test_anatomy_copied_as_in_the_docs_is_found_like_qsirecon(tmp_path):
    """docs/pipelines.md: copying QSIPrep's anat/ beside qid2's output, as QSIRecon looks."""
    from bids.layout import Query

    qsiprep, out = tmp_path / "derivatives" / "qsiprep", tmp_path / "derivatives" / "qid2"
    dwi = make_example_run(tmp_path / "raw" / "x_dwi.nii.gz", {1000: 9})
    stem = str(dwi).removesuffix(".nii.gz")
    rel = "sub-01/ses-1/dwi/sub-01_ses-1_space-ACPC_desc-preproc_dwi"
    write_qsiprep_dataset(qsiprep, {rel: (dwi, Path(stem + ".bval"), Path(stem + ".bvec"))})
    write_dataset_description(out, qsiprep)  # as a qid2 participant run would have
    docs = (Path(__file__).resolve().parents[1] / "docs" / "pipelines.md").read_text()
    snippet = re.search(r"```bash\n(\s*cd /data/derivatives/qsiprep.*?)```", docs, re.S).group(1)
    script = snippet.replace("/data/derivatives", str(tmp_path / "derivatives"))
    subprocess.run(["bash", "-c", script], check=True)
    layout = qsirecon_layout(out)
    anats = layout.get(
        suffix=["T1w", "T2w"],
        session=Query.NONE,
        space=[Query.NONE, "ACPC"],
        extension=["nii", "nii.gz"],
    )
    assert [Path(a.path).name for a in anats] == ["sub-01_space-ACPC_desc-preproc_T1w.nii.gz"]


@pytest.mark.realdata
def test_real_scan_through_qsiprep_shaped_chaining(real_bids, tmp_path):
    dwi = real_bids / "sub-uih" / "dwi" / "sub-uih_dir-AP_dwi.nii.gz"
    stem = str(dwi).removesuffix(".nii.gz")
    rel = "sub-uih/dwi/sub-uih_dir-AP_space-T1w_desc-preproc_dwi"  # QSIPrep < 1.0 named T1w
    qsiprep = tmp_path / "qsiprep"
    masks = write_qsiprep_dataset(qsiprep, {rel: (dwi, Path(stem + ".bval"), Path(stem + ".bvec"))})
    out = tmp_path / "qid2"
    status = main(
        [str(qsiprep), str(out), "participant", "--engine", "sh", "-w", str(tmp_path / "w")]
    )
    assert status == 0
    check_qsirecon_reads(out, {rel: nib.load(dwi).shape[3]}, masks)
