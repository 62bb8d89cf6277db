"""Training: ``train(TrainConfig(...))`` for ``ssa train`` runs, and the pieces experiments reuse.

config   TrainConfig (+ validation, older layouts)      data     WindowSampler
optim    OptimConfig, build_optimizer, lr_factor          loss     lm_loss, evaluate_loss
loop     train_step, fit (no run directory)               methods  attention methods by name
rundir   run directory: layout, plan, resume              models   named sizes, loading
writer   RunDir: manifest, checkpoints, final/, run.json  metrics_log  metrics.jsonl
checkpoint  safetensors + JSON checkpoint files, RNG      lock     one run per directory (flock)
limits   settings that cannot fit (data, memory)          launch   torchrun
trainer  train = setup / run_steps / finish
"""

from selective_attention.train.config import TrainConfig
from selective_attention.train.trainer import train

__all__ = ["TrainConfig", "train"]
