"""Discrete-event simulator of a power-managed LLM cluster, reusing the live queue and clock policies."""

from services.sim.engine import SimConfig, SimResult, simulate
from services.sim.predictor import ConfusionPredictor
from services.sim.step_model import StepModel
from services.sim.workload import Workload, make_workload

__all__ = [
    "ConfusionPredictor",
    "SimConfig",
    "SimResult",
    "StepModel",
    "Workload",
    "make_workload",
    "simulate",
]
