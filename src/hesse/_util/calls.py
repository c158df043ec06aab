"""``torch.func.functional_call`` that leaves the module as it found it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["swapped_call"]


def swapped_call(
    module: nn.Module,
    tensors: Mapping[str, Tensor],
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``functional_call(module, tensors, args, kwargs)``, after which every module's
    parameters and buffers are the tensors it held before.

    torch 2.13's ``functional_call`` does not restore them on a module that appears
    twice in the model (one ``nn.Linear`` used at two places of a ``Sequential``): it
    swaps each of the module's names in turn and restores the second swap's
    original, the replacement, so the model would keep a detached copy in place of the
    user's ``nn.Parameter`` (its optimiser would then train a tensor the model no
    longer uses). Restored here by identity, whatever the call does.
    """
    held = [
        (store, name, t)
        for m in module.modules()
        for store in (m._parameters, m._buffers)
        for name, t in store.items()
    ]
    try:
        return functional_call(module, dict(tensors), args, kwargs)
    finally:
        for store, name, t in held:
            if store.get(name) is not t:
                store[name] = t
