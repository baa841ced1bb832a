"""The command line: parser, generated docs, and clear errors on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qid2_bidsapp import __version__
from qid2_bidsapp.cli.docs import usage_markdown
from qid2_bidsapp.cli.parser import _build_parser
from qid2_bidsapp.cli.run import main

REPO = Path(__file__).resolve().parents[1]


def parse(*args):
    return _build_parser().parse_args(list(args))


def test_positionals_and_defaults(tmp_path):
    args = parse(str(tmp_path), str(tmp_path / "out"), "participant")
    assert args.analysis_level == "participant"
    assert args.engine == "qid2"
    assert args.n_targets is None and args.target_bvecs is None
    assert args.random_seed == 0
    assert args.input_type == "auto"


def test_all_options_parse(tmp_path):
    filters = tmp_path / "filters.json"
    filters.write_text('{"dwi": {"session": "1"}}')
    args = parse(
        "bids",
        "out",
        "participant",
        "--participant-label",
        "sub-01",
        "02",
        "--session-id",
        "ses-1",
        "--bids-filter-file",
        str(filters),
        "--input-type",
        "qsiprep",
        "--n-targets",
        "30",
        "--shells",
        "1000",
        "2000",
        "--engine",
        "sh",
        "-w",
        "wd",
        "--nprocs",
        "2",
        "--omp-nthreads",
        "1",
        "--mem-gb",
        "4",
        "--random-seed",
        "7",
        "--skip-bids-validation",
        "--stop-on-first-crash",
        "--write-graph",
        "--reports-only",
        "-vv",
    )
    assert args.participant_label == ["sub-01", "02"]
    assert args.shells == [1000.0, 2000.0]
    assert args.verbose == 2 and args.nprocs == 2 and args.mem_gb == 4.0


@pytest.mark.parametrize(
    "extra",
    [
        ["--engine", "magic"],
        ["--n-targets", "0"],
        ["--n-targets", "10", "--target-bvecs", __file__],
        ["--target-bvecs", "/nonexistent/file.bvec"],
        ["--shells", "-5"],
        ["--precision", "fp8"],
    ],
)
def test_parser_rejects(extra, capsys):
    with pytest.raises(SystemExit) as exc:
        parse("bids", "out", "participant", *extra)
    assert exc.value.code == 2


def test_precision_reaches_the_engine(tmp_path):
    from qid2_bidsapp.cli.run import _config_from_args

    config = _config_from_args([str(tmp_path), str(tmp_path / "out"), "participant"])
    assert config.engine_options["precision"] == "auto"
    args = [str(tmp_path), str(tmp_path / "out"), "participant", "--precision", "bfloat16"]
    config = _config_from_args(args)
    assert config.engine_options["precision"] == "bfloat16"


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "qid2_bidsapp.cli.run", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"qid2 {__version__}"


def test_usage_docs_are_generated_from_parser():
    assert (REPO / "docs" / "usage.md").read_text() == usage_markdown(), (
        "docs/usage.md is stale: python -m qid2_bidsapp.cli.docs > docs/usage.md"
    )


def test_sampler_help_quotes_the_shipped_models_defaults():
    """The --sampler-steps / --n-samples / --symmetries help names the shipped model's defaults."""
    import json

    config = REPO / "models" / "qid2-default" / "config.json"
    if not config.is_file():
        pytest.skip(f"{config} is absent (no shipped model in this checkout)")
    defaults = json.loads(config.read_text())["model"]["sampler_defaults"]
    actions = {a.dest: a.help for a in _build_parser()._actions}
    for dest, key in (
        ("sampler_steps", "n_steps"),
        ("n_samples", "n_samples"),
        ("symmetries", "symmetries"),
    ):
        expected = (
            f"(shipped model: {defaults['cuda'][key]} on a GPU, {defaults['cpu'][key]} on the CPU)"
        )
        assert expected in actions[dest], (dest, actions[dest])


