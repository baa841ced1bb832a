"""Methods boilerplate (HTML) for the qid2 reports, with its references."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape

__all__ = ["REFERENCES", "methods_paragraph"]

#: Key -> (short citation, full reference in HTML-safe text).
REFERENCES: dict[str, tuple[str, str]] = {
    "qid2": (
        "Chen et al., 2024",
        "Chen Z, Wang J, Venkataraman A. QID²: An Image-Conditioned Diffusion Model for Q-space "
        "Up-sampling of DWI Data. Computational Diffusion MRI (CDMRI) workshop, MICCAI 2024. "
        "arXiv:2409.02309.",
    ),
    "ddim": (
        "Song et al., 2021",
        "Song J, Meng C, Ermon S. Denoising diffusion implicit models. International Conference "
        "on Learning Representations (ICLR), 2021. arXiv:2010.02502.",
    ),
    "ftddm": (
        "Flow-based truncated DDM, 2024",
        "Flow-based truncated denoising diffusion model for super-resolution magnetic resonance "
        "spectroscopic imaging. arXiv:2410.19288, 2024.",
    ),
    "monai": (
        "Cardoso et al., 2022",
        "Cardoso MJ, Li W, Brown R, et al. MONAI: An open-source framework for deep learning in "
        "healthcare. arXiv:2211.02701, 2022.",
    ),
    "jones1999": (
        "Jones et al., 1999",
        "Jones DK, Horsfield MA, Simmons A. Optimal strategies for measuring diffusion in "
        "anisotropic systems by magnetic resonance imaging. Magn Reson Med. 1999;42(3):515–525.",
    ),
    "descoteaux2007": (
        "Descoteaux et al., 2007",
        "Descoteaux M, Angelino E, Fitzgibbons S, Deriche R. Regularized, fast, and robust "
        "analytical Q-ball imaging. Magn Reson Med. 2007;58(3):497–510.",
    ),
    "basser1994": (
        "Basser et al., 1994",
        "Basser PJ, Mattiello J, LeBihan D. MR diffusion tensor spectroscopy and imaging. "
        "Biophys J. 1994;66(1):259–267.",
    ),
    "dipy": (
        "Garyfallidis et al., 2014",
        "Garyfallidis E, Brett M, Amirbekian B, Rokem A, van der Walt S, Descoteaux M, "
        "Nimmo-Smith I; Dipy Contributors. Dipy, a library for the analysis of diffusion MRI "
        "data. Front Neuroinform. 2014;8:8.",
    ),
    "nipype": (
        "Gorgolewski et al., 2011",
        "Gorgolewski K, Burns CD, Madison C, Clark D, Halchenko YO, Waskom ML, Ghosh SS. Nipype: "
        "a flexible, lightweight and extensible neuroimaging data processing framework in "
        "Python. Front Neuroinform. 2011;5:13.",
    ),
    "bids": (
        "Gorgolewski et al., 2016",
        "Gorgolewski KJ, Auer T, Calhoun VD, et al. The brain imaging data structure, a format "
        "for organizing and describing outputs of neuroimaging experiments. Sci Data. "
        "2016;3:160044.",
    ),
}


class _Citer:
    """Number references in order of first citation."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def __call__(self, *keys: str) -> str:
        nums = []
        for key in keys:
            if key not in self.order:
                self.order.append(key)
            nums.append(str(self.order.index(key) + 1))
        return f"<sup>[{','.join(nums)}]</sup>"

    def html(self) -> str:
        items = "".join(f"<li>{escape(REFERENCES[k][1])}</li>" for k in self.order)
        return f'<ol class="references">{items}</ol>'


def _shells_text(shells: Sequence[float]) -> str:
    vals = [f"{float(b):g}" for b in shells]
    if not vals:
        return "the diffusion-weighted shells"
    if len(vals) == 1:
        return f"the b = {vals[0]} s/mm² shell"
    return f"the b = {', '.join(vals[:-1])} and {vals[-1]} s/mm² shells"


def _setting(settings: dict, *keys: str):
    """Pop and return the first of ``keys`` present in ``settings`` (None when none is)."""
    for key in keys:
        if settings.get(key) is not None:
            return settings.pop(key)
    return None


def _settings_text(settings: Mapping) -> str:
    """Describe the engine settings not already spelled out in the text."""
    if not settings:
        return ""
    parts = [f"{escape(str(k))} = {escape(json.dumps(v))}" for k, v in settings.items()]
    return f" (further engine settings: {'; '.join(parts)})"


