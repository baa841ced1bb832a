"""The realistic DWI simulator (qid2_bidsapp.sim): signal model, geometry, noise, sources."""

from __future__ import annotations

import os

import numpy as np
import pytest
from dipy.core.geometry import cart2sphere
from dipy.core.gradients import gradient_table
from dipy.sims.voxel import multi_tensor
from scipy import integrate

from qid2_bidsapp.errors import InputError, Qid2Error
from qid2_bidsapp.sim import (
    SimulatedSource,
    TissueParams,
    acquisition,
    evaluation_brain,
    plan_brain,
    render_brain,
    simulate_brain,
    tissue_signal,
    uniform_shell,
    uniform_subset,
    watson_tau,
)
from qid2_bidsapp.sim.anatomy import load_anatomy, templateflow_priors_available, tissue_priors
from qid2_bidsapp.sim.geometry import Placement, PlaneWaves, euler_rotation
from qid2_bidsapp.sim.signal import compartment_list

from .helpers import needs_drivers


def _dipy_signal(bvals, bvecs, evals, axes, fractions) -> np.ndarray:
    """DIPY's multi_tensor for compartments given as (eigenvalues, axis, signal fraction)."""
    angles = [tuple(np.degrees(cart2sphere(*a)[1:])) for a in axes]
    total = fractions.sum()
    gtab = gradient_table(bvals, bvecs=bvecs)
    signal, _ = multi_tensor(
        gtab, evals, S0=total, angles=angles, fractions=100 * fractions / total, snr=None
    )
    return signal


def _random_unit(rng, n):
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# --------------------------------------------------------------------------- signal model


def test_tissue_signal_equals_dipy_multi_tensor():
    rng = np.random.default_rng(0)
    bvals, bvecs = acquisition({1000: 30, 2500: 40}, n_b0=2, seed=1)
    params = TissueParams.sample(rng)
    n = 5
    dirs = _random_unit(rng, 3 * n).reshape(n, 3, 3)
    weights = rng.dirichlet(np.ones(3), n)
    fractions = rng.dirichlet(np.ones(3), n)
    f_intra = rng.uniform(0.3, 0.8, n)
    tau = watson_tau(rng.uniform(0.02, 0.4, n))
    ours = tissue_signal(bvals, bvecs, dirs, weights, f_intra, fractions, tau, params)
    assert ours.shape == (n, len(bvals))
    for v in range(n):
        evals, axes, sf = compartment_list(
            dirs[v], weights[v], f_intra[v], fractions[v], tau[v], params
        )
        ref = _dipy_signal(bvals, bvecs, evals, axes, sf)
        np.testing.assert_allclose(ours[v], ref, rtol=2e-5, atol=1e-6)
    # b = 0: f_wm + s_gm f_gm + s_csf f_csf
    expected_b0 = fractions @ [1.0, params.s0_gm, params.s0_csf]
    np.testing.assert_allclose(ours[:, 0], expected_b0, rtol=1e-5)


def test_watson_tau_matches_numerical_integral():
    for odi in (0.02, 0.1, 0.3, 0.7):
        kappa = 1.0 / np.tan(np.pi / 2 * odi)

        def density(t, k=kappa):
            return np.exp(k * (t * t - 1.0))  # Watson in t = cos(theta), scaled

        num = integrate.quad(lambda t, d=density: t * t * d(t), 0, 1)[0]
        den = integrate.quad(density, 0, 1)[0]
        assert watson_tau(odi) == pytest.approx(num / den, rel=1e-6)
    assert watson_tau(1e-5) == pytest.approx(1.0, abs=1e-4)
    assert watson_tau(1.0) == pytest.approx(1.0 / 3.0, abs=1e-6)


def test_warp_pushes_fibres_along_the_source_direction():
    """J_S u_out is parallel to u: a step along u_out maps to a step along u in the driver."""
    rng = np.random.default_rng(3)
    warp = PlaneWaves.random(rng, 4, (80.0, 160.0), 3.0, channels=3)
    placement = Placement(euler_rotation((10, -20, 30)), np.array([90.0, 100.0, 90.0]), warp)
    q = rng.uniform(40, 140, (50, 3))
    u = _random_unit(rng, 50)[:, None, :]
    u_out = placement.push_directions(q, u)[:, 0]
    np.testing.assert_allclose(np.linalg.norm(u_out, axis=1), 1.0, atol=1e-6)
    eps = 1e-4
    step = (placement.source_points(q + eps * u_out) - placement.source_points(q)) / eps
    step /= np.linalg.norm(step, axis=1, keepdims=True)
    assert np.abs(np.sum(step * u[:, 0], axis=1)).min() > 1 - 1e-6
    # a rigid placement rotates directions by R
    rigid = Placement(placement.rotation, placement.centre)
    np.testing.assert_allclose(rigid.push_directions(q, u)[:, 0], u[:, 0] @ rigid.rotation.T)


