"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qid2_bidsapp.sim import drivers_available
from qid2_bidsapp.validation import run_validator

#: Skip a test that runs the simulator when its driver maps are absent.
needs_drivers = pytest.mark.skipif(
    not drivers_available(),
    reason="simulator drivers not present (../shared/data/phantom or $QID2_PHANTOM_DIR)",
)


def assert_valid_derivative(out: Path) -> None:
    """The output passes the BIDS validator and pybids indexes its DWI and masks."""
    from bids import BIDSLayout

    result = run_validator(out)
    assert not result.errors, result.summary()
    layout = BIDSLayout(
        str(out), validate=False, is_derivative=True, config=["bids", "derivatives"]
    )
    dwis = layout.get(suffix="dwi", desc="preproc", extension=".nii.gz", return_type="filename")
    masks = layout.get(suffix="mask", desc="brain", extension=".nii.gz", return_type="filename")
    assert dwis and len(dwis) == len(masks)
    for dwi in dwis:
        # QSIRecon finds the mask by slicing the DWI name
        assert dwi.split("_desc-preproc_dwi")[0] + "_desc-brain_mask.nii.gz" in masks


def check_run_outputs(dwi_path: Path, n_input_volumes: int) -> dict:
    """Consistency of one run's merged DWI, gradients and sidecar; returns the sidecar."""
    img = nib.load(dwi_path)
    stem = str(dwi_path)[: -len(".nii.gz")]
    bvals = np.loadtxt(stem + ".bval")
    bvecs = np.loadtxt(stem + ".bvec")
    btable = np.loadtxt(stem + ".b")
    sidecar = json.loads(Path(stem + ".json").read_text())
    n_total = img.shape[3]
    assert bvals.size == bvecs.shape[1] == btable.shape[0] == n_total
    assert sidecar["AcquiredVolumes"] == list(range(n_input_volumes))
    assert sidecar["SynthesizedVolumes"] == list(range(n_input_volumes, n_total))
    assert n_total > n_input_volumes
    synth = np.asarray(img.dataobj)[..., n_input_volumes:]
    assert np.isfinite(synth).all() and synth.min() >= 0 and synth.max() > 0
    norms = np.linalg.norm(bvecs[:, n_input_volumes:], axis=0)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    return sidecar


def read_tsv(path: Path) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def copy_tree(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def randomise_weights(network, seed: int = 0):
    """Give every parameter a seeded value that does not depend on MONAI's initialisation.

    MONAI zero-initialises the output convolution and the residual/attention output projections,
    so an untrained network predicts exactly 0; tests need a network whose output depends on
    its inputs. Matrices get N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases N(0, 0.1²).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return network


def save_tiny_random_model(folder: Path) -> Path:
    """Write a model folder holding the tiny preset with random weights (tests only)."""
    from qid2_bidsapp.model.checkpoint import save_model
    from qid2_bidsapp.model.config import ModelConfig
    from qid2_bidsapp.model.network import Qid2Network

    cfg = ModelConfig.tiny()
    save_model(
        folder,
        randomise_weights(Qid2Network(cfg)),
        cfg,
        training={"note": "random weights for tests"},
        card="# tiny random model (tests only)\n",
    )
    return folder


def save_tiny_field_model(folder: Path, *, random: bool = True, **overrides) -> Path:
    """Write a model folder holding a tiny SH-field model (random or untrained weights)."""
    from qid2_bidsapp.model.checkpoint import save_model
    from qid2_bidsapp.model.field_config import FieldConfig
    from qid2_bidsapp.model.field_network import ShFieldNetwork

    cfg = FieldConfig.tiny(**overrides)
    network = ShFieldNetwork(cfg)
    if random:
        randomise_weights(network)
    save_model(
        folder,
        network,
        cfg,
        training={"note": "weights for tests"},
        card="# tiny SH-field model (tests only)\n",
    )
    return folder


def tensor_coefficient_slab(seed: int = 0, shape=(24, 24, 4), bval: float = 1000.0):
    """A CoefficientSlab of a smooth random tensor field (no simulator drivers needed)."""
    from qid2_bidsapp.shm import sh_fit_matrix
    from qid2_bidsapp.sim.protocol import uniform_shell
    from qid2_bidsapp.sim.slabs import CoefficientSlab

    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    angle = rng.uniform(0, np.pi) + x + 0.5 * y
    axis = np.stack([np.cos(angle), np.sin(angle), 0.3 * np.cos(z)], axis=-1)
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    fa_like = 0.4 + 0.4 * np.sin(x + y) ** 2
    lam_par, lam_perp = 1.7e-3, 1.7e-3 * (1 - fa_like)
    dense = uniform_shell(90, seed=seed)
    cos2 = (axis @ dense.T) ** 2
    ratio = np.exp(-bval * (lam_perp[..., None] + (lam_par - lam_perp)[..., None] * cos2))
    coefs = (ratio @ sh_fit_matrix(dense, 6, 0.0).T).astype(np.float16)
    s0 = (1000.0 * (1.0 + 0.2 * np.cos(y))).astype(np.float32)
    mask = np.ones(shape, bool)
    mask[:2] = False
    return CoefficientSlab(
        coefs=coefs,
        s0=s0,
        mask=mask,
        bval=bval,
        s0_reference=1000.0,
        voxel_size=np.array([2.0, 2.0, 2.0]),
        name=f"tensor-slab-{seed}",
    )


def noisy_phantom_shell(shape=(20, 18, 5), bval: float = 1000.0, n_directions: int = 12):
    """One noisy phantom shell: (signal, mean b=0, brain mask, bvecs), float32 signal."""
    from qid2_bidsapp.data.example import hemisphere_directions, phantom_signal

    bvecs = hemisphere_directions(n_directions, seed=0)
    signal, brain = phantom_signal(shape, np.full(n_directions, bval), bvecs)
    b0, _ = phantom_signal(shape, np.zeros(1), np.zeros((1, 3)))
    rng = np.random.default_rng(0)
    noisy = np.abs(signal + rng.normal(0, 20, signal.shape)).astype(np.float32)
    return noisy, b0[..., 0], brain, bvecs


def noise_free_real_shell(sh_order: int, seed: int = 2, n_directions: int = 20):
    """`tensor_coefficient_slab` sampled on a shell as a noise-free RealShell: (slab, shell)."""
    from qid2_bidsapp.model.field_data import RealShell
    from qid2_bidsapp.shm import sh_basis_matrix
    from qid2_bidsapp.sim.protocol import uniform_shell

    slab = tensor_coefficient_slab(seed)
    bvecs = uniform_shell(n_directions, seed=3)
    basis, _ = sh_basis_matrix(bvecs, sh_order)
    coefs = slab.coefs.astype(np.float32)
    data = slab.s0[..., None] * np.clip(coefs @ basis.T.astype(np.float32), 0, None)
    return slab, RealShell(data, bvecs, slab.s0, 1, slab.mask, 1000.0, 0.0, "clean")
