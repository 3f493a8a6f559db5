"""The Attention Residuals family: sublayers read a softmax mixture of earlier sources with a
pseudo-query of their own (Kimi Team, "Attention Residuals", arXiv:2603.15031).

    queries.py    PseudoQueries: the pseudo-query and key-norm parameters every member shares
    kernels.py    autograd kernels: logit caches, weighted sums, gradient sums
    fused.py      their arithmetic: eager, or compiled kernels (residual/compiled.py)
    phases.py     Block's two-phase kernels (phase 1 over completed blocks, phase-2 merge)
    recompute.py  the ``recompute`` option: sublayer inputs recomputed in backward
    lean.py       the lean inference path (LM.decode): sources and logits in reused buffers
    full.py       attnres: every earlier output is a source
    block.py      block_attnres: block sums are the sources
    depth_swa.py  depth_swa: a sliding window over depth
    reference.py  the float64 references of all three
"""
from resstream.residual.base import import_rooms

import_rooms(__name__, __path__, first=("full", "block"))  # registers the family's kinds
