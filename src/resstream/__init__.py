"""resstream: pluggable residual streams for transformer language models."""
from resstream.config import CompareConfig, ConfigError, DataConfig, ModelConfig, ResidualConfig, RunConfig, TrainConfig
from resstream.model import LM
from resstream.residual import available_kinds

__version__ = "0.1.0"
__all__ = ["LM", "ModelConfig", "ResidualConfig", "DataConfig", "TrainConfig", "RunConfig", "CompareConfig", "ConfigError", "available_kinds", "__version__"]
