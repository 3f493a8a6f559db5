"""Residual kinds. Importing this package registers every kind."""
from resstream.residual.base import ResidualStream, State, available_kinds, build_residual, register
from resstream.residual import prenorm as _prenorm  # noqa: F401  (registers)
from resstream.residual import attnres as _attnres  # noqa: F401
from resstream.residual import hyper as _hyper  # noqa: F401
from resstream.residual import dense as _dense  # noqa: F401
from resstream.residual import delta as _delta  # noqa: F401
from resstream.residual import depth_swa as _depth_swa  # noqa: F401
from resstream.residual import scaled as _scaled  # noqa: F401

__all__ = ["ResidualStream", "State", "available_kinds", "build_residual", "register"]