# --------------------------------------------------------------------------- protocols


def test_uniform_shell_and_subset_are_well_spread():
    shell = uniform_shell(90, seed=4)
    assert shell.shape == (90, 3)
    np.testing.assert_allclose(np.linalg.norm(shell, axis=1), 1.0)
    np.testing.assert_array_equal(shell, uniform_shell(90, seed=4))
    assert not np.allclose(shell, uniform_shell(90, seed=5))

    def min_angle(v):
        cos = np.abs(v @ v.T)
        np.fill_diagonal(cos, 0.0)
        return np.degrees(np.arccos(cos.max()))

    subset = uniform_subset(shell, 30)
    assert len(np.unique(subset)) == 30
    rng = np.random.default_rng(0)
    random = [min_angle(shell[rng.choice(90, 30, replace=False)]) for _ in range(200)]
    assert min_angle(shell[subset]) > max(random)
    assert min_angle(shell) > 12.0  # 90 repelled directions: about 15-17 degrees apart

    bvals, bvecs = acquisition({1000: 20, 2000: 30}, n_b0=3, seed=2)
    assert bvals.tolist() == [0.0] * 3 + [1000.0] * 20 + [2000.0] * 30
    assert np.all(bvecs[:3] == 0)


# --------------------------------------------------------------------------- whole brains


@pytest.fixture(scope="module")
def protocol():
    return acquisition({1000: 30}, n_b0=2, seed=0)


@needs_drivers
@pytest.mark.realdata
def test_simulator_is_deterministic_for_a_seed(protocol):
    bvals, bvecs = protocol
    kwargs = {
        "voxel_size": 2.5,
        "rotation_deg": 12.0,
        "deformation": 1.5,
        "bias_field": 0.1,
        "snr": 20.0,
    }
    plan = plan_brain(11, **{k: v for k, v in kwargs.items() if k != "snr"})
    z = plan.shape[2] // 2
    a = simulate_brain(bvals, bvecs, seed=11, slab=(z - 3, z + 3), **kwargs)
    b = simulate_brain(bvals, bvecs, seed=11, slab=(z - 3, z + 3), **kwargs)
    c = simulate_brain(bvals, bvecs, seed=12, slab=(z - 3, z + 3), **kwargs)
    assert a.mask.sum() > 500
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.clean, b.clean)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.plan.params == b.plan.params
    assert a.plan.params != c.plan.params
    assert a.data.shape[:2] != c.data.shape[:2] or not np.allclose(a.clean, c.clean)
    # a slab is exactly that part of the whole brain (the truth does not depend on the slab)
    whole = render_brain(plan, bvals, bvecs, snr=None)
    np.testing.assert_allclose(a.clean, whole.clean[:, :, z - 3 : z + 3], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(a.mask, whole.mask[:, :, z - 3 : z + 3])
    np.testing.assert_allclose(
        a.affine[:3, 3], whole.affine[:3, :3] @ [0, 0, z - 3] + whole.affine[:3, 3]
    )


@needs_drivers
@pytest.mark.realdata
def test_brain_voxel_equals_dipy_multi_tensor(protocol):
    """The pipeline's noise-free voxels are DIPY multi-tensor voxels of the stored truth maps."""
    bvals, bvecs = protocol
    brain = simulate_brain(
        bvals, bvecs, seed=5, rotation_deg=(10, 20, 30), snr=None, supersample=1, slab=(30, 33)
    )
    params = brain.plan.params
    rng = np.random.default_rng(0)
    candidates = np.argwhere(brain.mask & (brain.fractions[..., 0] > 0.3))
    assert len(candidates) > 50
    for v in candidates[rng.choice(len(candidates), 10, replace=False)]:
        v = tuple(v)
        evals, axes, sf = compartment_list(
            brain.fibre_dirs[v],
            brain.fibre_weights[v],
            brain.f_intra[v],
            brain.fractions[v],
            watson_tau(brain.odi[v]),
            params,
        )
        ref = 1000.0 * _dipy_signal(bvals, bvecs, evals, axes, sf)
        np.testing.assert_allclose(brain.clean[v], ref, rtol=1e-4, atol=1e-2)


@needs_drivers
@pytest.mark.realdata
def test_rotated_brain_has_rotated_fa_colour_directions(protocol):
    bvals, bvecs = protocol
    kwargs = {"seed": 4, "snr": None, "supersample": 1}
    upright = simulate_brain(bvals, bvecs, **kwargs)
    plan = plan_brain(4, rotation_deg=(20.0, -15.0, 30.0))
    z = plan.shape[2] // 2
    rotated = render_brain(plan, bvals, bvecs, snr=None, supersample=1, slab=(z - 5, z + 5))
    rotation = plan.placement.rotation
    dti_u, dti_r = upright.truth_dti(), rotated.truth_dti()

    white = rotated.mask & (dti_r.fa > 0.5)
    q = plan.positions(rotated.region).reshape(*rotated.mask.shape, 3)[white]
    source = plan.placement.source_points(q)
    index = np.rint((source - upright.plan.origin) / upright.plan.voxel_size).astype(int)
    e_u = dti_u.evec1[tuple(index.T)]
    e_r = dti_r.evec1[white]
    assert len(e_r) > 300

    def angles(a, b):
        return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, axis=1)), 0.0, 1.0)))

    turned = angles(e_r, e_u @ rotation.T)
    assert np.median(turned) < 1.0
    assert np.percentile(turned, 95) < 5.0
    assert np.median(angles(e_r, e_u)) > 15.0  # without the rotation they disagree
    # the FA itself is rotation invariant
    assert np.median(np.abs(dti_r.fa[white] - dti_u.fa[tuple(index.T)])) < 0.05


