"""Training: config, optimizer and schedule, the loop, checkpoints, metrics, and the task pipelines."""

from nibble.train.config import TrainConfig, resolve_config

__all__ = ["TrainConfig", "resolve_config"]
