"""The worker group as a 2-D mesh: (data, expert) axes, and which rank owns which experts.

    rank = data_index * expert_degree + expert_index

Ranks with the same data_index form an *expert group*: together they hold every routed expert
once (rank with expert_index j owns experts [j*e, (j+1)*e), e = E / expert_degree) and exchange
tokens by all-to-all. Ranks with the same expert_index form a *replica group*: they hold the same
experts, and only they average those experts' gradients. Dense parameters are replicated on
every rank and averaged over the whole world.

Experts are laid out contiguously, and so are expert groups (moe.py): when num_expert_groups is
a multiple of expert_degree each rank holds whole groups, and group-limited routing becomes
DeepSeek's node-limited routing: a token's experts live on at most top_k_groups ranks, which
bounds its all-to-all fan-out.

Every rank must build the mesh (process-group creation is collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


def resolve_expert_degree(setting: int | str, world_size: int, num_experts: int) -> int:
    """'auto' -> the largest divisor of world_size that also divides num_experts."""
    if num_experts == 0:
        return 1
    if setting == "auto":
        return max(d for d in range(1, world_size + 1) if world_size % d == 0 and num_experts % d == 0)
    if world_size % setting or num_experts % setting:
        raise ValueError(
            f"parallel.expert_degree={setting} must divide the world size ({world_size}) and "
            f"model.num_experts ({num_experts}); use expert_degree: auto for elastic runs"
        )
    return setting


@dataclass
class Mesh:
    world_size: int
    rank: int
    expert_degree: int
    num_experts: int
    expert_group: Any = None
    """Process group of this rank's expert group (None when expert_degree == 1)."""
    replica_group: Any = None
    """Process group of the ranks holding the same experts (None when data_degree == 1)."""

    @property
    def data_degree(self) -> int:
        return self.world_size // self.expert_degree

    @property
    def expert_index(self) -> int:
        return self.rank % self.expert_degree

    @property
    def data_index(self) -> int:
        return self.rank // self.expert_degree

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.expert_degree

    def local_experts(self, expert_index: int | None = None) -> range:
        j = self.expert_index if expert_index is None else expert_index
        e = self.experts_per_rank
        return range(j * e, (j + 1) * e)


def build_mesh(world_size: int, rank: int, expert_degree: int, num_experts: int) -> Mesh:
    mesh = Mesh(world_size, rank, expert_degree, num_experts)
    if world_size == 1:
        return mesh
    # new_group is collective: every rank creates every group, in the same order.
    if expert_degree > 1:
        for d in range(mesh.data_degree):
            ranks = list(range(d * expert_degree, (d + 1) * expert_degree))
            group = dist.new_group(ranks)
            if rank in ranks:
                mesh.expert_group = group
    if mesh.data_degree > 1:
        for j in range(expert_degree):
            ranks = list(range(j, world_size, expert_degree))
            group = dist.new_group(ranks)
            if rank in ranks:
                mesh.replica_group = group
    return mesh