@needs_drivers
@pytest.mark.realdata
def test_rician_noise_level_matches_snr():
    bvals, bvecs = acquisition({1000: 6}, n_b0=24, seed=0)
    brain = simulate_brain(bvals, bvecs, seed=2, snr=25.0, bias_field=0.0, slab=(28, 36))
    assert brain.sigma == pytest.approx(1000.0 / 25.0)
    b0 = bvals == 0
    # SNR is defined on white matter at b = 0
    white = brain.mask & (brain.fractions[..., 0] > 0.97)
    s0_white = np.median(brain.clean[white][:, b0])
    assert s0_white / brain.sigma == pytest.approx(25.0, rel=0.05)
    # high-signal voxels: the noise is close to Gaussian with the given sigma
    residual = (brain.data - brain.clean)[brain.mask][:, b0]
    assert residual.std() == pytest.approx(brain.sigma, rel=0.05)
    assert abs(residual.mean()) < 0.1 * brain.sigma
    # background (no signal): Rayleigh, mean sigma sqrt(pi / 2), variance (2 - pi / 2) sigma^2
    background = brain.data[brain.clean.max(axis=-1) == 0]
    assert background.size > 10000
    assert background.mean() == pytest.approx(brain.sigma * np.sqrt(np.pi / 2), rel=0.03)
    assert background.var() == pytest.approx((2 - np.pi / 2) * brain.sigma**2, rel=0.05)
    noiseless = simulate_brain(bvals, bvecs, seed=2, snr=None, slab=(28, 36))
    assert noiseless.sigma == 0.0
    np.testing.assert_array_equal(noiseless.data, noiseless.clean)
    np.testing.assert_allclose(noiseless.clean, brain.clean)


@needs_drivers
@pytest.mark.realdata
def test_simulated_tissue_is_plausible(protocol):
    bvals, bvecs = protocol
    brain = simulate_brain(bvals, bvecs, seed=3, snr=None, slab=(25, 40))
    dti = brain.truth_dti()
    f = brain.fractions
    white = brain.mask & (f[..., 0] > 0.9)
    grey = brain.mask & (f[..., 1] > 0.8)
    csf = brain.mask & (f[..., 2] > 0.8)
    assert white.sum() > 500 and grey.sum() > 500 and csf.sum() > 20
    assert 0.35 < np.median(dti.fa[white]) < 0.85 and np.median(dti.fa[grey]) < 0.25
    assert 0.5e-3 < np.median(dti.md[white]) < 1.0e-3
    assert np.median(dti.md[csf]) > 2.0e-3
    b0 = brain.clean[..., 0]
    assert np.median(b0[csf]) > np.median(b0[grey]) > np.median(b0[white])


@needs_drivers
@pytest.mark.realdata
def test_evaluation_brain_has_short_and_full_acquisitions():
    ev = evaluation_brain(n_full=24, n_input=8, n_b0=3, voxel_size=3.0, supersample=1, seed=7)
    brain = ev.brain
    assert brain.data.shape[-1] == 27 and brain.clean.shape == brain.data.shape
    assert ev.input_indices.tolist()[0] == 0 and len(ev.input_indices) == 9
    assert len(ev.held_out_indices) == 16
    assert set(ev.input_indices) & set(ev.held_out_indices) == set()
    assert np.all(brain.bvals[ev.held_out_indices] == 1000)
    data, bvals, bvecs = ev.short_acquisition()
    assert data.shape[-1] == 9 and bvals.tolist().count(0.0) == 1
    assert np.linalg.det(brain.affine[:3, :3]) < 0  # FSL b-vectors are voxel axes


