"""``residual.recompute``: the mixture x_l that sublayer l reads is not kept for backward.

Its norm would keep it: the model runs each sublayer under the stream's ``input_hooks``,
which make autograd store x_l as a recipe, and x_l is recomputed from the sources, bitwise
the same, in backward. Saves one [B, T, D] per sublayer for about one more forward of the
mixing (tests/residual/test_attnres.py checks equal gradients and the memory saved).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

from resstream.config import ConfigBase
from resstream.residual.base import State


@dataclass
class RecomputeOption(ConfigBase):
    """recompute: keep less for backward and recompute it there (less memory, more time)."""

    recompute: bool = False


class Recipe:
    """Stands in for a saved sublayer input: recomputes it on the first unpack of a backward
    and hands the same tensor to the other unpacks of that input, then lets it go."""

    def __init__(self, fn: Callable[[], Tensor]) -> None:
        self.fn, self.packs, self.value = fn, 0, None

    def unpack(self) -> Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn()
        x = self.value
        self.packs -= 1
        if self.packs <= 0:
            self.value = None
        return x


def _tensor_key(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), tuple(t.stride()))


def recompute_hooks(x: Tensor, recipe: Recipe) -> torch.autograd.graph.saved_tensors_hooks:
    """saved_tensors_hooks under which autograd saves ``x`` as ``recipe`` (which recomputes it, no
    grad) instead of the tensor, so x is freed as soon as the code that read it lets it go."""
    # not x itself: autograd keeps this pack function with every tensor it saves under it
    key, ptr, xid = _tensor_key(x), x.data_ptr(), id(x)

    def pack(t: Tensor):
        # x is a plain tensor; subclasses (DTensors under tensor parallelism) have no storage
        # of their own to compare. (The cheap tests first: most saved tensors are not x.)
        if id(t) == xid or (type(t) is Tensor and t.data_ptr() == ptr and _tensor_key(t) == key):
            recipe.packs += 1
            return recipe
        # every other saved tensor as a detached view (autograd restores its history on unpack):
        # kept as is, an op's saved output would hold its own node, a cycle through C++ that
        # nothing frees when no backward runs (a forward with grad, its result dropped)
        return t.detach()

    def unpack(obj):
        return obj.unpack() if obj is recipe else obj

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class RecomputesInput:
    """Mixin of a stream with the ``recompute`` option (Full and Block AttnRes): it says which
    inputs are sources already (nothing to recompute) and how to recompute the others."""

    supports_recompute: ClassVar[bool] = True

    def recomputes(self, l: int) -> bool:
        """Whether sublayer l's input is recomputed in backward rather than kept."""
        return bool(self.options.recompute)

    def input_hooks(self, state: State, l: int, x: Tensor) -> AbstractContextManager:
        """Where sublayer l's input is recomputed: a context for running sublayer l on
        x = read(state, l), under which autograd keeps x as a recipe instead of a tensor (x is
        recomputed from the sources in backward, bitwise the same). Elsewhere, or when x is
        itself a source, a no-op context."""
        if not (self.recomputes(l) and torch.is_grad_enabled() and x.requires_grad) or self._is_source(state, x):
            return nullcontext()
        return recompute_hooks(x, self._input_recipe(state, l))

    def _is_source(self, state: State, x: Tensor) -> bool:
        raise NotImplementedError

    def _input_recipe(self, state: State, l: int) -> Recipe:
        raise NotImplementedError
