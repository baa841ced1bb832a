"""Tests of the reports package on a small fake qid2 output folder (docs/outputs.md)."""

from __future__ import annotations

import csv
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges
from dipy.reconst.dti import TensorModel
from dipy.sims.voxel import single_tensor

from qid2_bidsapp.errors import InputError
from qid2_bidsapp.interfaces.outputs import QC_COLUMNS
from qid2_bidsapp.reports import build_group_report, build_subject_report
from qid2_bidsapp.reports.figures import fold_to_hemisphere
from qid2_bidsapp.reports.methods import methods_paragraph
from qid2_bidsapp.reports.subject import (
    QC_COLUMN_HELP,
    RasView,
    choose_slices,
    command_line,
    format_value,
    pick_examples,
)

SHAPE = (12, 12, 4)
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])
# (subject, session, shells, hidden NRMSE per shell): sub-01 has two sessions, sub-02 two shells
RUNS = [
    ("01", "a", [1000.0], [0.0523]),
    ("01", "b", [1000.0], [0.0611]),
    ("02", None, [1000.0, 2000.0], [0.0734, 0.0912]),
]
N_ACQ, N_SYN = 10, 20
STAMP = "20250101-120000-a1b2c3"  # logs/qid2-<stamp>.log and logs/config-<stamp>.json


# --------------------------------------------------------------------------- fake output


def _directions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    hemi, _ = disperse_charges(HemiSphere(xyz=v), 100)
    return hemi.vertices


