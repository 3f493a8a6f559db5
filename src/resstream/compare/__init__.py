"""The comparison room: multi-kind, multi-seed runs, statistics and the report."""
from resstream.compare.run import CompareOptions, compare, parse_residuals

__all__ = ["compare", "CompareOptions", "parse_residuals"]
