"""The training room: loop, optimizer and schedule, checkpoints, batches, distributed."""
from resstream.train.checkpoint import CheckpointError, load_run
from resstream.train.loop import RESUMABLE_KEYS, RunResult, train

__all__ = ["train", "RunResult", "load_run", "CheckpointError", "RESUMABLE_KEYS"]
