"""The paper's mechanism experiments (``ssa experiment NAME``); see ``cli.EXPERIMENTS`` for the registry."""

from selective_attention.experiments.cli import EXPERIMENTS, run_experiment

__all__ = ["EXPERIMENTS", "run_experiment"]
