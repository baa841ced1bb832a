"""Model folders (weights + config + card + checksums) and resumable training states.

A model is a folder::

    <name>/
      model.safetensors   the network's weights (safetensors)
      config.json         {"format", "format_version", "model": ModelConfig, "training",
                           "normalisation"}
      MODEL_CARD.md       what it was trained on, how well it does, its limits
      SHA256SUMS          sha256 of model.safetensors and config.json (``sha256sum -c`` format)

`load_model` verifies the checksums before reading anything, then checks that the tensor names
and shapes match the network the configuration builds.
"""

from __future__ import annotations

import hashlib
import json
import os
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import InputError
from .config import ModelConfig
from .field_config import FIELD_KIND, FieldConfig
from .network import Qid2Network

#: Either kind of model configuration: per-target QID² or SH-field.
AnyConfig = ModelConfig | FieldConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "MODEL_CARD.md"
CHECKSUMS_NAME = "SHA256SUMS"
CHECKSUMMED = (WEIGHTS_NAME, CONFIG_NAME)
MODEL_FORMAT = "qid2-model"
MODEL_FORMAT_VERSION = 1
TRAINING_STATE_FORMAT = "qid2-training-state/1"


def build_network(config: AnyConfig) -> nn.Module:
    """Build the (untrained) network a configuration describes.

    Parameters
    ----------
    config : ModelConfig or FieldConfig
        Per-target QID² (`Qid2Network`) or SH-field (`ShFieldNetwork`).

    Returns
    -------
    nn.Module

    """
    if isinstance(config, FieldConfig):
        from .field_network import ShFieldNetwork

        return ShFieldNetwork(config)
    return Qid2Network(config)


def normalisation_info(config: AnyConfig) -> dict[str, Any]:
    """Describe the signal normalisation a model expects (stored in config.json).

    Parameters
    ----------
    config : ModelConfig or FieldConfig
        The model's configuration.

    Returns
    -------
    dict

    """
    if isinstance(config, FieldConfig):
        return {
            "signal": "S/S0 (b=0 mean), 0 where S0 <= 1e-3 x median brain S0",
            "clip": [0.0, config.signal_clip],
            "model_space": "SH coefficients (descoteaux07) of S/S0, order l scaled by "
            f"order_scales[l // 2] = {list(config.order_scales)}",
        }
    return {
        "signal": "S/S0 (b=0 mean), 0 where S0 <= eps",
        "clip": [0.0, config.signal_clip],
        "model_space": "y = 2 * x / clip - 1",
    }


def sha256_file(path: str | PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file.

    Parameters
    ----------
    path : str or PathLike
        The file.
    chunk : int
        Read size in bytes.

    Returns
    -------
    str

    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: str | PathLike) -> Path:
    """Write ``SHA256SUMS`` for the weights and config of a model folder.

    Parameters
    ----------
    folder : str or PathLike
        The model folder.

    Returns
    -------
    Path
        The checksum file (``sha256sum -c SHA256SUMS`` verifies it).

    """
    folder = Path(folder)
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in CHECKSUMMED]
    path = folder / CHECKSUMS_NAME
    path.write_text("".join(lines))
    return path


def _read_checksums(folder: Path) -> dict[str, str]:
    path = folder / CHECKSUMS_NAME
    if not path.is_file():
        raise InputError(path, "is missing: the model folder has no checksums to verify")
    sums: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        digest, sep, name = line.partition(" ")
        name = name.lstrip(" *")
        if not sep or len(digest) != 64 or not name:
            raise InputError(path, f"has a malformed line: {line!r}")
        sums[name] = digest.lower()
    return sums


