"""Realistic DWI simulator driven by real-data fibre peaks, FA and tissue priors.

See docs/simulator.md. Plain numpy functions on arrays: `simulate_brain` (one brain for any
protocol), `evaluation_brain` (a held-out brain with a full and a short acquisition),
`SimulatedSource` (training volumes for `qid2_bidsapp.model`).
"""

from .anatomy import Anatomy, default_drivers_dir, drivers_available, load_anatomy
from .brain import BrainPlan, SimulatedBrain, plan_brain, render_brain, simulate_brain
from .heldout import EvaluationBrain, evaluation_brain
from .protocol import acquisition, uniform_shell, uniform_subset
from .signal import TissueParams, tissue_signal, watson_tau
from .source import SimulatedSource

__all__ = [
    "Anatomy",
    "BrainPlan",
    "EvaluationBrain",
    "SimulatedBrain",
    "SimulatedSource",
    "TissueParams",
    "acquisition",
    "default_drivers_dir",
    "drivers_available",
    "evaluation_brain",
    "load_anatomy",
    "plan_brain",
    "render_brain",
    "simulate_brain",
    "tissue_signal",
    "uniform_shell",
    "uniform_subset",
    "watson_tau",
]
