"""Where a run runs: the device ``--device`` names (checked against the GPUs
there), the process's torch settings and seeds, and, under ``torchrun`` with
WORLD_SIZE > 1, the default process group (gloo on CPU, NCCL on CUDA) and
DistributedDataParallel."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dcq_ops.training.config import ConfigError, TrainConfig, parse_device


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the default process group when launched
    by torchrun with WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    """The device of ``--device`` ("auto": this rank's GPU, LOCAL_RANK, when CUDA is
    available, else the CPU); ConfigError for a GPU that is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(parse_device(name))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is False)")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: there is no GPU {device.index} "
                              f"({torch.cuda.device_count()} visible)")
    return device


def start_process(config: TrainConfig) -> tuple[torch.device, int, int]:
    """(device, rank, world size) of this process, set up for ``config``: its threads,
    the process group, the current GPU, deterministic algorithms, and one seed for the
    model initialisation (the same on every rank: DDP broadcasts rank 0's anyway, and
    every head starts from the same backbone)."""
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world_size = setup_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    return device, rank, world_size


def wrap_distributed(backbone: nn.Module, head: nn.Module, device: torch.device,
                     world_size: int) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) as the step calls them: under several ranks the backbone (and a
    head with parameters) in DistributedDataParallel, else themselves."""
    if world_size == 1:
        return backbone, head
    ids = [device.index] if device.type == "cuda" else None
    model = nn.parallel.DistributedDataParallel(backbone, device_ids=ids)
    if any(p.requires_grad for p in head.parameters()):
        head = nn.parallel.DistributedDataParallel(head, device_ids=ids)
    return model, head