def verify_model_folder(folder: str | PathLike) -> dict[str, str]:
    """Check that a model folder is complete and its files match ``SHA256SUMS``.

    Parameters
    ----------
    folder : str or PathLike
        The model folder.

    Returns
    -------
    dict
        File name -> sha256 of the verified files.

    Raises
    ------
    InputError
        For a missing folder or file, a file not listed in ``SHA256SUMS``, or a checksum
        mismatch (a corrupted or truncated file).

    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "is not a model folder (no such directory)")
    for name in (*CHECKSUMMED, CARD_NAME):
        if not (folder / name).is_file():
            raise InputError(folder / name, "is missing from the model folder")
    sums = _read_checksums(folder)
    verified = {}
    for name in CHECKSUMMED:
        if name not in sums:
            raise InputError(folder / CHECKSUMS_NAME, f"does not list {name}")
        actual = sha256_file(folder / name)
        if actual != sums[name]:
            raise InputError(
                folder / name,
                f"checksum mismatch: corrupted or truncated file (sha256 {actual[:12]}..., "
                f"expected {sums[name][:12]}... from {CHECKSUMS_NAME})",
            )
        verified[name] = actual
    return verified


def save_model(
    folder: str | PathLike,
    network: nn.Module,
    config: AnyConfig,
    *,
    training: dict,
    card: str,
    overwrite: bool = False,
    weights_dtype: str = "float32",
) -> Path:
    """Write a model folder: weights, config, model card and checksums.

    Parameters
    ----------
    folder : str or PathLike
        Destination folder (created).
    network : Qid2Network or ShFieldNetwork
        The trained network (its weights are copied to CPU float tensors).
    config : ModelConfig or FieldConfig
        The network's configuration.
    training : dict
        JSON-serialisable training protocol (data, steps, optimiser, seed, metrics, ...).
    card : str
        Markdown text of ``MODEL_CARD.md``.
    overwrite : bool
        Replace an existing model in `folder`; otherwise refuse.
    weights_dtype : {"float32", "float16"}
        How the weights are stored. float16 halves the file (a wider network then fits the
        16 MiB a shipped file may have); `load_model` casts them back to float32.

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    FileExistsError
        When `folder` already holds a model and `overwrite` is False.
    ValueError
        For another `weights_dtype`.

    """
    stored = {"float32": torch.float32, "float16": torch.float16}
    if weights_dtype not in stored:
        raise ValueError(f"weights_dtype must be float32 or float16, got {weights_dtype!r}")
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a model (pass overwrite=True)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CHECKSUMS_NAME).unlink(missing_ok=True)  # invalid until rewritten below
    tensors = {
        k: v.detach()
        .to("cpu")
        .to(stored[weights_dtype] if v.is_floating_point() else v.dtype)
        .contiguous()
        for k, v in network.state_dict().items()
    }
    save_file(
        tensors,
        str(folder / WEIGHTS_NAME),
        metadata={"format": "pt", "qid2_format": MODEL_FORMAT, "config_version": config.version},
    )
    document = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model": config.to_dict(),
        "training": training,
        "normalisation": normalisation_info(config),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    (folder / CARD_NAME).write_text(card if card.endswith("\n") else card + "\n")
    write_checksums(folder)
    return folder


def load_model(
    folder: str | PathLike, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, AnyConfig, dict[str, Any]]:
    """Verify and load a model folder (either kind).

    Parameters
    ----------
    folder : str or PathLike
        A folder written by `save_model`.
    device : str or torch.device
        Where to put the network.

    Returns
    -------
    network : Qid2Network or ShFieldNetwork
        In eval mode, on `device`.
    config : ModelConfig or FieldConfig
    info : dict
        ``model_id`` (folder name + first 12 hex digits of the weights' sha256), ``sha256``
        (weights), ``config_sha256``, ``folder``, ``training``, ``normalisation``.

    Raises
    ------
    InputError
        For a missing file, a checksum mismatch, an unreadable config, or weights whose tensor
        names or shapes do not match the network the config describes.

    """
    folder = Path(folder)
    sums = verify_model_folder(folder)
    config, document = _read_config(folder / CONFIG_NAME)
    weights_path = folder / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise InputError(weights_path, f"cannot be read as safetensors: {err}") from err
    network = build_network(config)
    _check_tensors(weights_path, network, tensors)
    network.load_state_dict(tensors, strict=True)
    network.to(device).eval()
    sha = sums[WEIGHTS_NAME]
    info = {
        "model_id": f"{folder.resolve().name}-{sha[:12]}",
        "sha256": sha,
        "config_sha256": sums[CONFIG_NAME],
        "folder": str(folder.resolve()),
        "training": document.get("training", {}),
        "normalisation": document.get("normalisation", {}),
    }
    return network, config, info


def read_model_config(folder: str | PathLike) -> AnyConfig:
    """Read a model folder's configuration (without loading or verifying the weights).

    Parameters
    ----------
    folder : str or PathLike
        A folder written by `save_model`.

    Returns
    -------
    ModelConfig or FieldConfig

    Raises
    ------
    InputError
        For a missing or invalid ``config.json``.

    """
    return _read_config(Path(folder) / CONFIG_NAME)[0]


def _read_config(config_path: Path) -> tuple[AnyConfig, dict[str, Any]]:
    """Parse a model's ``config.json``: (the model configuration, the whole document)."""
    try:
        document = json.loads(config_path.read_text())
        if document.get("format") != MODEL_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, expected {MODEL_FORMAT!r}")
        if document.get("format_version") != MODEL_FORMAT_VERSION:
            raise ValueError(
                f"format_version {document.get('format_version')!r} is not supported "
                f"(this version reads {MODEL_FORMAT_VERSION})"
            )
        model = document["model"]
        if isinstance(model, dict) and model.get("kind") == FIELD_KIND:
            return FieldConfig.from_dict(model), document
        return ModelConfig.from_dict(model), document
    except OSError as err:
        raise InputError(config_path, f"cannot be read ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(config_path, f"is not a valid qid2 model config: {err}") from err


def _check_tensors(path: Path, network: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s) (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} tensor(s) of the wrong shape (e.g. {k}: {found[k]}, "
            f"config needs {expected[k]})"
        )
    raise InputError(path, "does not match config.json: " + "; ".join(parts))


# --------------------------------------------------------------------------- training state


def save_training_state(
    path: str | PathLike,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any | None,
    step: int,
    extra: dict | None = None,
) -> Path:
    """Save everything needed to resume training (atomically: temp file, then rename).

    Parameters
    ----------
    path : str or PathLike
        Destination file (``torch.save`` format).
    network : nn.Module
        The network.
    optimizer : torch.optim.Optimizer
        Its optimiser.
    scaler : torch.amp.GradScaler or None
        The AMP gradient scaler, if any.
    step : int
        Number of optimisation steps done.
    extra : dict, optional
        Plain data (numbers, strings, lists, dicts, tensors) such as the config dict, the
        data-sampler position or the best validation loss; loadable with ``weights_only``.

    Returns
    -------
    Path

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": TRAINING_STATE_FORMAT,
        "step": int(step),
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_training_state(
    path: str | PathLike,
    network: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
    *,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = True,
) -> tuple[int, dict]:
    """Restore a state written by `save_training_state` into the given objects.

    Parameters
    ----------
    path : str or PathLike
        The state file.
    network : nn.Module
        Receives the weights (strict).
    optimizer : torch.optim.Optimizer, optional
        Receives the optimiser state.
    scaler : torch.amp.GradScaler, optional
        Receives the scaler state (when one was saved).
    map_location : str or torch.device
        Passed to ``torch.load``.
    restore_rng : bool
        Also restore torch's CPU random-number state.

    Returns
    -------
    step : int
    extra : dict

    Raises
    ------
    InputError
        For a missing or unreadable file.

    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "is missing: no training state to resume from")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise InputError(path, f"cannot be read as a training state: {err}") from err
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise InputError(path, f"is not a {TRAINING_STATE_FORMAT} file")
    network.load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("torch_rng") is not None:
        torch.set_rng_state(state["torch_rng"].cpu())
    return int(state["step"]), dict(state.get("extra") or {})
