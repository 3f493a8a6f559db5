"""The comparison room: multi-kind, multi-seed runs, statistics and the report."""
from resstream.compare.run import CompareOptions, compare

__all__ = ["compare", "CompareOptions"]
