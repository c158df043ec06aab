"""Data parallelism with ``torch.distributed``: each rank holds a shard of the data, and
every quantity hesse returns is the full-data one, identical on every rank.

The rule is one all-reduce (a sum) per product, of all its columns at once, after each
rank has summed its own batches with their global weights (``n_b / N`` with ``N`` the
samples of all ranks, for ``reduction="mean"``). Collectives go through the problem's
process group (gloo on CPU, NCCL on CUDA: the backend is the user's); a rank that dies
makes the others fail after the group's timeout with a message that says so.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LOCAL", "Group", "backend_device", "resolve_group"]

LOCAL = "local"
"""``process_group=LOCAL``: this process's data only, even under torch.distributed."""


def resolve_group(process_group: Any) -> Any:
    """The process group a problem reduces over: ``None`` when torch.distributed is not
    initialised (and none was given) or for ``LOCAL``, the default group when it is
    initialised with several ranks, or the one given."""
    if isinstance(process_group, str) and process_group == LOCAL:
        return None
    initialised = dist.is_available() and dist.is_initialized()
    if process_group is None:
        return dist.group.WORLD if initialised and dist.get_world_size() > 1 else None
    if not initialised:
        raise ValueError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group (torchrun sets up the environment) first"
        )
    return process_group


def backend_device(backend: str) -> torch.device | None:
    """The device a backend's collectives need their tensors on: CUDA for NCCL alone
    (``"nccl"``; a mixed ``"cpu:gloo,cuda:nccl"`` takes both), ``None`` when any will do.
    hesse's small tensors (sample counts, flags, probes drawn on the CPU) are moved there
    for the collective and back."""
    return torch.device("cuda") if backend.strip().lower() == "nccl" else None


def digest(value: Any) -> str:
    """A short fingerprint of an argument: a tensor's shape, dtype and values; the items
    of a dict or sequence; the ``repr`` of anything else."""
    if isinstance(value, Tensor):
        h = hashlib.sha256(f"{tuple(value.shape)}:{value.dtype}".encode())
        h.update(value.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()[:32]
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{digest(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(digest(v) for v in value) + "]"
    return repr(value)


class Group:
    """The collectives a distributed problem needs, with clear errors."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = backend_device(str(dist.get_backend(group)))

    def _placed(self, t: Tensor) -> Tensor:
        """``t`` contiguous, on the backend's device. Collectives work on contiguous
        memory: a strided view is copied first (reducing a view in place would leave the
        caller's tensor unreduced)."""
        t = t.contiguous()
        return t if self.device is None or t.device.type == self.device.type else t.to(self.device)

    def _run(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except RuntimeError as err:
            raise RuntimeError(
                f"hesse: the {what} across {self.size} ranks failed on rank {self.rank} (a "
                f"rank died, or did not reach the same call, within the group's timeout): "
                f"{str(err).splitlines()[0]}"
            ) from err

    def all_reduce(self, t: Tensor, what: str = "product", op: Any = None) -> Tensor:
        """The sum (or ``op``, a ``ReduceOp``) over ranks, on ``t``'s device (use the
        result: ``t`` itself may be left unreduced); identical on every rank."""
        r = self._placed(t)
        op = dist.ReduceOp.SUM if op is None else op
        self._run(f"all-reduce of the {what}", lambda: dist.all_reduce(r, op, self.group))
        return r.to(t.device)

    def total(self, value: float, what: str) -> float:
        """The sum of a number over the ranks (sample counts, flags)."""
        return float(self.all_reduce(torch.tensor([float(value)], dtype=torch.float64), what))

    def max(self, value: float, what: str = "agreement on a size") -> float:
        """The largest ``value`` over the ranks (sizes that must agree, such as chunks;
        the slowest rank's time)."""
        t = torch.tensor([float(value)], dtype=torch.float64)
        return float(self.all_reduce(t, what, dist.ReduceOp.MAX))

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s tensor on every rank, on ``t``'s device (use the result)."""
        r = self._placed(t)
        root = dist.get_global_rank(self.group, src) if self.group is not None else src
        self._run("broadcast", lambda: dist.broadcast(r, root, group=self.group))
        return r.to(t.device)

    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * self.size
        self._run(what, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def check_same(self, call: str, args: dict[str, Any]) -> None:
        """Refuse a call whose arguments differ between the ranks (a vector, a start
        vector, a damping, a count: each rank would compute with its own, and the
        collectives would mix them or hang), naming the argument and the ranks; one
        gather of a digest per argument, raised on every rank alike."""
        mine = {k: digest(v) for k, v in args.items()}
        everyone = self.gather_objects(mine, f"comparison of the arguments of {call}")
        for key in mine:
            bad = [r for r, d in enumerate(everyone) if d.get(key) != everyone[0].get(key)]
            if bad:
                raise ValueError(
                    f"{call}: the argument {key!r} differs between the ranks: rank(s) {bad} "
                    "passed another value than rank 0. Every rank must make the same call "
                    "with the same arguments (only the data is sharded)"
                )

    def check_same_model(self, names: list[str], params: list[Tensor]) -> None:
        """Refuse ranks whose selected parameters differ (in names, shapes, dtype or
        values: a checksum), naming the ranks that differ from rank 0."""
        h = hashlib.sha256()
        for n, p in zip(names, params, strict=True):
            h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
            h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        digests = self.gather_objects(h.hexdigest(), "comparison of the parameters")
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise ValueError(
                f"the ranks' models differ: the selected parameters (names, shapes, dtype or "
                f"values) of rank(s) {bad} are not rank 0's; every rank must hold the same "
                "model (broadcast the weights, or seed the initialisation alike)"
            )
