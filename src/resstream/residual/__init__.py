"""Residual kinds: one room each. Importing this package registers every kind.

    base.py       the ResidualStream contract and the one registry (kind, options, reference)
    config.py     ResidualConfig (a kind and its options) and residual specs (kind:key=value,...)
    compiled.py   compiled regions around the depth mixing, with a fallback to eager
    prenorm.py  dense.py  delta.py  scaled.py     small kinds, each with its float64 reference
    attnres/      Full and Block Attention Residuals, depth_swa
    hyper/        hyper-connections (hc) and mHC (mhc)
"""
from resstream.residual.base import (Boundary, Kind, ResidualStream, State, available_kinds, build_residual, describe, get_kind,
                                     import_rooms, register)
from resstream.residual.config import ResidualConfig, format_spec, parse_spec, parse_specs, spec_label
# Every module and subpackage here registers its kinds when imported; PreNorm, the baseline,
# first and the rest by name (this order is the order of `resstream kinds`).
import_rooms(__name__, __path__, first=("prenorm", "attnres", "hyper"))

__all__ = ["Boundary", "Kind", "ResidualConfig", "ResidualStream", "State", "available_kinds", "build_residual", "describe", "format_spec",
           "get_kind", "parse_spec", "parse_specs", "register", "spec_label"]
