"""resstream: pluggable residual streams for transformer language models."""
from resstream.config import CompareConfig, ConfigError, DataConfig, TrainConfig
from resstream.model.config import ModelConfig
from resstream.residual.config import ResidualConfig
from resstream.runs.config import RunConfig
from resstream.model import LM
from resstream.residual import available_kinds
from resstream.runtime import tune_allocator

__version__ = "0.1.0"
__all__ = ["LM", "ModelConfig", "ResidualConfig", "DataConfig", "TrainConfig", "RunConfig", "CompareConfig", "ConfigError", "available_kinds", "tune_allocator", "__version__"]
