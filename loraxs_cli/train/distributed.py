"""One training process or several under torchrun: the process group, this process's device, and the
reductions the loop needs. With WORLD_SIZE > 1 (gloo on CPU, nccl on GPU) the model is wrapped in
DistributedDataParallel (`--distributed ddp`), or its base is sharded with FSDP2 (`--distributed fsdp`,
fsdp.py: the trained tensors stay plain and replicated, their gradients averaged by `average_`);
rank 0 alone writes the run directory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..devices import parse_device
from ..envvars import env_int


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "ddp"  # --distributed: ddp or fsdp

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run directory and evaluates."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """The base is sharded across the processes (--distributed fsdp with several processes)."""
        return self.enabled and self.mode == "fsdp"

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """The sums over all processes (float64)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def average_(self, grads: list[torch.Tensor]) -> None:
        """Average gradients over the processes, in place (what DDP does for a wrapped model): one
        all-reduce of them all flattened per dtype and device (hundreds of r x r R's are one message)."""
        kinds: dict[tuple, list[torch.Tensor]] = {}
        for grad in grads:
            kinds.setdefault((grad.dtype, grad.device), []).append(grad)
        for group in kinds.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            torch.distributed.all_reduce(flat)
            flat.div_(self.world)
            for grad, value in zip(group, flat.split([g.numel() for g in group]), strict=True):
                grad.copy_(value.view_as(grad))

    def from_rank0(self, value: float, device: torch.device) -> float:
        """Rank 0's `value` on every process."""
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.broadcast(tensor, src=0)
        return float(tensor.item())

    @property
    def all_reduce(self):
        """torch.distributed.all_reduce with several processes, else None (for collective init passes)."""
        return torch.distributed.all_reduce if self.enabled else None


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return env_int("WORLD_SIZE", 1, minimum=1)


def init_distributed(device: str | None, mode: str = "ddp") -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
    world = world_size()
    local_rank = env_int("LOCAL_RANK", 0)
    if device:
        chosen = parse_device(device)
    elif torch.cuda.is_available():
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        env_int("RANK", 0)  # a bad value is one line here, not torch's traceback
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank, mode), chosen


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if hasattr(model, "module") else model


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel with several processes, else itself (also a model whose
    base FSDP2 has sharded: it needs no wrapper, and its trained tensors are averaged by hand)."""
    if not dist.enabled or dist.sharded:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )
