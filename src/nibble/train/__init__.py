"""Training: config, optimizer and schedule, the loop, checkpoints, metrics, and the task pipelines.

The package is also callable: ``nibble.train(config)`` runs :func:`nibble.train.api.train`.
"""

import sys
import types

from nibble.train.config import TrainConfig, resolve_config


class _CallableModule(types.ModuleType):
    # `nibble.train` names this package (nibble.train.config, ...) and the training function at once: Python sets
    # a package's submodules as its attributes, so a plain function of that name would be replaced on import.
    def __call__(self, config, **overrides):
        from nibble.train.api import train

        return train(config, **overrides)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["TrainConfig", "resolve_config"]