def run_cli(capsys, *args) -> tuple[int, str]:
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def test_default_engine_without_a_model_says_it_is_unavailable(
    example_bids, tmp_path, capsys, monkeypatch
):
    empty = tmp_path / "no-model"
    empty.mkdir()
    monkeypatch.setenv("QID2_MODEL_DIR", str(empty))  # no model installed
    out = tmp_path / "out"
    status, err = run_cli(capsys, example_bids, out, "participant", "-w", tmp_path / "w")
    assert status == 1
    assert "engine 'qid2'" in err and "--engine sh" in err and "--model" in err
    assert str(empty) in err
    assert not out.exists()
    monkeypatch.delenv("QID2_MODEL_DIR")
    status, err = run_cli(
        capsys, example_bids, out, "participant", "--model", empty, "-w", tmp_path / "w"
    )
    assert status == 1 and str(empty) in err and "--engine sh" in err
    assert not out.exists()


def test_unknown_participant(example_bids, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = run_cli(
        capsys,
        example_bids,
        out,
        "participant",
        "--engine",
        "sh",
        "--participant-label",
        "sub-99",
        "--skip-bids-validation",
    )
    assert status == 1 and "sub-99" in err and not out.exists()


def test_output_inside_input_is_refused(example_bids, tmp_path, capsys):
    status, err = run_cli(
        capsys, example_bids, example_bids / "out", "participant", "--engine", "sh"
    )
    assert status == 1 and "inside the input dataset" in err
    assert not (example_bids / "out").exists()


def test_foreign_output_dataset_is_refused(example_bids, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset_description.json").write_text('{"Name": "x", "DatasetType": "raw"}')
    status, err = run_cli(capsys, example_bids, other, "participant", "--engine", "sh")
    assert status == 1 and "not a qid2 derivative" in err
    assert sorted(p.name for p in other.iterdir()) == ["dataset_description.json"]


def test_invalid_bids_input_is_reported_by_the_validator(example_bids, tmp_path, capsys):
    (example_bids / "dataset_description.json").unlink()
    (example_bids / "dataset_description.json").write_text("{}")
    (example_bids / "sub-01" / "dwi" / "sub-01_dwi.bval").unlink()
    out = tmp_path / "out"
    status, err = run_cli(capsys, example_bids, out, "participant", "--engine", "sh")
    assert status == 1 and "BIDS validation failed" in err and not out.exists()


BVAL = "sub-01/dwi/sub-01_dwi.bval"
BVEC = "sub-01/dwi/sub-01_dwi.bvec"


def _corrupt(bids: Path, kind: str) -> tuple[str, str]:
    """Damage sub-01's gradient files; return (file named in the error, words expected)."""
    bval_path, bvec_path = bids / BVAL, bids / BVEC
    bvals = np.loadtxt(bval_path)
    bvecs = np.loadtxt(bvec_path)
    if kind == "count":
        np.savetxt(bval_path, bvals[None, :-1], fmt="%d")
        return "sub-01_dwi.bval", "image has 17 volumes"
    if kind == "nan":
        bvecs[0, 3] = np.nan
        np.savetxt(bvec_path, bvecs, fmt="%.6f")
        return "sub-01_dwi.bvec", "nan"
    if kind == "inf":
        bval_text = " ".join(str(int(b)) for b in bvals).replace("1000", "inf", 1)
        bval_path.write_text(bval_text + "\n")
        return "sub-01_dwi.bval", "inf"
    if kind == "non-unit":
        bvecs[:, 3] *= 0.5
        np.savetxt(bvec_path, bvecs, fmt="%.6f")
        return "sub-01_dwi.bvec", "norm"
    if kind == "no-b0":
        bvals[bvals == 0] = 1000
        bvecs[:, bvals == 1000] = np.where(
            np.abs(bvecs[:, bvals == 1000]).sum(0) == 0, [[1], [0], [0]], bvecs[:, bvals == 1000]
        )
        np.savetxt(bval_path, bvals[None, :], fmt="%d")
        np.savetxt(bvec_path, bvecs, fmt="%.6f")
        return "sub-01_dwi.bval", "b=0"
    if kind == "vector-at-b0":
        bvecs[:, 0] = [0.0, 0.0, 1.0]
        np.savetxt(bvec_path, bvecs, fmt="%.6f")
        return "sub-01_dwi.bvec", "b=0"
    if kind == "transposed-wrong-count":
        np.savetxt(bvec_path, bvecs.T[:-1], fmt="%.6f")
        return "sub-01_dwi.bvec", "transposed"
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["count", "nan", "inf", "non-unit", "no-b0", "vector-at-b0", "transposed-wrong-count"]
)
def test_corrupt_gradients_give_one_line_error_and_write_nothing(
    kind, example_bids, tmp_path, capsys
):
    filename, words = _corrupt(example_bids, kind)
    out = tmp_path / "out"
    status, err = run_cli(
        capsys,
        example_bids,
        out,
        "participant",
        "--engine",
        "sh",
        "--skip-bids-validation",
        "-w",
        tmp_path / "work",
    )
    assert status == 1
    lines = [line for line in err.splitlines() if line.startswith("qid2: error:")]
    assert len(lines) == 1, err
    assert filename in lines[0] and words.lower() in lines[0].lower(), lines[0]
    assert not out.exists()


def test_shells_that_no_run_has(example_bids, tmp_path, capsys):
    out = tmp_path / "out"
    status, err = run_cli(
        capsys,
        example_bids,
        out,
        "participant",
        "--engine",
        "sh",
        "--shells",
        "3000",
        "--skip-bids-validation",
    )
    assert status == 1 and "3000" in err and not out.exists()


def test_group_without_participant_outputs(tmp_path, capsys):
    status, err = run_cli(capsys, tmp_path / "bids", tmp_path / "nothing", "group")
    assert status == 1 and "participant level" in err


DWI = "sub-01/dwi/sub-01_dwi.nii.gz"


def _damage_image(bids: Path, kind: str) -> tuple[str, str]:
    """Damage sub-01's image (or its gradients' geometry); return (file, words expected)."""
    import gzip

    import nibabel as nib

    path = bids / DWI
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if kind == "truncated":
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
        return "sub-01_dwi.nii.gz", "truncated"
    if kind == "nan-voxels":
        data[5, 5, 2, 3] = np.nan
        data[6, 5, 2, 7] = np.inf
    elif kind == "all-zero":
        data[:] = 0
    elif kind == "constant-volume":
        data[..., 4] = 7.0
    elif kind == "duplicate-directions":
        bvecs = np.loadtxt(bids / BVEC)
        bvals = np.loadtxt(bids / BVAL)
        bvecs[:, bvals > 0] = np.array([[0.6], [0.8], [0.0]])  # every direction the same
        np.savetxt(bids / BVEC, bvecs, fmt="%.6f")
        return "sub-01_dwi.nii.gz", "1 distinct direction"
    else:
        raise ValueError(kind)
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    words = {"nan-voxels": "2 voxel(s)", "all-zero": "all zeros", "constant-volume": "volume(s) 4"}
    return "sub-01_dwi.nii.gz", words[kind]


@pytest.mark.parametrize(
    "kind", ["truncated", "nan-voxels", "all-zero", "constant-volume", "duplicate-directions"]
)
def test_bad_image_data_gives_one_line_error_and_writes_nothing(
    kind, example_bids, tmp_path, capsys
):
    filename, words = _damage_image(example_bids, kind)
    out = tmp_path / "out"
    status, err = run_cli(
        capsys, example_bids, out, "participant", "--participant-label", "01", "--engine", "sh",
        "--skip-bids-validation", "-w", tmp_path / "work",
    )  # fmt: skip
    assert status == 1
    lines = [line for line in err.splitlines() if line.startswith("qid2: error:")]
    assert len(lines) == 1, err
    assert filename in lines[0] and words.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_a_shell_with_too_few_directions_is_kept_as_acquired(example_bids, tmp_path):
    from qid2_bidsapp.datacheck import distinct_directions, usable_shells
    from qid2_bidsapp.gradients import GradientTable

    bvals = np.r_[0.0, np.full(3, 300.0), np.full(12, 1000.0)]
    rng = np.random.default_rng(0)
    bvecs = rng.normal(size=(16, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[0] = 0
    table = GradientTable(bvals, bvecs)
    kept, reasons = usable_shells(table, sorted(table.shells))
    assert kept == [1000] and len(reasons) == 1 and "b=300" in reasons[0]
    assert distinct_directions(np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0.01]])) == 2


