"""Run the official BIDS validator (``bids-validator-deno``, works offline)."""

from __future__ import annotations

import json
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
    cmd = [validator_executable(), "--format", "json", str(dataset)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
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
