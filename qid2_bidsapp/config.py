"""The settings of one qid2 invocation, written next to the outputs for reproducibility."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__


@dataclass
class Config:
    """Everything a run needs, from the command line or a JSON file."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str = "participant"
    participant_label: list[str] | None = None
    session_id: list[str] | None = None
    bids_filters: dict | None = None
    input_type: str = "auto"
    skip_bids_validation: bool = False
    engine: str = "qid2"
    n_targets: int | None = None
    target_bvecs: Path | None = None
    shells: list[float] | None = None
    sh_order: int | None = None
    sh_lambda: float = 0.006
    n_hidden: int | None = None
    random_seed: int = 0
    model: Path | None = None
    sampler_steps: int | None = None
    sampler_t_start: int | str | None = None
    temperature: float = 1.0
    n_samples: int | None = None
    symmetries: int | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    work_dir: Path = Path("work")
    nprocs: int = field(default_factory=lambda: os.cpu_count() or 1)
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    stop_on_first_crash: bool = False
    write_graph: bool = False
    reports_only: bool = False
    verbose: int = 0
    command_line: list[str] | None = None
    version: str = __version__

    def __post_init__(self) -> None:
        for name in ("bids_dir", "output_dir", "work_dir"):
            setattr(self, name, Path(getattr(self, name)).absolute())
        if self.target_bvecs is not None:
            self.target_bvecs = Path(self.target_bvecs).absolute()
        if self.model is not None:
            self.model = Path(self.model).absolute()
        if self.omp_nthreads is None:
            self.omp_nthreads = max(1, min(8, self.nprocs))

    @property
    def engine_options(self) -> dict:
        """Keyword options for :func:`qid2_bidsapp.engines.base.get_engine`.

        For ``qid2``: the model folder (``--model``, else the default model, else None),
        the checksum its ``SHA256SUMS`` lists for the weights (so that a changed model
        invalidates cached results), the sampler settings, the seed, device and batch size.
        """
        if self.engine != "qid2":
            return {"sh_order": self.sh_order, "sh_lambda": self.sh_lambda}
        from .engines.qid2 import default_model_dir, listed_weights_sha256

        model_dir = self.model if self.model is not None else default_model_dir()
        return {
            "model_dir": None if model_dir is None else str(model_dir),
            "expected_sha256": None if model_dir is None else listed_weights_sha256(model_dir),
            "n_steps": self.sampler_steps,
            "t_start": self.sampler_t_start,
            "temperature": self.temperature,
            "n_samples": self.n_samples,
            "symmetries": self.symmetries,
            "seed": self.random_seed,
            "device": self.device,
            "precision": self.precision,
            "batch_size": self.batch_size,
        }

    def to_dict(self) -> dict:
        """JSON-serialisable settings."""
        out = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            out[item.name] = str(value) if isinstance(value, Path) else value
        return out

    def to_json(self, path: Path) -> None:
        """Write the settings as JSON (atomically)."""
        from .derivatives import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: Path) -> Config:
        """Read settings written by :meth:`to_json`."""
        data = json.loads(Path(path).read_text())
        data.pop("version", None)
        return cls(**data)