def _as_unprivileged(args: list[str]) -> tuple[int, str]:
    """Run qid2's ``main(args)`` in a forked child that dropped to uid/gid 65534 (needs root).

    The interpreter lives under /root here, which the unprivileged user cannot read, so the
    child does not exec: it forks with the modules the preflight needs already imported.
    """
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    from nipype import config as _nipype_config  # noqa: F401

    import qid2_bidsapp.bids  # noqa: F401 - imported before the fork (see above)
    import qid2_bidsapp.datacheck  # noqa: F401
    import qid2_bidsapp.derivatives  # noqa: F401
    import qid2_bidsapp.engines.qid2  # noqa: F401
    import qid2_bidsapp.engines.sh  # noqa: F401
    import qid2_bidsapp.hpc_plugin  # noqa: F401
    import qid2_bidsapp.reports.subject  # noqa: F401
    import qid2_bidsapp.upsampling  # noqa: F401
    import qid2_bidsapp.workflows.base  # noqa: F401

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 99
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w", closefd=False)  # pytest replaces sys.stderr
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            status = main(args)
        except BaseException:  # noqa: BLE001 - report anything to the parent's stderr
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as handle:
        err = handle.read()
    _, code = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(code), err


@pytest.fixture
def world_readable_tmp():
    """A folder that an unprivileged user can reach (pytest's tmp_path is root-only)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="qid2-unprivileged-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("where", ["output", "parent", "file", "input"])
def test_unwritable_or_unreadable_places_give_one_line_before_validation(
    example_bids_ro, world_readable_tmp, where
):
    import shutil

    base = world_readable_tmp
    bids = Path(shutil.copytree(example_bids_ro, base / "bids"))
    for path in [bids, *bids.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = base / "out"
    if where == "output":
        out.mkdir(mode=0o555)
        named = out
    elif where == "parent":
        parent = base / "ro"
        parent.mkdir(mode=0o555)
        out, named = parent / "out", parent
    elif where == "file":
        out.write_text("not a folder")
        named = out
    else:  # the input dataset cannot be read
        bids.chmod(0o700)
        named = bids
    work = base / "work"
    work.mkdir(mode=0o777)
    status, err = _as_unprivileged(
        [str(bids), str(out), "participant", "--engine", "sh", "-w", str(work)]
    )
    assert status == 1, err
    lines = [line for line in err.splitlines() if line.startswith("qid2: error:")]
    assert len(lines) == 1 and str(named) in lines[0], err
    assert "Traceback" not in err
    assert "validating" not in err  # refused before the validator ran


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_signals_stop_every_worker_with_one_line(example_bids_ro, tmp_path, signum, code):
    import os
    import time

    out, work = tmp_path / "out", tmp_path / f"work-{signum}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qid2_bidsapp.cli.run", str(example_bids_ro), str(out),
         "participant", "--engine", "sh", "--skip-bids-validation", "--nprocs", "2",
         "-w", str(work)],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    logs = out / "logs"
    while time.monotonic() < deadline:  # wait until workflow steps are running
        texts = [p.read_text() for p in logs.glob("qid2-*.log")] if logs.is_dir() else []
        if any("running" in t for t in texts) and len(_processes_mentioning(str(work))) > 1:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the run did not start its workflow in time")
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("qid2: ")]) == 1, err
    time.sleep(0.5)
    assert _processes_mentioning(str(work)) == []  # no worker left behind
    assert not [p for p in out.rglob("*.tmp")]


def _mounted_tmpfs(mount: Path, size: str):
    """Mount a tmpfs of SIZE on MOUNT (needs root and mount; skips otherwise); unmount after."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 5 MB tmpfs: a nearly full disk."""
    yield from _mounted_tmpfs(tmp_path / "small-disk", "5m")


