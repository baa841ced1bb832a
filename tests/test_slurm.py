"""HPC: qid2-slurm cohorts on a real single-node SLURM, and the Nipype plugin options."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qid2_bidsapp.cli.run import main as qid2_main
from qid2_bidsapp.cli.slurm import main as slurm_main
from qid2_bidsapp.data.example import make_example_dataset
from qid2_bidsapp.errors import InputError, Qid2Error
from qid2_bidsapp.hpc_cohort import cohort_participants, mem_to_gb
from qid2_bidsapp.hpc_plugin import PluginSettings, plugin_run_args, resolve_plugin

from .helpers import assert_valid_derivative, check_run_outputs, read_tsv

REPO = Path(__file__).resolve().parents[1]
START_SLURM = REPO.parent / "shared" / "tools" / "slurm" / "start-local-slurm"
# input volumes of each participant's run in the 3-participant example
COHORT_RUNS = {
    "01": ("sub-01/dwi/sub-01_space-orig_desc-preproc_dwi.nii.gz", 17),
    "02": ("sub-02/ses-1/dwi/sub-02_ses-1_dir-AP_space-orig_desc-preproc_dwi.nii.gz", 26),
    "03": ("sub-03/dwi/sub-03_space-orig_desc-preproc_dwi.nii.gz", 17),
}
JOB_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def cohort_bids(tmp_path_factory) -> Path:
    return make_example_dataset(tmp_path_factory.mktemp("cohort") / "bids", n_subjects=3)


# --------------------------------------------------------------------------- generated scripts


def dry_run(capsys, *args) -> tuple[int, str, str]:
    status = slurm_main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_dry_run_prints_array_and_group_scripts_and_writes_nothing(cohort_bids, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    status, text, _ = dry_run(
        capsys,
        cohort_bids,
        out,
        "-w",
        work,
        "--dry-run",
        "--partition",
        "gpu",
        "--account",
        "lab1",
        "--time",
        "02:00:00",
        "--mem",
        "16G",
        "--cpus-per-task",
        "4",
        "--max-parallel",
        "2",
        "--sbatch-arg=--qos=long",
        "--",
        "--engine",
        "sh",
        "--n-targets",
        "20",
    )
    assert status == 0
    assert not out.exists() and not work.exists()
    participant, group = text.split("#!/bin/bash")[1:3]
    for line in (
        "#SBATCH --array=0-2%2",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=16G",
        "#SBATCH --time=02:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab1",
        "#SBATCH --qos=long",
        "LABELS=(01 02 03)",
    ):
        assert line in participant.splitlines(), line
    assert "--gres" not in participant  # the SH engine needs no GPU
    logs = out / "logs" / "slurm"
    assert re.search(rf"#SBATCH --output={logs}/qid2-\S+_participant_%A_%a.log", participant)
    command = next(line for line in participant.splitlines() if " participant " in line)
    assert command.startswith(str(Path(sys.executable).parent / "qid2"))
    assert f'--participant-label "$LABEL" -w {work}/sub-"$LABEL"' in command
    # validated once at submission, so the tasks skip it; threads and memory from the request
    assert "--engine sh --n-targets 20 --skip-bids-validation --nprocs 4 --mem-gb 16" in command
    assert f"export PATH={Path(sys.executable).parent}:" in participant
    assert f"{out} group || exit" in group
    assert "for LABEL in 01 02 03; do" in group and "#SBATCH --qos=long" in group
    assert "--dependency=afterany:<array job id>" in text


def test_dry_run_defaults_for_the_diffusion_engine_and_containers(cohort_bids, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    status, text, _ = dry_run(
        capsys,
        cohort_bids,
        tmp_path / "out",
        "--dry-run",
        "--participant-label",
        "sub-03",
        "01",
        "--container",
        "/images/qid2.sif",
        "--dependency",
        "afterok",
        "--",
        "--model",
        model,
        "--skip-bids-validation",
    )
    assert status == 0
    participant = text.split("#!/bin/bash")[1]
    assert "#SBATCH --gres=gpu:1" in participant  # qid2 engine: one GPU by default
    assert "#SBATCH --array=0-1\n" in participant and "LABELS=(03 01)" in participant
    command = next(line for line in participant.splitlines() if " participant " in line)
    assert command.startswith("apptainer run --cleanenv --nv -B ")
    for folder in (cohort_bids, tmp_path / "out", model):  # files in the qid2 options too
        assert f"-B {folder}:{folder}" in command
    assert f"/images/qid2.sif {cohort_bids} {tmp_path / 'out'} participant" in command
    assert "export PATH" not in participant
    assert "--dependency=afterok:" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--participant-label", "sub-09"], "sub-09"),
        (["--", "-w", "/tmp/elsewhere"], "set per task"),
        (["--", "--participant-label", "01"], "set per task"),
    ],
)
def test_cohort_input_errors_are_one_line(cohort_bids, tmp_path, capsys, extra, message):
    status, _, err = dry_run(capsys, cohort_bids, tmp_path / "out", "--dry-run", *extra)
    assert status == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_qid2_option_is_a_usage_error(cohort_bids, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        slurm_main([str(cohort_bids), str(tmp_path / "out"), "--dry-run", "--", "--turbo", "sh"])
    assert exc.value.code == 2


def test_participants_from_table_or_folders(cohort_bids, tmp_path):
    assert cohort_participants(cohort_bids) == (["01", "02", "03"], [])
    table = tmp_path / "participants.tsv"
    (tmp_path / "sub-b").mkdir()
    (tmp_path / "sub-a").mkdir()
    assert cohort_participants(tmp_path) == (["a", "b"], [])  # no table (QSIPrep): folders
    table.write_text("participant_id\tage\nsub-b\t30\nsub-c\t40\nsub-a\t50\n")
    assert cohort_participants(tmp_path) == (["b", "a"], ["c"])
    table.write_text("subject\nsub-a\n")
    with pytest.raises(InputError, match="participant_id"):
        cohort_participants(tmp_path)


def test_mem_to_gb():
    assert mem_to_gb("32G") == 32 and mem_to_gb("16000") == pytest.approx(15.625)
    assert mem_to_gb("512M") == 0.5 and mem_to_gb("1T") == 1024 and mem_to_gb("lots") is None


# --------------------------------------------------------------------------- plugin options


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("plugin: [MultiProc\n", "is not valid YAML"),
        ("- MultiProc\n", "must be a YAML mapping"),
        ("plugin: Condor\n", "unknown Nipype plugin 'Condor'"),
        ("plugin: MultiProc\nplugin_args: {n_prcs: 2}\n", "'n_prcs' is not an option"),
        ("plugin: MultiProc\nplugin_args: {n_procs: 0}\n", "n_procs must be a positive"),
        ("plugin: Linear\nplugin_arg: {}\n", "unknown key(s) ['plugin_arg']"),
        ("plugin_args: [1, 2]\n", "'plugin_args' must be a mapping"),
    ],
)
def test_bad_plugin_file_is_refused_before_writing(example_bids, tmp_path, capsys, text, message):
    plugin_file = tmp_path / "plugin.yml"
    plugin_file.write_text(text)
    out = tmp_path / "out"
    status = qid2_main(
        [str(example_bids), str(out), "participant", "--engine", "sh"]
        + ["--plugin-file", str(plugin_file), "-w", str(tmp_path / "w")]
    )
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith(f"qid2: error: {plugin_file}: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_plugin_resolution(tmp_path, monkeypatch):
    plugin_file = tmp_path / "plugin.yml"
    plugin_file.write_text("plugin: SLURM\nplugin_args: {sbatch_args: '--qos=x', max_jobs: 4}\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(Qid2Error, match="sbatch"):
        resolve_plugin(None, plugin_file)
    plugin_file.write_text("plugin: SLURM\nplugin_args: {n_procs: 2}\n")
    settings = resolve_plugin("MultiProc", plugin_file)  # the command line wins over the file
    assert settings.name == "MultiProc" and settings.args == {"n_procs": 2}
    args = plugin_run_args(settings, nprocs=8, mem_gb=4.0, n_gpu_procs=1)
    assert args == {"n_procs": 2, "raise_insufficient": False, "n_gpu_procs": 1, "memory_gb": 4.0}
    assert plugin_run_args(PluginSettings("Linear"), nprocs=8) == {}
    assert resolve_plugin().name == "MultiProc"


def test_linear_plugin_from_a_plugin_file(example_bids, tmp_path):
    plugin_file = tmp_path / "plugin.yml"
    plugin_file.write_text("plugin: Linear\n")
    out = tmp_path / "out"
    args = [str(example_bids), str(out), "participant", "--engine", "sh"]
    args += ["--participant-label", "01", "--skip-bids-validation"]
    assert qid2_main([*args, "--plugin-file", str(plugin_file), "-w", str(tmp_path / "w")]) == 0
    check_run_outputs(out / COHORT_RUNS["01"][0], COHORT_RUNS["01"][1])
    log = next((out / "logs").glob("qid2-*.log")).read_text()
    assert f"Nipype plugin Linear (from {plugin_file})" in log


# --------------------------------------------------------------------------- a real SLURM


def _stop_slurm(root: Path, env: dict) -> None:
    ids = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
    jobs = ids.stdout.split()
    if jobs:
        subprocess.run(["scancel", *jobs], env=env, capture_output=True)
    for name in ("d.pid", "ctld.pid"):
        pid_file = root / name
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ValueError, ProcessLookupError, PermissionError):
                pass


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out as free now (bound together, so all distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _private_slurm_scripts(folder: Path) -> Path:
    """Copy ../shared/tools/slurm with this cluster's own controller and node ports.

    The shared template fixes ports 16817/16818, so two test sessions on one host (or a SLURM
    already running there) would talk to each other's daemons; the state, spool and log
    folders are per cluster already (under the folder given to the script).
    """
    folder.mkdir(parents=True, exist_ok=True)
    ctld, slurmd = _free_ports(2)
    template = (START_SLURM.parent / "slurm.conf.template").read_text()
    template = re.sub(r"(?m)^SlurmctldPort=\d+", f"SlurmctldPort={ctld}", template)
    template = re.sub(r"(?m)^SlurmdPort=\d+", f"SlurmdPort={slurmd}", template)
    (folder / "slurm.conf.template").write_text(template)
    start = folder / START_SLURM.name
    start.write_text(START_SLURM.read_text())
    return start


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """A single-node SLURM on loopback (../shared/tools/slurm); stopped after the module."""
    if not START_SLURM.is_file():
        pytest.skip(f"{START_SLURM} not present (needs ../shared/tools)")
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    start = _private_slurm_scripts(root / "tools")
    try:
        proc = subprocess.run(
            ["bash", str(start), str(root)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        proc = None
    if proc is None or proc.returncode != 0:
        _stop_slurm(root, env)
        why = (proc.stderr.strip().splitlines() or ["?"])[-1] if proc else "timed out"
        pytest.skip(f"could not install or start a local SLURM with {START_SLURM}: {why}")
    yield env
    _stop_slurm(root, env)


def _job_states(env: dict, job_id: str) -> list[str]:
    proc = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True
    )
    return re.findall(r"JobState=(\w+)", proc.stdout)


def wait_for_jobs(env: dict, job_ids: list[str], timeout: float = JOB_TIMEOUT_S) -> dict:
    """Poll squeue until the jobs have left the queue; return their final states."""
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(
            ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs still queued after {timeout} s:\n{proc.stdout}")
        time.sleep(2)
    return {job_id: _job_states(env, job_id) for job_id in job_ids}


def qid2_slurm(env: dict, *args) -> subprocess.CompletedProcess:
    """Run the installed qid2-slurm (the console script beside this Python when present)."""
    script = Path(sys.executable).parent / "qid2-slurm"
    command = [str(script)]
    if not script.is_file():
        command = [sys.executable, "-m", "qid2_bidsapp.cli.slurm"]
    return subprocess.run(
        [*command, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


SMALL_JOBS = ["--cpus-per-task", "1", "--mem", "1G", "--group-mem", "1G", "--time", "00:20:00"]


@pytest.mark.slow
def test_three_participant_cohort_on_slurm(local_slurm, cohort_bids, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = qid2_slurm(
        local_slurm, cohort_bids, out, "-w", work, *SMALL_JOBS,
        "--", "--engine", "sh", "--omp-nthreads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    array_id = re.search(r"participant array job (\d+)", proc.stdout).group(1)
    group_id = re.search(r"group job (\d+) \(starts afterany:", proc.stdout).group(1)
    states = wait_for_jobs(local_slurm, [array_id, group_id])
    logs = out / "logs" / "slurm"
    job_logs = "\n".join(p.read_text() for p in sorted(logs.glob("*.log")))
    assert states[array_id] == ["COMPLETED"] * 3, job_logs
    assert states[group_id] == ["COMPLETED"], job_logs
    # every participant's outputs, from three concurrent writers into one folder
    for label, (rel, n_in) in COHORT_RUNS.items():
        check_run_outputs(out / rel, n_in)
        assert (out / f"sub-{label}.html").is_file()
        assert (work / f"sub-{label}").is_dir()
    assert len(list(logs.glob("qid2-*_participant_*_*.log"))) == 3
    assert len(list(logs.glob("qid2-*_sub-*.done"))) == 3
    assert "all 3 participant(s) finished" in next(logs.glob("qid2-*_group_*.log")).read_text()
    assert len(list((out / "logs").glob("config-*.json"))) == 3
    rows = read_tsv(out / "group_qc.tsv")
    assert sorted(r["subject"] for r in rows) == ["01", "02", "02", "03"]
    assert (out / "group.html").is_file()
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Name"] == "qid2"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert_valid_derivative(out)


@pytest.mark.slow
def test_failed_participant_still_gets_a_group_report_and_a_failed_group_job(
    local_slurm, cohort_bids, tmp_path
):
    import shutil

    bids = Path(shutil.copytree(cohort_bids, tmp_path / "bids"))
    (bids / "sub-03" / "dwi" / "sub-03_dwi.bval").write_text("0 1000 1000\n")  # wrong length
    out = tmp_path / "out"
    proc = qid2_slurm(
        local_slurm, bids, out, "-w", tmp_path / "work", "--participant-label", "01", "03",
        *SMALL_JOBS, "--", "--engine", "sh", "--omp-nthreads", "1", "--skip-bids-validation",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    array_id = re.search(r"participant array job (\d+)", proc.stdout).group(1)
    group_id = re.search(r"group job (\d+)", proc.stdout).group(1)
    states = wait_for_jobs(local_slurm, [array_id, group_id])
    assert sorted(states[array_id]) == ["COMPLETED", "FAILED"]
    assert states[group_id] == ["FAILED"]  # afterany: it ran, and says who is missing
    group_log = next((out / "logs" / "slurm").glob("qid2-*_group_*.log")).read_text()
    assert "did not finish: sub-03" in group_log
    assert [r["subject"] for r in read_tsv(out / "group_qc.tsv")] == ["01"]
    assert not (out / "sub-03").exists()


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_nipype_slurm_plugins_run_each_step_as_a_job(local_slurm, example_bids, tmp_path, plugin):
    out = tmp_path / "out"
    env = {**local_slurm, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "qid2_bidsapp.cli.run", str(example_bids), str(out)]
        + ["participant", "--engine", "sh", "--participant-label", "01"]
        + ["--skip-bids-validation", "--nipype-plugin", plugin, "--omp-nthreads", "2"]
        + ["-w", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = tmp_path / "work" / "qid2_wf" / "batch"
    if plugin == "SLURMGraph":  # submitted the graph and returned: wait for the jobs
        assert "submitted the workflow as SLURM jobs" in proc.stdout
        ids = subprocess.run(
            ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True
        ).stdout.split()
        states = wait_for_jobs(env, ids) if ids else {}
        assert all(s == ["COMPLETED"] for s in states.values()), states
    check_run_outputs(out / COHORT_RUNS["01"][0], COHORT_RUNS["01"][1])
    assert (out / "sub-01.html").is_file()
    scripts = list(batch.glob("batchscript_*.sh"))
    assert len(scripts) >= 5  # one sbatch job per step, not run locally
    # each step asks SLURM for the threads it uses (--omp-nthreads 2: the up-sampling step)
    jobs = subprocess.run(
        ["scontrol", "show", "job"], env=env, capture_output=True, text=True
    ).stdout.split("\n\n")
    upsample = [job for job in jobs if re.search(r"JobName=\S*upsample", job)]
    assert upsample and all("CPUs/Task=2" in job for job in upsample)
