"""What a mixer needs to know about sequence parallelism: the group and the chosen algorithms."""
from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class SPContext:
    """The sequence-parallel group of this rank and the per-family algorithm choice."""
    group: dist.ProcessGroup
    softmax_algorithm: str = "ring"
    linear_algorithm: str = "lasp2"
    layout: str = "contiguous"
    zeco_blocks: int | None = None
    ulysses_size: int = 1
