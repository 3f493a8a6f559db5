"""Hyper-connections and mHC: the residual as n parallel streams.

    streams.py    the n-stream wiring both share (init, read, write, finish) and their options
    hc.py         hc: static or dynamic coefficients (Zhu et al., ICLR 2025)
    mhc.py        mhc: non-negative read/write, doubly stochastic mixing (Xie et al., 2025)
    sinkhorn.py   Sinkhorn-Knopp with a hand-written backward, for mhc
    reference.py  the float64 references of both
"""
from resstream.residual.base import import_rooms

import_rooms(__name__, __path__, first=("hc", "mhc"))  # registers the family's kinds
