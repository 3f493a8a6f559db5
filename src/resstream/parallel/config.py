"""The ``[parallel]`` section of a run config: how the processes of a ``torchrun`` launch
split the work. The data-parallel degree is what is left: world size / tp."""
from __future__ import annotations

from dataclasses import dataclass

from resstream.config import ConfigBase, require


@dataclass
class ParallelConfig(ConfigBase):
    """tp: tensor-parallel degree (ranks that split each attention's heads and each MLP's
    hidden units, resstream.parallel.tensor); 1 = off."""

    tp: int = 1

    def validate(self) -> None:
        require(self.tp >= 1, f"parallel.tp: must be >= 1 (1 = no tensor parallelism), got {self.tp}")