@pytest.mark.parametrize("which", ["output", "work"])
def test_full_disk_is_refused_in_preflight(example_bids_ro, tmp_path, small_tmpfs, which, capsys):
    out = small_tmpfs / "out" if which == "output" else tmp_path / "out"
    work = tmp_path / "work" if which == "output" else small_tmpfs / "work"
    status, err = run_cli(
        capsys, example_bids_ro, out, "participant", "--engine", "sh",
        "--skip-bids-validation", "-w", work,
    )  # fmt: skip
    assert status == 1
    lines = [line for line in err.splitlines() if line.startswith("qid2: error:")]
    assert len(lines) == 1 and "not enough free space" in lines[0], err
    assert str(small_tmpfs) in lines[0]
    assert list(small_tmpfs.iterdir()) == [] and not (tmp_path / "out").exists()


@pytest.fixture
def mid_tmpfs(tmp_path):
    """A 256 MB tmpfs: room to pass preflight, filled during the run."""
    yield from _mounted_tmpfs(tmp_path / "disk", "256m")


def _fill(folder: Path) -> None:
    """Write zeros into FOLDER until its disk is full."""
    with open(folder / "filler.bin", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 2**20)
                handle.flush()
        except OSError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("which", ["output", "work"])
def test_disk_filling_up_during_a_run_ends_in_one_line(example_bids_ro, tmp_path, mid_tmpfs, which):
    """The disk passes preflight, then fills while steps run: one line, no hang, no .tmp."""
    import time

    out = mid_tmpfs / "out" if which == "output" else tmp_path / "out"
    work = tmp_path / "work" if which == "output" else mid_tmpfs / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qid2_bidsapp.cli.run", str(example_bids_ro), str(out),
         "participant", "--engine", "sh", "--skip-bids-validation", "--nprocs", "2",
         "-w", str(work)],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the first workflow step has started
        if (work / "qid2_wf").is_dir() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its workflow started"
    _fill(mid_tmpfs)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run hung after its {which} disk filled up")
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("qid2: ")]
    assert len(lines) == 1, err
    assert "no space left" in lines[0].lower() or "not enough free space" in lines[0], err
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))
    assert not list(out.rglob("*_dwi.nii.gz")), "a DWI was published from a failed run"


def test_crash_files_of_data_and_disk_problems_become_one_sentence(tmp_path):
    from qid2_bidsapp.failures import explain_failed_steps

    disk = tmp_path / "crash-1.txt"
    disk.write_text(
        "Traceback (most recent call last):\n  ...\nOSError: [Errno 28] No space left on "
        "device: '/out/sub-01/dwi/.sub-01_dwi.nii.gz.abc.tmp'\n"
    )
    data = tmp_path / "crash-2.txt"
    data.write_text("...\nqid2_bidsapp.errors.InputError: /in/sub-01_dwi.nii.gz: bad data\n")
    bug = tmp_path / "crash-3.txt"
    bug.write_text("...\nZeroDivisionError: division by zero\n")
    assert explain_failed_steps([disk]).startswith(
        "no space left on the device while writing /out/sub-01/dwi/"
    )
    assert explain_failed_steps([bug, data]) == "/in/sub-01_dwi.nii.gz: bad data"
    assert explain_failed_steps([bug]) is None