def _engine_text(engine: str, settings: dict, cite: _Citer) -> str:
    """Describe the engine; settings it spells out are removed from ``settings``."""
    if engine == "sh":
        order = _setting(settings, "sh_order", "order", "sh_order_max")
        lam = _setting(settings, "sh_lambda", "lambda", "lambda_", "regularization")
        order_txt = f" of maximal order {escape(str(order))}" if order is not None else ""
        lam_txt = f" (λ = {escape(str(lam))})" if lam is not None else ""
        return (
            "The signal of each shell was fitted voxel-wise with a real, antipodally symmetric "
            f"spherical-harmonic basis{order_txt} with Laplace–Beltrami regularisation{lam_txt}, "
            f"as in analytical Q-ball imaging{cite('descoteaux2007')}, and the fit was evaluated "
            "at the new directions"
        )
    if engine == "interp":
        k = _setting(settings, "n_neighbours", "n_neighbors", "k")
        k_txt = f"{escape(str(k))} " if k is not None else ""
        return (
            "The signal at each new direction was interpolated from its "
            f"{k_txt}angularly nearest acquired directions of the same shell (antipodal "
            "symmetry of the signal taken into account)"
        )
    if engine == "qid2":
        return _qid2_text(settings, cite)
    return f"The new volumes were synthesised with the {escape(engine)} engine"


#: Engine settings that are implementation details, left out of the paragraph (they stay in
#: the sidecar's ``UpsamplingEngineSettings``).
_QID2_INTERNAL = (
    "model_dir",
    "device_requested",
    "amp_requested",
    "precision_requested",
    "batch_size",
    "batch_size_used",
    "slice_axis",
    "crop_margin",
    "direction_frame",
    "outside_mask",
    "adaptation",
    "n_b0",
    "precision",
    "amp",
)


def _qid2_text(settings: dict, cite: _Citer) -> str:
    """Describe the diffusion engine in words; consumes every qid2 setting."""
    model_id = _setting(settings, "model_id")
    sha = _setting(settings, "model_sha256")
    kind = _setting(settings, "model_kind") or "per-target"
    sampler = _setting(settings, "sampler") or {}
    device = str(_setting(settings, "device") or "cpu")
    prior = _setting(settings, "prior") or {}
    precision = settings.get("precision")
    for key in _QID2_INTERNAL:
        settings.pop(key, None)
    settings.pop("seed", None)  # the paragraph gives the run's seed
    engine_ref = cite("qid2")  # references are numbered in the order of the text
    model = f"model {escape(str(model_id))}" if model_id else "the model"
    if sha:
        model += f" (weights SHA-256 {escape(str(sha)[:16])}…)"
    lam = prior.get("lambda")
    if prior.get("engine") == "dti":
        prior_txt = (
            "the spherical-harmonic projection of the signal of a diffusion tensor fitted "
            f"(weighted least squares{cite('basser1994')}) to the acquired directions"
        )
    else:
        prior_txt = (
            "a Laplace–Beltrami regularised spherical-harmonic fit of the acquired directions"
            + (f" (λ = {escape(str(lam))})" if lam is not None else "")
            + cite("descoteaux2007")
        )
    if kind == "sh-field":
        what = (
            "a conditional denoising diffusion model that predicts the spherical-harmonic "
            f"coefficients (order {escape(str(prior.get('order', 6)))}) of the whole angular "
            "signal of each slice from the acquired directions of that slice and of its two "
            "neighbours, so that every new direction is evaluated from one prediction per "
            f"slice; it refines {prior_txt}"
        )
    else:
        what = (
            "an image-conditioned diffusion model that synthesises each new direction slice by "
            "slice from the nearest acquired directions, refining "
            f"{prior_txt}{cite('qid2')}"
        )
    monai_ref = cite("monai")
    steps, k = sampler.get("n_steps"), sampler.get("n_samples")
    t_start, temp = sampler.get("t_start"), sampler.get("temperature")
    ddim_ref = cite("ddim")
    start = (
        "from pure noise"
        if t_start is None
        else f"from that fit noised to step {escape(str(t_start))} of the diffusion chain "
        f"(truncated sampling{cite('ftddm')})"
    )
    where = "a GPU" if device.startswith("cuda") else "the CPU"
    mixed = f", {escape(str(precision))} precision" if precision and precision != "float32" else ""
    symmetries = int(sampler.get("symmetries") or 1)
    copies = (
        f" on each of {symmetries} mirrored copies of the slice (mapped back, directions included)"
        if symmetries > 1
        else ""
    )
    sampling = (
        f"{escape(str(k))} sample(s) per slice were drawn{copies} with {escape(str(steps))} "
        f"DDIM step(s){ddim_ref} {start}, temperature {escape(str(temp))}, on {where}{mixed}; "
        "their mean was used and their standard deviation is given as an uncertainty map"
    )
    if prior.get("log_mean_from_prior"):
        sampling += (
            "; each voxel's prediction was then rescaled so that its mean log signal over the "
            "sphere equals that of the fit it refines (the network sets the angular shape, the "
            "acquired directions the mean diffusivity)"
        )
    return (
        f"The new volumes were generated by the qid2 diffusion engine{engine_ref} with "
        f"{model}, {what}. The network is a 2D diffusion U-Net (MONAI{monai_ref}); "
        f"{sampling}"
    )


