"""Training on several processes (``torchrun``): the process group, sums over ranks, every rank's random
streams for an exact resume, and a digest to check that replicas agree."""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.train.devices import resolve_device


def distributed_setup(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun: NCCL when this process
    trains on a GPU (made its current device), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        device = device if device is not None else resolve_device("auto")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def trainable_digest(model: nn.Module) -> str:
    """SHA-256 of every trainable tensor, to check that replicas agree."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, Python and NumPy RNG states, in types ``torch.load(weights_only=True)`` reads."""
    import numpy as np

    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    saved = state.get("numpy")
    if saved:
        np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["position"],
                             saved["has_gauss"], saved["gauss"]))
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def gathered_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    if world == 1:
        return [_rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, _rng_state())
    return states


def restore_rng_states(saved: Any, rank: int, world: int) -> None:
    """Each rank continues its own streams; a run cannot change its number of processes on resume."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != world:
        raise SurgeonError(f"cannot resume: the run was saved with {len(states)} process(es) and this one has "
                           f"{world} (the data order and random streams depend on it)")
    _set_rng_state(states[rank])
