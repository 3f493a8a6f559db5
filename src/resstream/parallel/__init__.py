"""Scale-out on PyTorch's own engine: DDP, FSDP2 (``fully_shard``), pipeline stages
(``torch.distributed.pipelining``) with the AttnRes cross-stage cache, tensor parallelism
(DTensor colwise/rowwise plans), DCP checkpoints.

    config.py      the [parallel] config section and the checks that need the process count
    mesh.py        the DeviceMesh ("pp", "dp", "tp") and the process groups cut from it
    plan.py        where the model is cut and what each cut carries (cached or not); Eq. 7/8
    stage.py       what a stage runs; the per-rank store shared by its virtual stages
    pipeline.py    this rank's PipelineStages, the schedule, traffic counters, forward-only relay
    fsdp.py        one FSDP2 unit per transformer layer, bf16 mixed precision
    grads.py       gradients no wrapper synchronises (residual stream, tied embedding), global norm
    tensor.py      tensor parallelism: heads and MLP hidden units split, the async all-reduce
    runtime.py     one interface for the trainer: single process / DDP, FSDP, pipeline, TP
    checkpoint.py  sharded checkpoints (DCP, safetensors), read on any layout or in one process
"""
from resstream.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
