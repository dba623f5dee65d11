"""The learner ranks' collectives: what the update needs from torch.distributed, and nothing else.

:class:`Single` is the world of one rank (every operation is the identity); :class:`Group` wraps
the default torch.distributed process group of the learner ranks (gloo on CPU, NCCL on GPU), which
each learner actor joins with :func:`init_group` (learner actors run no vLLM engine, so the
default group is theirs). The Learner code is the same at world size 1 and N.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


class Single:
    """One rank: collectives are identities."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_rows(self, local: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
        """The full (total, ...) tensor from each rank's rows (here: this rank holds them all)."""
        out = local.new_zeros((total, *local.shape[1:]))
        out[rows] = local
        return out

    def barrier(self) -> None:
        pass


class Group(Single):
    """The default process group of ``world_size`` learner ranks."""

    def __init__(self):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        """Where the backend's collectives run (NCCL takes CUDA tensors only, gloo CPU ones):
        callers pass tensors from anywhere and get them back on their own device."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out.to(t.device)

    def gather_rows(self, local: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's ``local`` (its ``rows`` of a (total, ...) tensor) assembled on every rank.

        Each rank's part is padded to the largest part for ``all_gather`` (equal shapes), with its
        row indices alongside; the padding rows are dropped.
        """
        home, local = local.device, local.to(self.device)
        count = torch.tensor([len(rows)], dtype=torch.long, device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        width = int(max(c.item() for c in counts))
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: len(rows)] = local
        idx = torch.full((width,), -1, dtype=torch.long, device=self.device)
        idx[: len(rows)] = rows.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        ids = [torch.empty_like(idx) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        dist.all_gather(ids, idx)
        out = local.new_zeros((total, *local.shape[1:]))
        for part, index in zip(parts, ids):
            keep = index >= 0
            out[index[keep]] = part[keep]
        return out.to(home)

    def barrier(self) -> None:
        dist.barrier()


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port (rank 0 serves the group's store there)."""
    try:
        import ray

        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except ImportError:  # pragma: no cover - ray is a dependency
        host = "127.0.0.1"
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def init_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> Group:
    """Join the learner ranks' default process group (rank 0 serves the TCP store at host:port).

    A rank that waits longer than ``timeout_s`` in a collective (a peer died) raises instead of
    hanging.
    """
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return Group()
