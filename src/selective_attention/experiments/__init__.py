"""The paper's mechanism experiments (``ssa experiment NAME``); see ``registry.EXPERIMENTS`` for the registry."""

from selective_attention.experiments.registry import EXPERIMENTS, run_experiment

__all__ = ["EXPERIMENTS", "run_experiment"]
