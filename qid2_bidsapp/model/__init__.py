"""The QID² diffusion model: configuration, conditioning, network, sampler, checkpoints.

`config` and `conditioning` need only numpy; the torch/MONAI parts (`network`, `sampler`,
`checkpoint`) are imported on first use of their names, so ``import qid2_bidsapp.model`` works
without torch (``pip install qid2[model]`` adds it).
"""

from __future__ import annotations

import importlib
from typing import Any

from .conditioning import (
    TOKEN_FEATURES,
    direction_tokens,
    from_model_space,
    normalise_signal,
    select_references,
    to_model_space,
)
from .config import ModelConfig

_LAZY = {
    "Qid2Network": "network",
    "pad_to_multiple": "network",
    "crop_pad": "network",
    "Qid2Sampler": "sampler",
    "ddim_step": "sampler",
    "ddim_timesteps": "sampler",
    "make_scheduler": "sampler",
    "save_model": "checkpoint",
    "load_model": "checkpoint",
    "verify_model_folder": "checkpoint",
    "save_training_state": "checkpoint",
    "load_training_state": "checkpoint",
}

__all__ = [
    "TOKEN_FEATURES",
    "ModelConfig",
    "direction_tokens",
    "from_model_space",
    "normalise_signal",
    "select_references",
    "to_model_space",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Import the torch-based members on first use."""
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