@needs_drivers
@pytest.mark.realdata
def test_simulated_source_feeds_the_example_sampler():
    pytest.importorskip("torch")  # model.train needs the model extra
    from qid2_bidsapp.model.data import ExampleSampler, VolumeSource, prepare_volumes
    from qid2_bidsapp.model.train import build_source

    spec = {
        "kind": "simulated",
        "n_volumes": 2,
        "seed": 3,
        "voxel_size": [2.0, 3.0],
        "n_directions": [30, 32],
        "inplane": 64,
        "weight": 2.0,
    }
    source, weight = build_source(spec)
    assert isinstance(source, SimulatedSource) and isinstance(source, VolumeSource)
    assert weight == 2.0
    prepared = prepare_volumes([source])
    assert len(prepared[0]) == 2
    for volume in prepared[0]:
        assert volume.clean is not None and volume.data.shape[2] == 4
        assert max(volume.data.shape[:2]) <= 64
        assert all(30 <= len(idx) <= 32 for idx in volume.shells.values())
    info = source.describe()
    assert info["kind"] == "simulated" and len(info["volumes"]) == 2
    sampler = ExampleSampler(
        prepared,
        [1.0],
        np.random.default_rng(0),
        n_references=4,
        clip=1.5,
        crop=32,
        min_keep=10,
        max_keep=29,
        clean_target=True,
    )
    batch = sampler.batch(3)
    assert batch["target"].shape == (3, 1, 32, 32)
    assert batch["condition"].shape == (3, 5, 32, 32)
    assert all(np.isfinite(batch[k]).all() for k in ("target", "condition", "tokens"))
    assert all(10 <= m["n_kept"] <= 29 for m in batch["meta"])
    assert batch["mask"].mean() > 0.2
    again = SimulatedSource(2, seed=3, voxel_size=(2.0, 3.0), n_directions=(30, 32), inplane=64)
    np.testing.assert_array_equal(list(again.volumes())[1].data, prepared[0][1].data)
    with pytest.raises(Qid2Error, match="bad simulated source"):
        build_source({"kind": "simulated", "snr": [40, 10]})


# --------------------------------------------------------------------------- drivers and priors


def test_missing_or_broken_drivers_name_the_file(tmp_path):
    with pytest.raises(InputError, match="subject_2.5mm_peaks.nii.gz: simulator driver file is"):
        load_anatomy(tmp_path)
    for name in ("subject_2.5mm_peaks.nii.gz", "subject_2.5mm_FA.nii.gz"):
        (tmp_path / name).write_bytes(b"not a nifti")
    (tmp_path / "subject_2.5mm_nodif_brain_mask.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="subject_2.5mm_peaks.nii.gz: cannot be read"):
        load_anatomy(tmp_path)


@needs_drivers
@pytest.mark.realdata
def test_priors_fall_back_to_nilearn_without_templateflow_files(tmp_path, monkeypatch):
    pytest.importorskip("nilearn")
    home = tmp_path / "tf-home"
    home.mkdir()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    anatomy = load_anatomy()
    priors, source = tissue_priors(anatomy.affine, anatomy.shape, anatomy.mask, "auto")
    assert source.startswith("nilearn:")
    assert list(home.iterdir()) == []  # nothing was downloaded or created
    inside = priors[anatomy.mask]
    np.testing.assert_allclose(inside.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(priors[~anatomy.mask] == 0)
    # white-matter prior is high where the driver subject's FA is high
    wm_prior = priors[..., 0]
    high, low = anatomy.mask & (anatomy.fa > 0.5), anatomy.mask & (anatomy.fa < 0.15)
    assert wm_prior[high].mean() > wm_prior[low].mean() + 0.2
    with pytest.raises(Qid2Error, match="TemplateFlow"):
        tissue_priors(anatomy.affine, anatomy.shape, anatomy.mask, "templateflow")


@needs_drivers
@pytest.mark.realdata
@pytest.mark.skipif(
    not templateflow_priors_available(),
    reason=f"TemplateFlow's home ({os.environ.get('TEMPLATEFLOW_HOME', '~/.cache/templateflow')})"
    " holds no MNI152NLin2009cAsym probseg files (they are never downloaded)",
)
def test_priors_from_templateflow_when_its_home_has_them():
    anatomy = load_anatomy()
    priors, source = tissue_priors(anatomy.affine, anatomy.shape, anatomy.mask, "templateflow")
    assert source.startswith("templateflow:")
    np.testing.assert_allclose(priors[anatomy.mask].sum(axis=1), 1.0, atol=1e-5)
    high, low = anatomy.mask & (anatomy.fa > 0.5), anatomy.mask & (anatomy.fa < 0.15)
    assert priors[..., 0][high].mean() > priors[..., 0][low].mean() + 0.2
