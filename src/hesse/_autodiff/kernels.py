"""Kernels that lack the derivatives curvature needs, and the fallback that has them.

Fused kernels often implement only the first derivative: PyTorch's flash and
memory-efficient attention (``scaled_dot_product_attention``) have no double backward
and no forward-mode derivative (pytorch#128971, #117629), nor have the mkldnn (CPU) and
cuDNN (CUDA) RNN kernels forward mode. The reference kernels have both and compute the
same function: the math attention kernel and the native RNN. `with_fallback` runs a
product; when it fails for such a gap it says so once, records that this kind of product
needs the reference kernels (`Problem.fallbacks`: the others keep the fast ones, e.g. an
LSTM's double-backward HVP on mkldnn while its forward-mode GGN product falls back) and
recomputes, exactly. A gap no fallback closes is refused with the operation and the
module that runs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "check_twice_differentiable",
    "differentiable_kernels",
    "find_module",
    "is_kernel_gap",
    "with_fallback",
]

T = TypeVar("T")

_GAP = re.compile(
    r"derivative for (aten::)?\S+ is not implemented|forward (mode )?AD|double backward|"
    r"does not support (double )?backward|is not implemented for|not implemented yet|"
    r"differentiate twice|can only be called in training mode",
    re.IGNORECASE,
)


def is_kernel_gap(err: BaseException) -> bool:
    """Whether ``err`` says a kernel lacks a derivative (double backward, forward mode)."""
    return isinstance(err, (RuntimeError, NotImplementedError)) and bool(_GAP.search(str(err)))


@contextlib.contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Run attention on the math kernel and RNNs on the native kernel (no mkldnn, no
    cuDNN): the same functions, with every derivative."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        with warnings.catch_warnings():  # torch notes TF32 on oneDNN when flags are set
            warnings.filterwarnings("ignore", message="TF32 acceleration")
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        try:
            yield
        finally:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TF32 acceleration")
                stack.close()


def _op_name(err: BaseException) -> str:
    text = str(err)
    m = re.search(r"aten::(\w+)", text) or re.search(r"forward AD with (\w+)", text)
    if m:
        return m.group(1)
    if "once_differentiable" in text:
        return "a custom autograd.Function marked @once_differentiable"
    return text.strip().splitlines()[0][:120]


def _norm(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower()).removesuffix("backward")


def _created(out: Any, inputs: tuple[Any, ...]) -> list[Any]:
    """The autograd nodes a module's forward created (its output's graph, down to its
    inputs' nodes; bounded)."""
    stop = {id(t.grad_fn) for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn}
    roots = [t.grad_fn for t in (out if isinstance(out, (tuple, list)) else (out,))]
    todo = [r for r in roots if r is not None]
    seen, names = set(), []
    while todo and len(seen) < 500:
        node = todo.pop()
        if node is None or id(node) in seen or id(node) in stop:
            continue
        seen.add(id(node))
        names.append(node)
        todo += [n for n, _ in node.next_functions]
    return names


def find_module(model: nn.Module, run: Callable[[], Any], op: str) -> str | None:
    """The name of the innermost module of ``model`` whose forward creates the autograd
    node of the operation ``op`` (or, for a custom Function, a custom node), from one
    forward pass by ``run``; ``None`` when none does."""
    names = {m: n for n, m in model.named_modules()}
    found: list[tuple[int, str]] = []
    custom = "autograd.Function" in op
    target = _norm(op)

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        for node in _created(out, args):
            hit = custom and isinstance(node, torch.autograd.function.BackwardCFunction)
            if hit or (target and _norm(type(node).__name__).startswith(target)):
                found.append((names[mod].count(".") + bool(names[mod]), names[mod]))
                return

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.enable_grad():
            run()
    except Exception:
        pass
    finally:
        for h in hooks:
            h.remove()
    if not found:
        return None
    _depth, name = max(found)
    return name or type(model).__name__


def _once_differentiable(node: Any) -> bool:
    """Whether ``node`` is a custom ``autograd.Function`` whose backward is marked
    ``@once_differentiable`` (its gradient is computed without a graph: differentiating
    it again would silently give zero)."""
    if not isinstance(node, torch.autograd.function.BackwardCFunction):
        return False
    backward = getattr(getattr(node, "_forward_cls", None), "backward", None)
    code = getattr(backward, "__code__", None)
    # torch's once_differentiable wraps the backward (functools.wraps keeps its name)
    return (
        getattr(backward, "__wrapped__", None) is not None
        and code is not None
        and code.co_filename.replace("\\", "/").endswith("torch/autograd/function.py")
    )


def check_twice_differentiable(problem: Any, root: torch.Tensor) -> None:
    """Refuse, before a second-order product, a graph with a custom Function whose
    backward is once differentiable: PyTorch would treat its gradient as a constant and
    the product would be silently wrong. Checked once a problem."""
    if problem.graph_checked or root.grad_fn is None:
        return
    todo, seen = [root.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if _once_differentiable(node):
            name = node._forward_cls.__name__
            where = problem.locate("autograd.Function")
            raise NotImplementedError(
                f"second derivatives need the backward of the custom autograd.Function "
                f"{name!r}{f' (in module {where!r})' if where else ''} to be differentiable, "
                "but it is marked @once_differentiable: its gradient would be taken as a "
                "constant and the product would be wrong. Give it a differentiable backward "
                "(or a jvp for forward mode)."
            )
        todo += [n for n, _ in node.next_functions]
    problem.graph_checked = True


def _user_stacklevel() -> int:
    """The stack level of the first frame outside hesse (for warnings)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the hesse package
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(root):
        frame, level = frame.f_back, level + 1
    return level


def with_fallback(problem: Any, what: str, fn: Callable[[], T]) -> T:
    """``fn()`` (the product ``what`` of ``problem``); on a kernel's missing derivative,
    once for that product of the problem, a warning and ``fn()`` again on the reference
    kernels (and for that product from then on)."""
    if what in problem.fallbacks:
        with differentiable_kernels():
            return fn()
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as err:
        if not is_kernel_gap(err):
            raise
        first = err
    problem.fallbacks.add(what)
    try:
        with differentiable_kernels():
            out = fn()
    except (RuntimeError, NotImplementedError) as err:
        if not is_kernel_gap(err):
            raise
        op = _op_name(err)
        where = problem.locate(op)
        raise NotImplementedError(
            f"{what} needs a derivative that {op!r} does not have"
            f"{f' (in module {where!r})' if where else ''}, and no fallback kernel computes "
            f"it (the math attention and native RNN kernels were tried): {str(err).splitlines()[0]}"
        ) from None
    warnings.warn(
        f"hesse: {what} needs a derivative that {_op_name(first)!r} does not have; for it, "
        "this problem now runs attention on the math kernel and RNNs on the native kernel "
        "(the same functions, exact; slower than the fused kernels)",
        stacklevel=_user_stacklevel(),
    )
    return out
