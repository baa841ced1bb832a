"""Simulator drivers: real-data fibre peaks, FA and mask, plus grey-matter/CSF tissue priors.

The drivers (``subject_2.5mm_*`` from TractSeg, see ``../shared/data/README.md``) live outside
the package; their folder is, in order: the ``drivers_dir`` argument, ``$QID2_PHANTOM_DIR``, or
``shared/data/phantom`` next to the repository. Tissue priors come from TemplateFlow
(MNI152NLin2009cAsym ``label-GM/WM/CSF_probseg``) when its home already holds the files, else
from the MNI152 2009 GM/WM maps inside the nilearn wheel (CSF = brain - GM - WM); nothing is
downloaded. Everything is loaded once per process (cached).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..errors import InputError, Qid2Error

#: The driver files (see ../shared/data/README.md, phantom/ section).
DRIVER_FILES = {
    "peaks": "subject_2.5mm_peaks.nii.gz",
    "fa": "subject_2.5mm_FA.nii.gz",
    "mask": "subject_2.5mm_nodif_brain_mask.nii.gz",
}

TEMPLATEFLOW_TEMPLATE = "MNI152NLin2009cAsym"
NILEARN_PRIORS = {
    "GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True, eq=False)
class Anatomy:
    """The simulator's drivers on their own grid (voxel-axis frame, see `load_anatomy`).

    Attributes
    ----------
    peak_dirs : ndarray, shape (X, Y, Z, 3, 3), float32
        Unit fibre directions (peak, xyz) in the voxel-axis frame; 0 where there is no peak.
    peak_amps : ndarray, shape (X, Y, Z, 3), float32
        Peak amplitudes (largest first); 0 where there is no peak.
    fa : ndarray, shape (X, Y, Z), float32
        FA of the driver subject.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask.
    priors : ndarray, shape (X, Y, Z, 3), float32
        WM, GM, CSF prior probabilities, summing to 1 inside the mask, 0 outside.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (MNI) affine of the driver grid.
    voxel_size : float
        Isotropic voxel size (mm).
    prior_source : str
        Where the priors come from (``templateflow:...`` or ``nilearn:...``).

    """

    peak_dirs: np.ndarray
    peak_amps: np.ndarray
    fa: np.ndarray
    mask: np.ndarray
    priors: np.ndarray
    affine: np.ndarray
    voxel_size: float
    prior_source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the driver grid."""
        return tuple(self.mask.shape)


