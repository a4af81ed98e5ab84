"""One process or several (``torchrun``): who we are, where we run, and how gradients meet.

A single process trains the model directly. Under ``torchrun`` (WORLD_SIZE > 1) every process
trains on its shard and the loss step runs inside ``DistributedDataParallel`` (gloo on CPU, nccl
on CUDA), which averages gradients across processes during ``backward``. Only rank 0 writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler

from stbir_train.errors import TrainingError
from stbir_train.loop import step_losses

DDP_NAME = "DistributedDataParallel"


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.world > 1 else None

    def describe(self) -> str:
        if self.world == 1:
            return f"1 process(es) on {self.device}"
        return (f"{self.world} process(es) on {self.device}; gradients averaged by {DDP_NAME} "
                f"({self.backend})")


def setup(device_setting: str) -> Processes:
    """Join the process group (when launched by torchrun) and pick the device.

    ``device_setting`` is ``training.device``: auto, cpu or cuda."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_setting != "cpu"
    if device_setting == "cuda" and not torch.cuda.is_available():
        raise TrainingError("training.device is cuda but no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return Processes(rank, world, torch.device("cuda", local))
    return Processes(rank, world, torch.device("cpu"))


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()


class LossStep(nn.Module):
    """The model's loss step as a module, so DistributedDataParallel can run it as ``forward``
    (DDP only syncs gradients of a backward whose forward went through it)."""

    def __init__(self, model: nn.Module, extra_terms=None):
        super().__init__()
        self.model, self.extra_terms = model, extra_terms

    def forward(self, batch: dict, loss_cfg, target: str) -> dict[str, torch.Tensor]:
        return step_losses(self.model, batch, loss_cfg, target, self.extra_terms)


def loss_step(model: nn.Module, procs: Processes, extra_terms=None):
    """``fn(batch, loss_cfg, target) -> loss terms`` for one stage (``extra_terms``: see
    ``loop.step_losses``); call after ``configure_stage`` (DDP syncs the parameters that are
    trainable when it is built)."""
    if procs.world == 1:
        return lambda batch, loss_cfg, target: step_losses(model, batch, loss_cfg, target,
                                                           extra_terms)
    ids = [procs.device.index] if procs.device.type == "cuda" else None
    # A stage may leave a trainable tensor without a gradient (e.g. the ArcFace head at weight
    # 0), so DDP looks for unused parameters instead of waiting for them.
    return nn.parallel.DistributedDataParallel(LossStep(model, extra_terms), device_ids=ids,
                                               find_unused_parameters=True)


def sampler(dataset, procs: Processes, seed: int, epoch_key: int, epoch_seed: int):
    """Shuffled order of one epoch: a shard per process under torchrun, else the whole set."""
    if procs.world > 1:
        s = DistributedSampler(dataset, procs.world, procs.rank, shuffle=True, seed=seed,
                               drop_last=True)
        s.set_epoch(epoch_key)
        return s
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(epoch_seed))


def agree(procs: Processes, value: bool) -> bool:
    """Rank 0's ``value`` on every process (a decision only rank 0 can make: it validates)."""
    if procs.world == 1:
        return value
    flag = torch.tensor([int(value)], device=procs.device)
    dist.broadcast(flag, 0)
    return bool(flag.item())
