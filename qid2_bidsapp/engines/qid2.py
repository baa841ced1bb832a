"""The QID² diffusion engine (``--engine qid2``) and where its model is found.

For each target direction g of a shell, the network synthesises g's image slice by slice from
the R acquired slices nearest to g (`conditioning.select_references`) and the SH prior at g,
both divided by S0 and mapped to model space (`model.data.model_inputs`), with the directions as
cross-attention tokens (`conditioning.direction_tokens`) in the model frame of the slice axis
(`model.data.model_frame_bvecs`): everything as in training. The SH prior is the ``sh``
engine's prediction with the model's λ (`model.data.sh_prior_matrix`:
``sh_prediction_matrix(bvecs_in, targets, sh_order_for(N), config.prior_lambda) @ signal``).
The truncated DDIM sampler draws K samples per (slice, target); their mean is the prediction
and their standard deviation the uncertainty. Outside the brain mask the output is the SH
prior (clipped at 0) and the uncertainty 0.

Only the lookup functions work without torch; the engine imports it when built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np

from ..errors import EngineUnavailableError, InputError, Qid2Error

#: Name of the default model's folder (in the package's ``_models`` and the repo's ``models``).
DEFAULT_MODEL_NAME = "qid2-default"
#: Environment variable that names the model folder to use instead of the default.
MODEL_ENV = "QID2_MODEL_DIR"
#: Voxels kept around the brain mask's bounding box in every slice.
CROP_MARGIN = 4
DEVICES = ("auto", "cpu", "cuda")
#: ``t_start`` value that runs the full chain from pure noise.
T_START_NOISE = "noise"
#: ``t_start`` of models whose sampler defaults name none (the per-target QID² models).
DEFAULT_T_START = 200
#: Kind of the per-target QID² models (their config.json has no ``kind``).
PER_TARGET_KIND = "per-target"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"


# --------------------------------------------------------------------------- model lookup


def model_search_paths() -> list[Path]:
    """Folders searched, in order, for the default model.

    Returns
    -------
    list of Path
        ``$QID2_MODEL_DIR`` alone when it is set; otherwise the model shipped in the installed
        package (``qid2_bidsapp/_models/qid2-default``), then, in a source checkout
        (editable install), the repository's ``models/qid2-default``.

    """
    override = os.environ.get(MODEL_ENV)
    if override:
        return [Path(override).expanduser().absolute()]
    package = Path(__file__).resolve().parents[1]
    paths = [package / "_models" / DEFAULT_MODEL_NAME]
    if (package.parent / "pyproject.toml").is_file():  # a source checkout (editable install)
        paths.append(package.parent / "models" / DEFAULT_MODEL_NAME)
    return paths


def has_model(folder: str | os.PathLike) -> bool:
    """Whether a folder holds a model (weights or config; whether intact is checked on load).

    Parameters
    ----------
    folder : str or PathLike
        Candidate model folder.

    Returns
    -------
    bool

    """
    folder = Path(folder)
    return (folder / _WEIGHTS).is_file() or (folder / _CONFIG).is_file()


def default_model_dir() -> Path | None:
    """Find the model ``--engine qid2`` uses when ``--model`` is not given.

    Returns
    -------
    Path or None
        The first folder of `model_search_paths` that holds a model, or None.

    """
    return next((p for p in model_search_paths() if has_model(p)), None)


def _no_model_message(model_dir: Path | None) -> str:
    if model_dir is not None:
        where = f"{model_dir} holds no model (no {_WEIGHTS})"
    else:
        looked = ", ".join(str(p) for p in model_search_paths())
        where = f"no model found (looked in {looked}; set by --model or ${MODEL_ENV})"
    return (
        f"engine 'qid2' (the diffusion up-sampler) cannot run: {where}; the default model "
        "(models/qid2-default) is missing from this installation. Pass --model DIR (a folder "
        "written by qid2-train), or use --engine sh (spherical harmonics) or --engine interp"
    )


def listed_weights_sha256(folder: str | os.PathLike) -> str | None:
    """Read the weights' sha256 listed in a model folder's ``SHA256SUMS`` (unverified).

    Parameters
    ----------
    folder : str or PathLike
        Model folder.

    Returns
    -------
    str or None
        None when the file or the line is missing.

    """
    try:
        lines = (Path(folder) / "SHA256SUMS").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        digest, _, name = line.partition(" ")
        if name.lstrip(" *") == _WEIGHTS:
            return digest.lower()
    return None


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """Choose the model folder to load: the given one, else the default.

    Parameters
    ----------
    model_dir : str or PathLike or None
        ``--model``; None for the default.

    Returns
    -------
    Path

    Raises
    ------
    EngineUnavailableError
        When there is no model there (or none installed), naming where it looked.

    """
    folder = Path(model_dir).absolute() if model_dir is not None else default_model_dir()
    if folder is None or not has_model(folder):
        raise EngineUnavailableError(_no_model_message(folder))
    return folder


def qid2_uses_cuda(device: str) -> bool:
    """Whether the qid2 engine will run on a CUDA GPU with this ``--device``.

    Safe to call before forking workers: it asks NVML (``torch.cuda.device_count``), not the
    CUDA runtime, so CUDA stays usable in forked processes.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        The requested device.

    Returns
    -------
    bool
        False for ``cpu``, without torch, or without a GPU.

    """
    if str(device) == "cpu":
        return False
    try:
        from ..model.inference import cuda_device_count
    except ImportError:
        return False
    return cuda_device_count() > 0


def build_qid2_engine(**options) -> Qid2Upsampler:
    """Build the qid2 engine from `get_engine` options.

    Parameters
    ----------
    **options
        ``model_dir`` (None: `default_model_dir`), ``expected_sha256``, and the keyword
        arguments of `Qid2Upsampler`; other keys (other engines' settings) are ignored.

    Returns
    -------
    Qid2Upsampler

    Raises
    ------
    EngineUnavailableError
        No model, the model extra (torch, MONAI, ...) is not installed, or CUDA is asked for
        without a GPU.
    InputError
        A corrupted or inconsistent model folder (one line naming the file).
    Qid2Error
        Settings that the model cannot run with.

    """
    folder = resolve_model_dir(options.get("model_dir"))
    try:
        import monai  # noqa: F401
        import safetensors  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        raise EngineUnavailableError(
            f"engine 'qid2' needs the model extra ({err.name} is not installed): "
            "pip install 'qid2[model]', or use --engine sh"
        ) from None
    names = (
        "n_steps",
        "t_start",
        "temperature",
        "n_samples",
        "eta",
        "symmetries",
        "log_mean_from_prior",
        "seed",
        "device",
        "batch_size",
        "num_threads",
        "precision",
        "slice_axis",
        "affine",
        "adapt_steps",
        "adapt_lr",
    )
    kwargs = {k: options[k] for k in names if k in options}
    if str(kwargs.get("device", "auto")).startswith("cuda") and not qid2_uses_cuda("cuda"):
        raise EngineUnavailableError(
            "engine 'qid2': --device cuda was asked for but no CUDA GPU is visible to torch; "
            "use --device auto or --device cpu"
        )
    try:
        engine = Qid2Upsampler(folder, **kwargs)
    except ValueError as err:
        raise Qid2Error(f"engine 'qid2': {err}") from None
    expected = options.get("expected_sha256")
    if expected and expected != engine.info["sha256"]:
        raise InputError(
            folder / _WEIGHTS,
            f"changed since the run was planned (sha256 {engine.info['sha256'][:12]}..., "
            f"expected {expected[:12]}...)",
        )
    return engine


# --------------------------------------------------------------------------- the engine


@contextlib.contextmanager
def _torch_threads(n_threads: int | None):
    """Run with ``torch.set_num_threads(n_threads)``, restoring the previous value."""
    import torch

    if not n_threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Qid2Upsampler:
    """Up-sample a shell with the QID² diffusion model (``--engine qid2``).

    The model is verified (checksums) and loaded on the CPU when the engine is built, with one
    thread, so that a parent process that only checks the model stays safe to fork; it moves
    to its device at the first prediction.

    Parameters
    ----------
    model_dir : str or PathLike
        A model folder (`qid2_bidsapp.model.checkpoint.save_model`).
    n_steps : int, optional
        DDIM steps per sample; default: the model's ``sampler_defaults`` for the device kind
        (CPU or CUDA) this engine will run on.
    t_start : int, "noise" or None
        First timestep of the truncated chain (started from the SH prior noised to it);
        ``"noise"`` runs the full chain from pure noise; None: the model's setting for the
        device (200 for per-target models without one).
    temperature : float
        Noise scale (0: deterministic).
    n_samples : int, optional
        K, samples per (slice, target): mean = prediction, std = uncertainty; default as
        `n_steps`.
    seed : int
        Seed; every (shell, slice, target) draws its own noise from it.
    device : {"auto", "cpu", "cuda"}
        Where the network runs; ``auto`` uses a CUDA GPU when there is one.
    batch_size : int, optional
        Network batch: slices for SH-field models, (slice, target) pairs for per-target
        models; default from the free memory. Halved on out-of-memory errors.
    num_threads : int, optional
        CPU threads of torch during a prediction (default: leave torch's setting).
    precision : {"auto", "float32", "bfloat16"}
        Autocast precision of the network. ``auto``: bfloat16 (else float16) on CUDA; on the
        CPU, bfloat16 where the model's CPU settings name it and the CPU runs it natively
        (AVX512-BF16 or AMX), else float32. ``float32``: no autocast anywhere.
        ``bfloat16``: bfloat16 everywhere (slow on CPUs without native support).
    eta : float
        DDIM stochasticity.
    slice_axis : int
        Axis of the volumes along which the acquisition's slices lie (0, 1 or 2; default 2,
        the NIfTI's third axis). The output is on the same voxel grid either way.
    affine : array-like, shape (4, 4), optional
        The volumes' voxel-to-world affine: with FSL b-vectors (image axes, x flipped when its
        determinant is positive) it gives the directions in the voxel frame the model was
        trained in (`model.data.model_frame_bvecs`). None takes the b-vectors as voxel-axis
        directions already.
    adapt_steps : int
        Steps of a self-supervised fine-tune on the shell's acquired directions before
        sampling it (`model.adapt`; 0: none). Each shell starts from the loaded weights.
    adapt_lr : float
        Learning rate of that fine-tune.
    symmetries : int, optional
        SH-field models: the K samples are drawn on this many mirrored copies
        of each slice (1, 2, 4 or 8; `model.plane_symmetry`) and mapped back; default: the
        model's setting for the device (1 when it has none). Per-target models: 1 only.
    log_mean_from_prior : bool, optional
        SH-field models: rescale each voxel's prediction to the prior's mean log signal
        (`model.field_features.log_mean_scale`); default: the model's ``log_mean_from_prior``.

    Raises
    ------
    InputError
        For a corrupted or inconsistent model folder.
    ValueError
        For invalid settings.

    """

    name = "qid2"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        n_steps: int | None = None,
        t_start: int | str | None = None,
        temperature: float = 1.0,
        n_samples: int | None = None,
        seed: int = 0,
        device: str = "auto",
        batch_size: int | None = None,
        num_threads: int | None = None,
        precision: str = "auto",
        eta: float = 0.0,
        slice_axis: int = 2,
        affine=None,
        adapt_steps: int = 0,
        adapt_lr: float = 1e-4,
        symmetries: int | None = None,
        log_mean_from_prior: bool | None = None,
    ):
        import torch

        from ..model.adapt import AdaptSettings
        from ..model.checkpoint import load_model
        from ..model.inference import SamplerSettings, autocast_dtype
        from ..model.sampler import Qid2Sampler

        if str(device) not in DEVICES and not str(device).startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if num_threads is not None and num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {num_threads}")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        if affine is not None:
            affine = np.asarray(affine, dtype=np.float64)
            if affine.shape != (4, 4) or not np.isfinite(affine).all():
                raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
        with _torch_threads(1):
            self.network, self.config, self.info = load_model(model_dir, device="cpu")
        self.kind = getattr(self.config, "kind", PER_TARGET_KIND)
        if log_mean_from_prior is not None:
            if self.kind == PER_TARGET_KIND:
                raise ValueError("log_mean_from_prior needs an SH-field model")
            self.config = dataclasses.replace(
                self.config, log_mean_from_prior=bool(log_mean_from_prior)
            )
            self.network.config = self.config
        kind = "cuda" if str(device) != "cpu" and qid2_uses_cuda(str(device)) else "cpu"
        autocast_dtype(torch.device(kind), precision)  # a bad precision fails at preflight
        defaults = self.config.sampler_defaults[kind]
        if t_start is None:  # the model's setting (per-target models: 200, as before)
            t_start = defaults.get("t_start", DEFAULT_T_START)
        elif t_start == T_START_NOISE:
            t_start = None
        self.sampler_settings = SamplerSettings(
            n_steps=int(defaults["n_steps"] if n_steps is None else n_steps),
            t_start=None if t_start is None else int(t_start),
            temperature=float(temperature),
            n_samples=int(defaults["n_samples"] if n_samples is None else n_samples),
            eta=float(eta),
            symmetries=int(defaults.get("symmetries", 1) if symmetries is None else symmetries),
        )
        self.sampler_settings.check_against(self.config)
        if self.kind == PER_TARGET_KIND and self.sampler_settings.symmetries != 1:
            raise ValueError("symmetries other than 1 need an SH-field model")
        t_start = self.sampler_settings.t_start
        if self.kind != PER_TARGET_KIND and adapt_steps:
            raise ValueError("adapt_steps is only available for per-target QID² models")
        self.adapt_settings = AdaptSettings(
            steps=int(adapt_steps),
            lr=float(adapt_lr),
            max_timestep=self.config.num_train_timesteps - 1 if t_start is None else t_start,
            seed=int(seed),
        )
        self.n_b0 = 1
        self.noise_sigma: float | None = None
        self._adaptations: list[dict] = []
        self.sampler = Qid2Sampler(self.config) if self.kind == PER_TARGET_KIND else None
        self.seed = int(seed)
        self.requested_device = str(device)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.num_threads = num_threads or None
        self.precision = str(precision)
        self.slice_axis = int(slice_axis)
        self.affine = affine
        self._device = None
        self._dtype = None
        self._batch_used: int | None = None

    # ------------------------------------------------------------------ helpers

    def _ready(self):
        """Move the network to its device (once); return (device, autocast dtype)."""
        if self._device is None:
            from ..model.inference import autocast_dtype, resolve_device

            try:
                device = resolve_device(self.requested_device)
            except RuntimeError as err:
                raise EngineUnavailableError(f"engine 'qid2': {err} (use --device cpu)") from None
            cpu_bfloat16 = self.config.sampler_defaults["cpu"].get("precision") == "bfloat16"
            try:
                dtype = autocast_dtype(device, self.precision, cpu_bfloat16)
            except ValueError as err:
                raise EngineUnavailableError(f"engine 'qid2': {err}") from None
            self.network.to(device).eval()
            self._device, self._dtype = device, dtype
        return self._device, self._dtype

    def resolved_precision(self) -> str:
        """Return the precision the network runs in here (``float32``, ``bfloat16``, ...).

        Returns
        -------
        str
            What ``--precision`` resolves to on this machine's device (moves the network there).

        Raises
        ------
        EngineUnavailableError
            When the device or the precision is not available.

        """
        self._ready()
        return self._precision_used()

    def _precision_used(self) -> str:
        """Name the autocast dtype in use (``float32`` when none, or before a prediction)."""
        return "float32" if self._dtype is None else str(self._dtype)[len("torch.") :]

    @property
    def frame_affine(self) -> np.ndarray:
        """The affine that sets the FSL x flip: the volumes' own, else one with det < 0 (none)."""
        return np.diag([-1.0, 1.0, 1.0, 1.0]) if self.affine is None else self.affine

    def model_frame(self, bvecs: np.ndarray) -> np.ndarray:
        """Return directions in the model frame of this engine's slice axis.

        Parameters
        ----------
        bvecs : ndarray, shape (K, 3)
            FSL image-axis directions (or voxel-axis ones when the engine has no affine).

        Returns
        -------
        ndarray, shape (K, 3)
            Voxel axes ``(a, b, slice_axis)``, ``a < b`` the in-plane axes.

        """
        from ..model.data import model_frame_bvecs

        return model_frame_bvecs(bvecs, self.frame_affine, self.slice_axis)

    def prior_matrix(self, bvecs_in: np.ndarray, bvecs_out: np.ndarray) -> np.ndarray:
        """Return the (M, N) map from the acquired signal to the SH prior at the targets.

        This is the ``sh`` engine with the order from the direction count and the model's
        ``prior_lambda``, as in training (`model.data.sh_prior_matrix`); row m is the prior of
        target m, the same as `model.data.sh_prior_for_target` for that target alone.

        Parameters
        ----------
        bvecs_in : ndarray, shape (N, 3)
            Acquired directions.
        bvecs_out : ndarray, shape (M, 3)
            Targets (in the same frame).

        Returns
        -------
        ndarray, shape (M, N)

        """
        from ..model.data import sh_prior_matrix

        return sh_prior_matrix(bvecs_in, bvecs_out, self.config.prior_lambda)

    # ------------------------------------------------------------------ Upsampler protocol

    def predict(
        self,
        signal: np.ndarray,
        b0: np.ndarray,
        bvecs_in: np.ndarray,
        bvecs_out: np.ndarray,
        bval: float,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Synthesise the signal at new directions of one shell (see ``Upsampler.predict``).

        Parameters
        ----------
        signal : ndarray, shape (X, Y, Z, N)
            Acquired diffusion-weighted volumes of this shell.
        b0 : ndarray, shape (X, Y, Z)
            Mean b=0 image (the model works on S/S0).
        bvecs_in : ndarray, shape (N, 3)
            Unit gradient directions of ``signal``.
        bvecs_out : ndarray, shape (M, 3)
            Unit gradient directions to synthesise.
        bval : float
            The shell's b-value.
        mask : ndarray of bool, shape (X, Y, Z), optional
            Voxels the network predicts; outside it the output is the SH prior. ``None``:
            every voxel.

        Returns
        -------
        ndarray, shape (X, Y, Z, M), float32
            Non-negative predicted signal (mean of the K samples).

        """
        return self.predict_with_uncertainty(signal, b0, bvecs_in, bvecs_out, bval, mask)[0]

    def predict_with_uncertainty(
        self,
        signal: np.ndarray,
        b0: np.ndarray,
        bvecs_in: np.ndarray,
        bvecs_out: np.ndarray,
        bval: float,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like `predict`, also returning the per-voxel standard deviation of the K samples.

        Parameters
        ----------
        signal, b0, bvecs_in, bvecs_out, bval, mask
            As in `predict`.

        Returns
        -------
        mean : ndarray, shape (X, Y, Z, M), float32
            Prediction (as `predict`).
        std : ndarray, shape (X, Y, Z, M), float32
            Standard deviation of the samples in signal units (``std·(clip/2)·S0`` of the
            model-space std); 0 outside the mask and for K = 1.

        """
        from ..model.inference import synthesise_shell

        signal = np.asarray(signal)
        if signal.ndim != 4:
            raise ValueError(f"signal must be 4D (X, Y, Z, N), got shape {signal.shape}")
        spatial = signal.shape[:3]
        bvecs_in = np.asarray(bvecs_in, dtype=np.float64).reshape(-1, 3)
        bvecs_out = np.asarray(bvecs_out, dtype=np.float64).reshape(-1, 3)
        if len(bvecs_in) != signal.shape[3]:
            raise ValueError(f"{len(bvecs_in)} bvecs_in for {signal.shape[3]} volumes")
        b0 = np.asarray(b0, dtype=np.float32)
        if b0.shape != spatial:
            raise ValueError(f"b0 shape {b0.shape} does not match signal shape {spatial}")
        mask = np.ones(spatial, bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != spatial:
            raise ValueError(f"mask shape {mask.shape} does not match signal shape {spatial}")
        frame_in, frame_out = self.model_frame(bvecs_in), self.model_frame(bvecs_out)
        device, dtype = self._ready()
        with _torch_threads(self.num_threads if device.type == "cpu" else None):
            if self.kind != PER_TARGET_KIND:
                from ..model.field_inference import synthesise_shell_field

                mean, std, used = synthesise_shell_field(
                    self.network,
                    signal,
                    b0,
                    mask,
                    frame_in,
                    frame_out,
                    float(bval),
                    self.sampler_settings,
                    n_b0=self.n_b0,
                    noise_sigma=self.noise_sigma,
                    seed=self.seed,
                    slice_axis=self.slice_axis,
                    margin=CROP_MARGIN,
                    batch_size=self.batch_size,
                    dtype=dtype,
                )
            else:
                network = self._adapted(signal, b0, bvecs_in, float(bval), mask)
                mean, std, used = synthesise_shell(
                    network,
                    self.sampler,
                    signal,
                    b0,
                    mask,
                    frame_in,
                    frame_out,
                    float(bval),
                    self.prior_matrix(frame_in, frame_out),
                    self.sampler_settings,
                    seed=self.seed,
                    slice_axis=self.slice_axis,
                    margin=CROP_MARGIN,
                    batch_size=self.batch_size,
                    dtype=dtype,
                )
        self._batch_used = used
        return mean, std

    def _adapted(self, signal, b0, bvecs_in, bval: float, mask) -> object:
        """Return the network fine-tuned on this shell (`model.adapt`), or the loaded one."""
        if self.adapt_settings.steps == 0:
            return self.network
        from ..model.adapt import adapt_network, subject_volume

        try:
            volume = subject_volume(
                signal, b0, bvecs_in, bval, mask, self.frame_affine, slice_axis=self.slice_axis
            )
        except Qid2Error as err:  # too few directions or brain voxels to learn from
            self._adaptations.append({"bval": bval, "skipped": str(err)})
            return self.network
        network, record = adapt_network(self.network, self.config, volume, self.adapt_settings)
        self._adaptations.append({"bval": bval, **record})
        return network

    @property
    def needs_noise(self) -> bool:
        """Whether the model is conditioned on the scan's noise level (``set_acquisition``)."""
        return bool(getattr(self.config, "noise_input", False))

    def set_acquisition(self, *, n_b0: int, noise_sigma: float | None = None) -> None:
        """Tell the engine facts of the whole scan that one shell's arrays do not carry.

        SH-field models are conditioned on them; `upsample_shells` and the self-check call
        this before predicting.

        Parameters
        ----------
        n_b0 : int
            Number of b=0 volumes averaged into the S0 given to `predict` (at least 1).
        noise_sigma : float, optional
            Noise standard deviation of the scan in signal units (`trust.estimate_noise`).

        """
        self.n_b0 = max(1, int(n_b0))
        if noise_sigma is not None:
            self.noise_sigma = float(noise_sigma)

    def settings(self) -> dict:
        """Return the engine's settings as JSON-serialisable provenance.

        Returns
        -------
        dict
            ``model_id``, ``model_sha256``, ``model_dir``, ``sampler`` (n_steps, t_start,
            temperature, n_samples, eta, symmetries), ``seed``, ``device`` (requested, and the
            one used once a prediction ran), ``precision_requested``, ``amp`` and
            ``precision`` (float32, or the autocast dtype in use),
            ``batch_size`` (requested, and the last one used), ``slice_axis``, ``prior``
            (``engine`` "sh" or "dti", ``order``, ``lambda`` and, for SH-field models,
            ``log_mean_from_prior``).

        """
        if self.kind == PER_TARGET_KIND:
            prior = {"engine": "sh", "order": "auto", "lambda": self.config.prior_lambda}
        else:
            prior = {
                "engine": "dti" if self.config.prior == "dti" else "sh",
                "order": self.config.sh_order,
                "lambda": self.config.prior_lambda,
                "log_mean_from_prior": self.config.log_mean_from_prior,
            }
        return {
            "model_id": self.info["model_id"],
            "model_kind": self.kind,
            "model_sha256": self.info["sha256"],
            "model_dir": self.info["folder"],
            "sampler": self.sampler_settings.to_dict(),
            "seed": self.seed,
            "device": self.requested_device if self._device is None else str(self._device),
            "device_requested": self.requested_device,
            "amp": self._dtype is not None,
            "precision_requested": self.precision,
            "precision": self._precision_used(),
            "batch_size": "auto" if self.batch_size is None else self.batch_size,
            "batch_size_used": self._batch_used,
            "slice_axis": self.slice_axis,
            "crop_margin": CROP_MARGIN,
            "prior": prior,
            "n_b0": self.n_b0,
            "noise_sigma": self.noise_sigma,
            "direction_frame": "voxel axes of the slice (model.data.model_frame_bvecs)",
            "outside_mask": "the prior (uncertainty 0)",
            "adaptation": {
                "steps": self.adapt_settings.steps,
                "lr": self.adapt_settings.lr,
                "shells": self._adaptations,
            },
        }