def default_drivers_dir() -> Path:
    """Return the driver folder: ``$QID2_PHANTOM_DIR`` or ``<repo>/../shared/data/phantom``.

    Returns
    -------
    Path
        The folder (it may not exist).

    """
    env = os.environ.get("QID2_PHANTOM_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "phantom"


def drivers_available(drivers_dir: str | Path | None = None) -> bool:
    """Tell whether every driver file exists.

    Parameters
    ----------
    drivers_dir : str or Path, optional
        Driver folder (default: `default_drivers_dir`).

    Returns
    -------
    bool

    """
    folder = Path(drivers_dir) if drivers_dir else default_drivers_dir()
    return all((folder / name).is_file() for name in DRIVER_FILES.values())


def load_anatomy(drivers_dir: str | Path | None = None, priors: str = "auto") -> Anatomy:
    """Load the drivers and the tissue priors on the driver grid (cached per process).

    Peak vectors are stored in world (RAS) coordinates, as MRtrix writes them; they are
    converted to the voxel-axis frame (x flipped for this LAS grid), the frame of FSL b-vectors
    of an image with a negative affine determinant.

    Parameters
    ----------
    drivers_dir : str or Path, optional
        Driver folder (default: `default_drivers_dir`).
    priors : {"auto", "templateflow", "nilearn"}
        Source of the tissue priors; ``"auto"``: TemplateFlow when its home holds the files,
        else nilearn.

    Returns
    -------
    Anatomy

    Raises
    ------
    InputError
        When a driver file is missing or malformed.
    Qid2Error
        When the requested priors are not available offline.

    """
    folder = Path(drivers_dir) if drivers_dir else default_drivers_dir()
    return _load_anatomy(str(folder.resolve()), priors)


@lru_cache(maxsize=4)
def _load_anatomy(folder: str, priors: str) -> Anatomy:
    paths = {key: Path(folder) / name for key, name in DRIVER_FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise InputError(
                path, "simulator driver file is missing (see ../shared/data/README.md, phantom/)"
            )
    imgs = {}
    for key, path in paths.items():
        try:
            imgs[key] = nib.load(str(path))
        except Exception as err:  # nibabel raises several types for unreadable files
            raise InputError(path, f"cannot be read as a NIfTI image ({err})") from err
    shape = imgs["mask"].shape
    if imgs["peaks"].shape != (*shape, 9):
        raise InputError(paths["peaks"], f"expected shape {(*shape, 9)}, got {imgs['peaks'].shape}")
    if imgs["fa"].shape != shape:
        raise InputError(paths["fa"], f"expected shape {shape}, got {imgs['fa'].shape}")
    affine = imgs["mask"].affine
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not np.allclose(zooms, zooms[0]) or not np.allclose(
        affine[:3, :3], np.diag(np.diag(affine[:3, :3]))
    ):
        raise InputError(paths["mask"], "driver grid must be axis-aligned and isotropic")

    mask = np.asarray(imgs["mask"].dataobj) > 0
    fa = np.nan_to_num(np.asarray(imgs["fa"].dataobj, dtype=np.float32)).clip(0.0, 1.0)
    peaks = np.nan_to_num(np.asarray(imgs["peaks"].dataobj, dtype=np.float32))
    peaks = peaks.reshape(*shape, 3, 3) * mask[..., None, None]
    # world (RAS) -> voxel-axis frame: flip the axes whose affine diagonal is negative
    peaks = peaks * np.sign(np.diag(affine)[:3]).astype(np.float32)
    amps = np.linalg.norm(peaks, axis=-1)
    dirs = peaks / np.maximum(amps, 1e-12)[..., None]
    prior_maps, source = tissue_priors(affine, shape, mask, priors)
    return Anatomy(
        peak_dirs=dirs.astype(np.float32),
        peak_amps=amps.astype(np.float32),
        fa=fa * mask,
        mask=mask,
        priors=prior_maps,
        affine=np.asarray(affine, dtype=np.float64),
        voxel_size=float(zooms[0]),
        prior_source=source,
    )


# --------------------------------------------------------------------------- tissue priors


def templateflow_home() -> Path:
    """Return TemplateFlow's home as the templateflow client resolves it (without importing it).

    Returns
    -------
    Path
        ``$TEMPLATEFLOW_HOME`` or the user cache folder ``templateflow``.

    """
    env = os.environ.get("TEMPLATEFLOW_HOME")
    if env:
        return Path(env).absolute()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # pragma: no cover - platformdirs comes with templateflow
        return Path.home() / ".cache" / "templateflow"
    return Path(user_cache_dir("templateflow")).absolute()


def _templateflow_local_resolution() -> int | None:
    """Resolution (2 preferred, then 1) whose three probseg files are in TemplateFlow's home.

    The TemplateFlow client keeps zero-byte placeholders for files it has not downloaded; only
    non-empty files count. Nothing is imported or created when the home does not exist.
    """
    folder = templateflow_home() / f"tpl-{TEMPLATEFLOW_TEMPLATE}"
    for res in (2, 1):
        names = [
            f"tpl-{TEMPLATEFLOW_TEMPLATE}_res-{res:02d}_label-{label}_probseg.nii.gz"
            for label in ("GM", "WM", "CSF")
        ]
        if all((folder / n).is_file() and (folder / n).stat().st_size > 0 for n in names):
            return res
    return None


def templateflow_priors_available() -> bool:
    """Tell whether TemplateFlow's home already holds the MNI152NLin2009cAsym tissue priors.

    Returns
    -------
    bool
        True when the GM, WM and CSF ``probseg`` files are present (non-empty) and the
        ``templateflow`` package is installed.

    """
    if _templateflow_local_resolution() is None:
        return False
    try:
        import templateflow  # noqa: F401
    except ImportError:
        return False
    return True


def _templateflow_prior_images() -> tuple[dict, str]:
    from templateflow import api

    res = _templateflow_local_resolution()
    images = {}
    query = {"resolution": res, "suffix": "probseg", "desc": None, "atlas": None}
    for label in ("GM", "WM", "CSF"):
        listed = api.ls(TEMPLATEFLOW_TEMPLATE, label=label, **query)
        if len(listed) != 1 or Path(listed[0]).stat().st_size == 0:
            raise Qid2Error(f"simulator: TemplateFlow lists {listed} for the {label} prior")
        # the file is present and non-empty, so get() returns it without downloading
        path = api.get(TEMPLATEFLOW_TEMPLATE, label=label, **query)
        images[label] = nib.load(str(path))
    return images, f"templateflow:{TEMPLATEFLOW_TEMPLATE} res-{res:02d} probseg"


def _nilearn_prior_images() -> tuple[dict, str]:
    try:
        import nilearn
    except ImportError as err:
        raise Qid2Error(
            "simulator: no tissue priors: nilearn is not installed and TemplateFlow's home "
            f"({templateflow_home()}) holds no {TEMPLATEFLOW_TEMPLATE} probseg files"
        ) from err
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    images = {}
    for label, name in NILEARN_PRIORS.items():
        path = folder / name
        if not path.is_file():
            raise InputError(path, "nilearn's MNI152 tissue map is missing from the install")
        images[label] = nib.load(str(path))
    return images, "nilearn:MNI152 2009 (sym 09a) GM/WM, CSF = 1 - GM - WM"


def _resample(img, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of a 3D image onto a target grid (world coordinates)."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    if img.get_data_dtype() == np.uint8:
        data = data / 255.0
    vox = np.linalg.inv(img.affine) @ affine
    return ndimage.affine_transform(
        data, vox[:3, :3], vox[:3, 3], output_shape=shape, order=1, cval=0.0
    ).clip(0.0, 1.0)


def tissue_priors(
    affine: np.ndarray, shape: tuple[int, int, int], mask: np.ndarray, source: str = "auto"
) -> tuple[np.ndarray, str]:
    """WM, GM and CSF prior probabilities resampled to a grid (linear, MNI world space).

    Parameters
    ----------
    affine : ndarray, shape (4, 4)
        Voxel-to-MNI affine of the target grid.
    shape : tuple of int
        Target grid shape.
    mask : ndarray of bool
        Brain mask on the target grid.
    source : {"auto", "templateflow", "nilearn"}
        ``"auto"``: TemplateFlow when its home holds the files (no download), else nilearn.

    Returns
    -------
    priors : ndarray, shape (*shape, 3), float32
        WM, GM, CSF; normalised to sum to 1 in the mask (CSF where all three are 0), 0 outside.
    description : str
        Where they come from.

    Raises
    ------
    Qid2Error
        When ``source="templateflow"`` and the files are not in TemplateFlow's home, or no
        source is available.

    """
    if source not in ("auto", "templateflow", "nilearn"):
        raise ValueError(f"unknown prior source {source!r}")
    use_tf = source == "templateflow" or (source == "auto" and templateflow_priors_available())
    if use_tf:
        if not templateflow_priors_available():
            raise Qid2Error(
                f"simulator: TemplateFlow's home ({templateflow_home()}) holds no "
                f"{TEMPLATEFLOW_TEMPLATE} GM/WM/CSF probseg files (they are not downloaded)"
            )
        images, description = _templateflow_prior_images()
    else:
        images, description = _nilearn_prior_images()
    gm = _resample(images["GM"], affine, shape)
    wm = _resample(images["WM"], affine, shape)
    if "CSF" in images:
        csf = _resample(images["CSF"], affine, shape)
    else:
        csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    stack = np.stack([wm, gm, csf], axis=-1)
    total = stack.sum(axis=-1, keepdims=True)
    empty = total[..., 0] < 1e-6
    stack[empty] = (0.0, 0.0, 1.0)
    stack /= np.maximum(stack.sum(axis=-1, keepdims=True), 1e-6)
    return (stack * mask[..., None]).astype(np.float32), description
