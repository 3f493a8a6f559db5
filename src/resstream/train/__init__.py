"""The training room: setup, loop, evaluation, optimizer and schedule, distributed processes."""
from resstream.train.loop import RESUMABLE_KEYS, RunResult, train

__all__ = ["train", "RunResult", "RESUMABLE_KEYS"]
