"""Scale-out on PyTorch's own engine: DDP, FSDP2 (``fully_shard``), pipeline stages
(``torch.distributed.pipelining``) with the AttnRes cross-stage cache, DCP checkpoints.

    config.py      the [parallel] config section
    mesh.py        the DeviceMesh ("pp", "dp") and its process groups
    plan.py        where the model is cut and what each cut carries (cached or not)
    stage.py       what a stage runs; the per-rank store shared by its virtual stages
"""
from resstream.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
