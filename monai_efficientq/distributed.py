"""Which process of a ``torch.distributed`` run (``torchrun``) this is: rank 0 quantizes and writes files, the
other ranks load what it wrote."""

from __future__ import annotations

import torch

__all__ = ["is_distributed", "is_other_rank"]


def is_distributed() -> bool:
    """Whether this process is one of several of an initialised ``torch.distributed`` run."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_other_rank() -> bool:
    """Whether this process belongs to a distributed run and is not rank 0."""
    return is_distributed() and torch.distributed.get_rank() > 0