def _phantom(bvals: np.ndarray, bvecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left half: fibres along x, right half: along y, a ring of isotropic tissue; mask."""
    gtab = gradient_table(bvals, bvecs=bvecs)
    evals = np.array([1.7e-3, 0.3e-3, 0.3e-3])
    sig_x = single_tensor(gtab, 1000.0, evals=evals, evecs=np.eye(3))
    sig_y = single_tensor(gtab, 1000.0, evals=evals, evecs=np.eye(3)[:, [1, 0, 2]])
    sig_iso = single_tensor(gtab, 1000.0, evals=np.full(3, 0.8e-3), evecs=np.eye(3))
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    r = np.hypot(x - 5.5, y - 5.5)
    mask2d = r < 5.2
    data = np.zeros((*SHAPE, len(bvals)), dtype=np.float32)
    for z in range(SHAPE[2]):
        data[(r < 5.2) & (r >= 4.2), z] = sig_iso
        data[(r < 4.2) & (x < 6), z] = sig_x
        data[(r < 4.2) & (x >= 6), z] = sig_y
    mask = np.repeat(mask2d[:, :, None], SHAPE[2], axis=2)
    return data, mask


def _save(img: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(img, AFFINE), path)


def _fa(data: np.ndarray, mask: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(data, mask=mask)
    return np.nan_to_num(fit.fa).astype(np.float32)


def _write_run(root: Path, sub: str, ses: str | None, shells, nrmse, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "dwi"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    prefix = f"{stem}_space-orig"
    acq_b, acq_v, syn_b, syn_v = [0.0], [np.zeros(3)], [], []
    for k, b in enumerate(shells):
        dirs = _directions(N_ACQ + N_SYN, seed * 10 + k)
        acq_b += [b] * N_ACQ
        acq_v += list(dirs[:N_ACQ] * rng.choice([-1, 1], size=(N_ACQ, 1)))  # mixed hemispheres
        syn_b += [b] * N_SYN
        syn_v += list(dirs[N_ACQ:])
    bvals = np.array(acq_b + syn_b)
    bvecs = np.array(acq_v + syn_v)
    data, mask = _phantom(bvals, bvecs)
    n_acq = len(acq_b)
    noise = rng.normal(scale=15.0, size=data.shape).astype(np.float32) * mask[..., None]
    data += noise
    data = np.clip(data, 0, None)

    _save(data, folder / f"{prefix}_desc-preproc_dwi.nii.gz")
    np.savetxt(folder / f"{prefix}_desc-preproc_dwi.bval", bvals[None], fmt="%g")
    np.savetxt(folder / f"{prefix}_desc-preproc_dwi.bvec", bvecs.T, fmt="%.6f")
    _save(mask.astype(np.uint8), folder / f"{prefix}_desc-brain_mask.nii.gz")
    _save(data[..., 0], folder / f"{prefix}_dwiref.nii.gz")
    acq = list(range(n_acq))
    fa_acq = _fa(data[..., acq], mask, bvals[acq], bvecs[acq])
    fa_up = _fa(data, mask, bvals, bvecs)
    _save(fa_acq, folder / f"{prefix}_model-tensor_param-fa_desc-acquired_dwimap.nii.gz")
    _save(fa_up, folder / f"{prefix}_model-tensor_param-fa_desc-upsampled_dwimap.nii.gz")
    source = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + f"dwi/{stem}_dwi.nii.gz"
    sidecar = {
        "SpatialReference": "orig",
        "SkullStripped": False,
        "Sources": [f"bids:raw:{source}"],
        "SourceFile": source,
        "AcquiredVolumes": acq,
        "SynthesizedVolumes": list(range(n_acq, len(bvals))),
        "ShellsUpsampled": list(shells),
        "TargetDirections": "repulsion",
        "UpsamplingEngine": "sh",
        "UpsamplingEngineSettings": {"sh_order": 4, "sh_lambda": 0.006},
        "ModelID": None,
        "ModelSHA256": None,
        "SamplerSettings": None,
        "RandomSeed": 1234 + seed,
        "Qid2Version": "0.1.0",
    }
    (folder / f"{prefix}_desc-preproc_dwi.json").write_text(json.dumps(sidecar, indent=2))
    rows = []
    for b, e in zip(shells, nrmse, strict=True):
        rows.append(
            {
                "subject": sub,
                "session": ses or "n/a",
                "source": source,
                "shell": f"{b:g}",
                "n_acquired": N_ACQ,
                "n_synthesized": N_SYN,
                "engine": "sh",
                "gap_acquired_deg": 41.7,
                "gap_merged_deg": 19.3,
                "hidden_n": 2,
                "hidden_nrmse": e,
                "hidden_fa_mae": 0.0187,
                "fa_mean_acquired": 0.4312,
                "fa_mean_upsampled": 0.4279,
                "fa_mae_upsampled_vs_acquired": 0.0214,
                "runtime_s": 1.25,
            }
        )
    with open(folder / f"{prefix}_desc-qc_dwiqc.tsv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=QC_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return {"prefix": prefix, "rows": rows}


@pytest.fixture(scope="module")
def fake_output(tmp_path_factory) -> Path:
    """A qid2 derivative folder with 2 subjects (sub-01 with two sessions, sub-02 two shells)."""
    root = tmp_path_factory.mktemp("qid2_out")
    (root / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "qid2 outputs",
                "BIDSVersion": "1.10.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "qid2", "Version": "0.1.0"}],
            }
        )
    )
    for i, (sub, ses, shells, nrmse) in enumerate(RUNS):
        _write_run(root, sub, ses, shells, nrmse, seed=i + 1)
    logs = root / "logs"
    logs.mkdir()
    (logs / f"qid2-{STAMP}.log").write_text("qid2 started\n")
    config = {"bids_dir": "/data/raw", "output_dir": str(root), "analysis_level": "participant"}
    config |= {"engine": "sh", "sh_lambda": 0.006, "random_seed": 0, "version": "0.1.0"}
    (logs / f"config-{STAMP}.json").write_text(json.dumps(config))
    (logs / "config-20240101-000000-000000.json").write_text(json.dumps({"engine": "interp"}))
    os.utime(logs / "config-20240101-000000-000000.json", (1e9, 1e9))  # an older invocation
    return root


@pytest.fixture(scope="module")
def subject_reports(fake_output: Path) -> dict[str, Path]:
    log = fake_output / "logs" / f"qid2-{STAMP}.log"
    return {
        "01": build_subject_report(fake_output, "01", log_path=log),
        "02": build_subject_report(fake_output, "sub-02"),
    }


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.img, self.href = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.img.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.href.append(attrs["href"])


def _links(html_path: Path) -> _Links:
    parser = _Links()
    parser.feed(html_path.read_text(encoding="utf-8"))
    return parser


# --------------------------------------------------------------------------- subject report


def test_subject_report_written(fake_output, subject_reports):
    assert subject_reports["01"] == fake_output / "sub-01.html"
    assert subject_reports["02"] == fake_output / "sub-02.html"
    html = subject_reports["01"].read_text()
    assert "sub-01_ses-a_space-orig" in html and "sub-01_ses-b_space-orig" in html
    assert "<details" in html  # one collapsible section per run
    assert "http://" not in html and "https://" not in html  # works offline


@pytest.mark.parametrize("sub", ["01", "02"])
def test_subject_report_links_exist(fake_output, subject_reports, sub):
    links = _links(subject_reports[sub])
    fig_dir = fake_output / f"sub-{sub}" / "figures"
    pngs = sorted(p.name for p in fig_dir.glob("*.png"))
    assert pngs, "no figures written"
    assert sorted(Path(s).name for s in links.img) == pngs  # every figure shown, each once
    for src in links.img:
        assert not Path(src).is_absolute()
        assert (fake_output / src).is_file(), src
    for href in links.href:
        if href.startswith("#"):
            continue
        assert not href.startswith(("http:", "https:", "file:")), href
        assert (fake_output / href).exists(), href
    assert not list(fig_dir.glob("*.tmp")) and not list(fake_output.glob(".*.tmp"))


def test_subject_figures_per_run(fake_output, subject_reports):
    names = {p.name for p in (fake_output / "sub-01" / "figures").glob("*.png")}
    for prefix in ("sub-01_ses-a_space-orig", "sub-01_ses-b_space-orig"):
        assert f"{prefix}_desc-directions_dwi.png" in names
        assert f"{prefix}_desc-fa_dwimap.png" in names
        assert f"{prefix}_desc-colorfa_dwimap.png" in names
        synth = [n for n in names if n.startswith(f"{prefix}_desc-synth")]
        assert 2 <= len(synth) <= 3


def test_subject_report_qc_values(subject_reports):
    html1 = subject_reports["01"].read_text()
    for value in ("0.0523", "0.0611", "41.7", "19.3", "0.4312", "0.4279", "0.0187", "1.25"):
        assert value in html1
    for column, help_text in QC_COLUMN_HELP.items():
        if column not in ("subject", "session", "source", "shell"):
            assert column in html1
            assert help_text.split(" ")[0] in html1
    html2 = subject_reports["02"].read_text()
    assert "0.0734" in html2 and "0.0912" in html2
    assert "b = 1000" in html2 and "b = 2000" in html2


def test_subject_report_methods_and_provenance(subject_reports):
    html = subject_reports["01"].read_text()
    for ref in (
        "arXiv:2409.02309",
        "QID²",
        "Regularized, fast, and robust analytical Q-ball imaging",
        "Basser PJ",
        "Dipy, a library for the analysis of diffusion MRI data",
        "Nipype",
        "The brain imaging data structure",
        "Jones DK",
        "baseline",
    ):
        assert ref in html, ref
    assert "1235" in html  # RandomSeed of the first run
    assert "sub-01/ses-a/dwi/sub-01_ses-a_dwi.nii.gz" in html  # SourceFile
    assert "0.1.0" in html and "sh_lambda" in html
    assert f'href="logs/qid2-{STAMP}.log"' in html
    assert f'href="logs/config-{STAMP}.json"' in html and "/data/raw" in html
    assert "may belong to another invocation" not in html
    html2 = subject_reports["02"].read_text()
    assert f"logs/qid2-{STAMP}.log" not in html2
    assert f'href="logs/config-{STAMP}.json"' in html2  # the newest config ...
    assert "may belong to another invocation" in html2  # ... flagged as not tied to a log


def test_command_line():
    assert command_line({"command_line": ["qid2", "in dir", "out", "participant"]}) == (
        "qid2 'in dir' out participant"
    )
    assert command_line({"argv": "qid2 a b group"}) == "qid2 a b group"
    assert command_line({"engine": "sh"}) is None and command_line(None) is None


def test_subject_report_rebuild_is_idempotent(fake_output, subject_reports):
    before = sorted(p.name for p in (fake_output / "sub-02" / "figures").iterdir())
    assert build_subject_report(fake_output, "02") == subject_reports["02"]
    after = sorted(p.name for p in (fake_output / "sub-02" / "figures").iterdir())
    assert before == after


def test_subject_without_runs_raises(fake_output):
    with pytest.raises(InputError, match="sub-03"):
        build_subject_report(fake_output, "03")
    assert not (fake_output / "sub-03.html").exists()


def test_lps_run_and_broken_sidecar(tmp_path, fake_output):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(
        fake_output / "sub-02", out / "sub-02", ignore=shutil.ignore_patterns("figures")
    )
    lps = np.diag([-2.0, -2.0, 2.5, 1.0])
    for path in (out / "sub-02" / "dwi").glob("*.nii.gz"):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1, ::-1], lps), path)
    html = build_subject_report(out, "02")
    assert len(_links(html).img) == 5  # directions, 2 examples (one per shell), FA, colour FA
    sidecar = next((out / "sub-02" / "dwi").glob("*_desc-preproc_dwi.json"))
    meta = json.loads(sidecar.read_text())
    meta["SynthesizedVolumes"] = [999]
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="out of range"):
        build_subject_report(out, "02")


def test_small_field_of_view_is_flagged_for_the_diffusion_engine(tmp_path, fake_output):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(
        fake_output / "sub-02", out / "sub-02", ignore=shutil.ignore_patterns("figures")
    )
    note = "The brain spans only"
    assert note not in build_subject_report(out, "02").read_text()  # engine sh: no note
    sidecar = next((out / "sub-02" / "dwi").glob("*_desc-preproc_dwi.json"))
    meta = json.loads(sidecar.read_text())
    meta["UpsamplingEngine"] = "qid2"
    sidecar.write_text(json.dumps(meta))
    html = build_subject_report(out, "02").read_text()
    assert f"{note} 10×10×{SHAPE[2]} voxels" in html  # the phantom's disc, 10 voxels across


def test_clean_scan_is_flagged_for_the_diffusion_engine(tmp_path, fake_output):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(
        fake_output / "sub-02", out / "sub-02", ignore=shutil.ignore_patterns("figures")
    )
    sidecar = next((out / "sub-02" / "dwi").glob("*_desc-preproc_dwi.json"))
    meta = json.loads(sidecar.read_text())
    meta["UpsamplingEngine"] = "qid2"
    sidecar.write_text(json.dumps(meta))
    qc = next((out / "sub-02" / "dwi").glob("*_desc-qc_dwiqc.tsv"))
    table = qc.read_text()
    note = "This scan is clean"
    assert note not in build_subject_report(out, "02").read_text()  # no noise column: no note

    def with_noise(*values):
        lines = table.splitlines()
        col = lines[0].split("\t").index("noise_sigma_rel")
        rows = [line.split("\t") for line in lines[1:]]
        for row, value in zip(rows, values, strict=True):
            row[col] = str(value)
        qc.write_text("\n".join([lines[0]] + ["\t".join(r) for r in rows]) + "\n")

    n_shells = len(table.splitlines()) - 1
    with_noise(*[0.0125] * n_shells)  # S0/σ = 80 on every shell
    assert f"{note} (S0/σ ≈ 80)" in build_subject_report(out, "02").read_text()
    with_noise(*([0.0125] * (n_shells - 1) + [0.04]))  # one shell at 25: not clean
    assert note not in build_subject_report(out, "02").read_text()


def test_missing_gradient_table_raises(tmp_path, fake_output):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(fake_output / "sub-02", out / "sub-02")
    next(out.glob("sub-02/dwi/*.bvec")).unlink()
    with pytest.raises(InputError, match="bvec"):
        build_subject_report(out, "02")


# --------------------------------------------------------------------------- group report


def test_group_report(fake_output, subject_reports):
    tsv, html = build_group_report(fake_output)
    assert tsv == fake_output / "group_qc.tsv" and html == fake_output / "group.html"
    with open(tsv, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        rows = list(reader)
        assert reader.fieldnames == list(QC_COLUMNS)
    assert len(rows) == sum(len(r[2]) for r in RUNS) == 4
    assert sorted(r["hidden_nrmse"] for r in rows) == ["0.0523", "0.0611", "0.0734", "0.0912"]
    assert {r["session"] for r in rows} == {"a", "b", "n/a"}
    text = html.read_text()
    assert "0.0912" in text and 'href="sub-01.html"' in text
    assert re.search(r"<td>01</td>", text)  # labels are not turned into numbers
    links = _links(html)
    assert len(links.img) >= 3
    for src in links.img + [h for h in links.href if not h.startswith("#")]:
        assert (fake_output / src).exists(), src
    assert all(s.startswith("group/figures/") for s in links.img)
    assert not list((fake_output / "group" / "figures").glob("*.tmp"))


def test_group_without_outputs_raises(tmp_path):
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(InputError, match="run the participant level first") as err:
        build_group_report(tmp_path)
    assert err.value.path == str(tmp_path)
    assert not (tmp_path / "group_qc.tsv").exists()


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("engine", "settings", "expected"),
    [
        ("sh", {"sh_order": 6, "sh_lambda": 0.006}, ["Descoteaux", "Laplace", "6", "0.006"]),
        ("interp", {"n_neighbours": 3}, ["3 angularly nearest", "baseline"]),
        ("qid2", {"steps": 50}, ["image-conditioned diffusion model", "steps"]),
    ],
)
def test_methods_paragraph(engine, settings, expected):
    html = methods_paragraph(engine, settings, 30, 60, [1000, 2000])
    for text in expected + ["arXiv:2409.02309", "Basser", "Garyfallidis", "Gorgolewski"]:
        assert text in html
    assert "1000 and 2000" in html and "60 new" in html and "30" in html
    assert html.count("<li>") == len(re.findall(r"<sup>\[", html)) or html.count("<li>") >= 5
    cited = {int(n) for group in re.findall(r"<sup>\[([\d,]+)\]", html) for n in group.split(",")}
    assert cited == set(range(1, html.count("<li>") + 1))  # every reference cited, none missing


def test_methods_paragraph_escapes():
    html = methods_paragraph("sh", {"x": "<script>"}, 10, 20, [1000])
    assert "<script>" not in html


def test_fold_to_hemisphere():
    v = np.array([[0, 0, -1.0], [1, 0, 0], [-1, 0, 0], [0, -1, 0], [0, 0, 0], [0.6, 0, -0.8]])
    out = fold_to_hemisphere(v)
    assert out.shape == (5, 3)
    assert np.all(out[:, 2] >= 0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0)
    np.testing.assert_allclose(out[-1], [-0.6, 0, 0.8])


def test_pick_examples_uses_antipodal_nearest():
    bvals = np.array([0, 1000, 1000, 1000, 1000, 1000])
    bvecs = np.array(
        [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [-0.99, 0.141, 0], [0, 0.1, -0.995]]
    )
    bvecs = bvecs / np.maximum(np.linalg.norm(bvecs, axis=1, keepdims=True), 1e-12)
    shell_of = np.array([-1, 0, 0, 0, 0, 0])
    ex = pick_examples(bvals, bvecs, [0, 1, 2, 3], [4, 5], shell_of, [1000.0])
    assert {(e.synthesized, e.nearest) for e in ex} == {(4, 1), (5, 3)}
    assert ex[0].angle_deg >= ex[-1].angle_deg


def test_ras_view_of_lps_image():
    view = RasView.from_affine(np.diag([-2.0, -3.0, 4.0, 1.0]))
    data = np.arange(24).reshape(2, 3, 4)
    np.testing.assert_array_equal(view.array(data), data[::-1, ::-1, :])
    np.testing.assert_array_equal(view.array(data[..., None])[..., 0], data[::-1, ::-1, :])
    np.testing.assert_allclose(view.vectors(np.array([[1.0, 0.5, 0.2]])), [[-1.0, -0.5, 0.2]])
    swapped = RasView.from_affine(
        np.array([[0, 2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 4, 0], [0, 0, 0, 1]])
    )
    assert swapped.zooms((3.0, 2.0, 4.0)) == (2.0, 3.0, 4.0)
    np.testing.assert_allclose(swapped.vectors(np.array([[1.0, 0.0, 0.0]])), [[0.0, 1.0, 0.0]])


def test_format_value():
    assert format_value("0.0523456") == "0.05235"
    assert format_value("12") == "12"
    assert format_value("01", "subject") == "01"
    assert format_value("") == "n/a" and format_value("n/a") == "n/a"


def test_choose_slices():
    mask = np.zeros((4, 4, 30), bool)
    mask[:, :, 5:25] = True
    z = choose_slices(mask, 4)
    assert len(z) == 4 and 5 <= min(z) and max(z) <= 24
    assert choose_slices(np.ones((2, 2, 3), bool), 4) == [0, 1, 2]


def test_group_flags_come_from_each_runs_verdict_and_labels_keep_runs_apart(tmp_path):
    from qid2_bidsapp.reports.group import _labels, _table_rows

    rows = [
        {"subject": "uih", "session": "n/a", "source": "sub-uih/dwi/sub-uih_dir-AP_dwi.nii.gz",
         "shell": "928", "trust": "pass"},
        {"subject": "uih", "session": "n/a", "source": "sub-uih/dwi/sub-uih_dir-PA_dwi.nii.gz",
         "shell": "930", "trust": "warn"},
    ]  # fmt: skip
    assert _labels(rows) == ["sub-uih_dir-AP b=928", "sub-uih_dir-PA b=930"]
    table = _table_rows(rows, ["subject", "trust"], tmp_path)
    assert [r["flag"] for r in table] == [False, True]
    single = _table_rows(rows[1:], ["subject", "trust"], tmp_path)  # one run: still flagged
    assert single[0]["flag"] is True


def test_qid2_methods_paragraph_is_manuscript_ready():
    import re

    from qid2_bidsapp.reports.methods import methods_paragraph

    settings = {
        "model_id": "qid2-default-0123456789ab",
        "model_kind": "sh-field",
        "model_sha256": "ab" * 32,
        "model_dir": "/tmp/some/local/path",
        "sampler": {"n_steps": 2, "t_start": 100, "temperature": 1.0, "n_samples": 2, "eta": 0.0},
        "seed": 0,
        "device": "cpu",
        "amp": False,
        "amp_requested": True,
        "precision": "float32",
        "prior": {"engine": "sh", "order": 6, "lambda": 0.006},
        "direction_frame": "voxel axes of the slice (model.data.model_frame_bvecs)",
        "adaptation": {"steps": 0},
        "batch_size": "auto",
    }
    html = methods_paragraph("qid2", settings, 30, 60, [1000], version="0.2.0", seed=0)
    text = re.sub("<[^>]+>", "", html)
    for internal in ("/tmp", "model_frame_bvecs", "adaptation", "further engine settings"):
        assert internal not in text
    assert not re.search(r"\bamp\b", text)
    assert "qid2-default-0123456789ab" in text and "2 DDIM step(s)" in text
    numbers = [int(n) for n in re.findall(r"<sup>\[([\d,]+)\]</sup>", html) for n in n.split(",")]
    first_seen = list(dict.fromkeys(numbers))
    assert first_seen == sorted(first_seen)  # numbered in the order of the text


def test_qid2_methods_paragraph_names_the_tensor_prior_and_the_mean_signal_rescaling():
    import re

    from qid2_bidsapp.reports.methods import methods_paragraph

    base = {
        "model_id": "qid2-default-0123456789ab",
        "model_kind": "sh-field",
        "sampler": {"n_steps": 1, "t_start": 100, "temperature": 1.0, "n_samples": 1},
        "device": "cpu",
    }
    texts = {}
    for name, prior in [
        ("sh", {"engine": "sh", "order": 6, "lambda": 0.006}),
        ("dti", {"engine": "dti", "order": 6, "lambda": 0.006, "log_mean_from_prior": True}),
    ]:
        html = methods_paragraph("qid2", base | {"prior": prior}, 30, 60, [1000], seed=0)
        texts[name] = re.sub("<[^>]+>", "", html)
    assert "Laplace–Beltrami" in texts["sh"] and "tensor fitted" not in texts["sh"]
    assert "rescaled" not in texts["sh"]
    assert "diffusion tensor fitted" in texts["dti"] and "Laplace–Beltrami" not in texts["dti"]
    assert "mean log signal" in texts["dti"]
