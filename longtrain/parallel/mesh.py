"""The (dp, sp) device mesh: sequence-parallel ranks are adjacent (same node first), data-parallel outside."""
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Mesh:
    """This rank's place in the dp x sp grid; groups are None when there is one process."""
    dp_size: int
    sp_size: int
    dp_rank: int
    sp_rank: int
    device_mesh: DeviceMesh | None = None
    sp_group: ProcessGroup | None = None  # SP's collectives and P2P; never the group FSDP/DDP reduce over

    @property
    def dp_group(self):
        return None if self.device_mesh is None else self.device_mesh.get_group("dp")


WORLD_COPIES: dict = {}


def whole_world_group() -> ProcessGroup:
    """A second group of every rank, made once per default group (each is a communicator with its own stream)."""
    if dist.group.WORLD not in WORLD_COPIES:
        WORLD_COPIES[dist.group.WORLD] = dist.new_group(list(range(dist.get_world_size())))
    return WORLD_COPIES[dist.group.WORLD]


def build_mesh(sp_size: int, device_type: str) -> Mesh:
    """Split the world into dp = world / sp_size groups of sp_size consecutive ranks."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % sp_size:
        raise ValueError(f"world size {world} is not divisible by parallel.sp_size={sp_size}")
    if world == 1:
        return Mesh(1, 1, 0, 0)
    mesh = init_device_mesh(device_type, (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))
    sp_group = mesh.get_group("sp")
    if sp_size == world:  # the mesh hands back the default group, which FSDP/DDP use too: on NCCL one group's
        sp_group = whole_world_group()  # operations run in order, so SP's would queue behind theirs
    return Mesh(world // sp_size, sp_size, mesh.get_local_rank("dp"), mesh.get_local_rank("sp"), mesh, sp_group)
