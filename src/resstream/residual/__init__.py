"""Residual kinds: one room each. Importing this package registers every kind.

    base.py       the ResidualStream contract and the one registry (kind, options, reference)
    config.py     ResidualConfig (a kind and its options) and residual specs (kind:key=value,...)
    compiled.py   compiled regions around the depth mixing, with a fallback to eager
    prenorm.py  dense.py  delta.py  scaled.py     small kinds, each with its float64 reference
    attnres/      Full and Block Attention Residuals, depth_swa
    hyper/        hyper-connections (hc) and mHC (mhc)
"""
from resstream.residual.base import (Kind, ResidualStream, State, available_kinds, build_residual, describe, get_kind,
                                     register)
from resstream.residual.config import ResidualConfig, format_spec, parse_spec, parse_specs, spec_label
from resstream.residual import prenorm as _prenorm  # noqa: F401  (registers)
from resstream.residual import attnres as _attnres  # noqa: F401
from resstream.residual import hyper as _hyper  # noqa: F401
from resstream.residual import dense as _dense  # noqa: F401
from resstream.residual import delta as _delta  # noqa: F401
from resstream.residual import scaled as _scaled  # noqa: F401

__all__ = ["Kind", "ResidualConfig", "ResidualStream", "State", "available_kinds", "build_residual", "describe", "format_spec",
           "get_kind", "parse_spec", "parse_specs", "register", "spec_label"]
