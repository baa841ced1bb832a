"""Run the official BIDS validator (``bids-validator-deno``, works offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, Qid2Error


@dataclass
class ValidationResult:
    """Errors and warnings reported by the validator."""

    errors: list[dict]
    warnings: list[dict]

    def summary(self) -> str:
        """One line: counts and the first error."""
        text = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        if self.errors:
            first = self.errors[0]
            where = first.get("location") or ""
            text += f"; first: {first.get('code')} {where}".rstrip()
        return text


def validator_executable() -> str:
    """Locate the ``bids-validator-deno`` executable (PATH, or beside this Python).

    Returns
    -------
    str

    """
    found = shutil.which("bids-validator-deno")
    if found:
        return found
    beside = Path(sys.executable).parent / "bids-validator-deno"
    if beside.exists():
        return str(beside)
    raise Qid2Error(
        "bids-validator-deno is not installed (pip install bids-validator-deno); "
        "or pass --skip-bids-validation"
    )


def _deno_command() -> list[str] | None:
    """``[deno, run flags..., bundle]`` for the validator bundled in ``bids_validator_deno``.

    Looked up without the package's launcher, which searches only two install schemes and
    fails for other users and layouts (``FileNotFoundError: ~/.local/bin/deno``): the scripts
    folder of this Python, the folder of ``sys.executable``, the PATH, and a ``bin`` beside the
    packages (``pip install --target``). None when deno or the bundle cannot be found.
    """
    import sysconfig

    try:
        import bids_validator_deno
    except ImportError:
        return None
    bundle = Path(bids_validator_deno.__file__).with_name("bids-validator.js")
    candidates = [
        Path(sysconfig.get_path("scripts")) / "deno",
        Path(sys.executable).parent / "deno",
        Path(shutil.which("deno") or "/nonexistent/deno"),
    ]
    try:
        import deno as deno_package

        candidates.append(Path(deno_package.__file__).parents[1] / "bin" / "deno")
    except ImportError:
        pass
    found = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    if found is None or not bundle.is_file():
        return None
    flags = ["--allow-read", "--allow-env", "--allow-net", "--allow-write", "--allow-run=git"]
    return [str(found), "run", *flags, str(bundle)]


def run_validator(dataset: Path, timeout: float = 600) -> ValidationResult:
    """Validate a dataset and return its issues.

    Parameters
    ----------
    dataset : Path
        Dataset root (raw or derivative).
    timeout : float
        Seconds before giving up.

    Returns
    -------
    ValidationResult

    """
    import tempfile

    base = _deno_command() or [validator_executable()]
    cmd = [*base, "--format", "json", str(dataset)]
    with tempfile.TemporaryDirectory(prefix="qid2-deno-") as cache:
        # deno caches under $HOME unless told otherwise: HOME may be unwritable (containers run
        # with -u, HPC nodes), so give it a private folder; no update check (offline)
        env = {**os.environ, "DENO_DIR": cache, "DENO_NO_UPDATE_CHECK": "1"}
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise Qid2Error(
            f"bids-validator-deno failed on {dataset}: {message[-1] if message else 'no output'}"
        ) from None
    issues = report.get("issues", {}).get("issues", [])
    return ValidationResult(
        errors=[i for i in issues if i.get("severity") == "error"],
        warnings=[i for i in issues if i.get("severity") == "warning"],
    )


def validate_input(bids_dir: Path) -> ValidationResult:
    """Validate the input dataset; raise a one-line error when it has BIDS errors.

    Parameters
    ----------
    bids_dir : Path
        Raw BIDS dataset.

    Returns
    -------
    ValidationResult

    """
    result = run_validator(bids_dir)
    if result.errors:
        raise InputError(
            bids_dir,
            f"BIDS validation failed: {result.summary()} "
            "(run bids-validator-deno on it for details, or pass --skip-bids-validation)",
        )
    return result