def _limits_text(engine: str) -> str:
    if engine == "qid2":
        caveat = (
            "A learned model can produce plausible-looking signal that is not supported by the "
            "acquired data, in particular on scans unlike its training data; the synthesised "
            "volumes should not be treated as measurements."
        )
    else:
        caveat = (
            f"The classical '{escape(engine)}' engine is a baseline: it only re-expresses the "
            "angular information already present in the acquired directions and cannot recover "
            "detail beyond their angular resolution."
        )
    return (
        f"{caveat} The self-check only measures how well hidden acquired directions are "
        "predicted from fewer remaining ones: it is pessimistic, bounded below by the noise of "
        "the data, and does not validate downstream measures such as tractography or "
        "microstructure models."
    )


def methods_paragraph(
    engine: str,
    settings: Mapping | None,
    n_acquired: int,
    n_synth: int,
    shells: Sequence[float],
    *,
    version: str | None = None,
    target_directions: str | None = "repulsion",
    seed: int | None = None,
) -> str:
    """Write a citable methods paragraph (HTML) with its numbered reference list.

    Parameters
    ----------
    engine : str
        Up-sampling engine (``"sh"``, ``"interp"`` or ``"qid2"``).
    settings : mapping or None
        The engine's settings, as stored in ``UpsamplingEngineSettings``.
    n_acquired : int
        Acquired diffusion-weighted directions in the up-sampled shells.
    n_synth : int
        Synthesised directions.
    shells : sequence of float
        b-values (s/mm^2) of the up-sampled shells.
    version : str, optional
        qid2 version.
    target_directions : str, optional
        ``"repulsion"`` or the name of the user's direction file (``TargetDirections``).
    seed : int, optional
        Random seed of the run.

    Returns
    -------
    str
        HTML: one ``<p>`` with the paragraph and the limits, then an ``<ol>`` of references.

    """
    settings = dict(settings or {})
    cite = _Citer()  # numbers follow the order of the calls below, i.e. of the text
    ver = f" {escape(str(version))}" if version else ""
    sentences = [
        f"Diffusion-weighted images were up-sampled in q-space with qid2{ver}, a BIDS app built "
        f"on Nipype{cite('nipype')} and DIPY{cite('dipy')} that reads and writes data in the "
        f"Brain Imaging Data Structure{cite('bids')}."
    ]
    if target_directions in (None, "repulsion"):
        targets = (
            "chosen by electrostatic repulsion so as to fill the angular gaps between the "
            f"acquired ones{cite('jones1999')}"
        )
    else:
        targets = f"read from the user-supplied file {escape(str(target_directions))}"
    total = "a total of " if len(shells) > 1 else ""
    sentences.append(
        f"For {_shells_text(shells)}, {total}{int(n_synth)} new gradient directions were added "
        f"to the {int(n_acquired)} acquired ones, {targets}."
    )
    engine_txt = _engine_text(engine, settings, cite)
    sentences.append(f"{engine_txt}{_settings_text(settings)}.")
    sentences.append(
        "The acquired volumes were kept unchanged and the synthesised volumes appended."
    )
    if seed is not None:
        sentences.append(f"The random seed was {escape(str(seed))}.")
    sentences.append(
        f"Quality was checked by fitting the diffusion tensor{cite('basser1994')} (DIPY) to the "
        "acquired volumes only and to the merged data and comparing fractional anisotropy (FA), "
        "and by a self-check that hides some acquired directions, predicts them with the same "
        "engine from the remaining ones and reports the normalised error and its effect on FA."
    )
    if engine != "qid2":
        sentences.append(
            f"qid2 is built around the QID² image-conditioned diffusion model{cite('qid2')}; "
            f"this run used the classical '{escape(engine)}' engine instead."
        )
    sentences.append(_limits_text(engine))
    text = " ".join(sentences)
    return f'<p class="methods">{text}</p>\n{cite.html()}'
