"""Depth measurements of a model (``measure_depth``) or of a trained run (``diagnose_run``)."""
from resstream.diagnostics.depth import mean_depth, measure_depth, mixing_array
from resstream.diagnostics.run import diagnose_run, format_depth

__all__ = ["measure_depth", "mean_depth", "mixing_array", "diagnose_run", "format_depth"]
