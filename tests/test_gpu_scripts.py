"""The GPU training chunk (scripts/gpu/train-chunk.sh), run on the CPU with a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import needs_drivers

pytest.importorskip("torch")
pytest.importorskip("monai")

REPO = Path(__file__).resolve().parents[1]


@needs_drivers
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_train_chunk_script_simulates_trains_and_exports_float16(tmp_path):
    from safetensors import safe_open

    from qid2_bidsapp.model.field_config import FieldConfig

    config = json.loads((REPO / "scripts" / "gpu" / "field-wide.json").read_text())
    config.update(
        slabs=str(tmp_path / "slabs"), output=str(tmp_path / "run"),
        model=FieldConfig.tiny(noise_input=True, summary_input=True).to_dict(),
        batch_size=2, crop=32, steps=3, warmup_steps=1, n_val_slabs=1, n_val_examples=2,
        data_workers=1, num_threads=1, log_every=1,
    )  # fmt: skip
    path = tmp_path / "chunk.json"
    path.write_text(json.dumps(config))
    results = tmp_path / "out"
    script = REPO / "scripts" / "gpu" / "train-chunk.sh"
    done = subprocess.run(
        ["bash", str(script), str(path), "2", str(results), "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "slabs: 1 (+ 1 for validation) in" in done.stdout
    made = sorted(p.name for p in (tmp_path / "run" / "val_slabs").iterdir())
    assert made == ["slab-1-000000.npz"]  # made by the script, reused by the trainer
    names = {p.name for p in results.iterdir()}
    assert {"model.safetensors", "config.json", "MODEL_CARD.md", "train_log.jsonl"} <= names
    with safe_open(str(results / "model.safetensors"), "pt") as weights:
        dtypes = {str(weights.get_tensor(k).dtype) for k in weights.keys()}
    assert dtypes == {"torch.float16"}
    record = json.loads((results / "config.json").read_text())["training"]
    assert record["steps"] == 3 and record["weights_dtype"] == "float16"
    assert record["hardware"]["data_workers"] == 1
