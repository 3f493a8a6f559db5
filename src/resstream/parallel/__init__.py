"""Parallelism with PyTorch's own engine: tensor parallelism (DTensor over a DeviceMesh)."""
from resstream.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
