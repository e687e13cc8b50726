"""parallelize(model, mesh): expert parallelism applied to a single-device model from outside.

    with torch.device("meta"):
        model = MoETransformer(cfg.model)                             # no memory yet
    plan = parallelize(model, mesh)                                   # keep only my experts
    materialize(model, plan, device); model.init_weights(seed)       # same global weights at any layout
    ...loss.backward(); plan.sync_gradients(); plan.clip_grad_norm_(1.0); opt.step()

What changes on each rank:
- every MoE layer keeps only the routed experts this rank owns (its expert slice, rows of the
  stacked [E, ...] weights), and its `routed` step becomes the all-to-all dispatch of dispatch.py;
- gradients: dense parameters are averaged over the whole world; expert parameters are summed only
  over the replica group (ranks owning the same experts, the data axis) and divided by the world
  size. Their gradients already hold the contributions of every rank in the expert group, which
  the all-to-all's backward delivered, so summing over the expert axis would count them twice;
- the global gradient norm adds the expert shards' squared norms over the expert group once.

With parallel.dense=fsdp (FSDP2) dense tensors are sharded over all ranks, and expert stacks over
their replica group; FSDP's reduce-scatter then does the averaging above (experts divided by the
world size), and the squared norms of all shards are summed over the world.

Bias balancing needs nothing here: the loop all-reduces expert loads over the whole world.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from raymoe.model.moe import MoE
from raymoe.parallel.dispatch import ExpertParallelRouted
from raymoe.parallel.mesh import Mesh


@dataclass
class ParallelPlan:
    mesh: Mesh
    fsdp: bool = False
    """Dense parameters are FSDP2 DTensors sharded over the world (parallel.dense=fsdp): FSDP
    reduce-scatters (averages) their gradients in backward; only the experts are synced here."""
    expert_fsdp: bool = False
    """Routed experts are FSDP2-sharded across their replicas too (parallel.dense=fsdp with a data
    degree > 1): FSDP reduce-scatters their gradients; nothing to sync here either."""
    dense: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    experts: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    """Sharded routed-expert parameters: dim 0 indexes this rank's local experts."""
    dispatchers: list[ExpertParallelRouted] = field(default_factory=list)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.dense] + [p for _, p in self.experts]

    def sync_gradients(self) -> None:
        world = self.mesh.world_size
        if world == 1:
            return
        if not self.fsdp:
            _all_reduce_flat([p.grad for _, p in self.dense if p.grad is not None], None, world)
        if self.expert_fsdp:
            return
        if self.mesh.replica_group is not None:
            _all_reduce_flat([p.grad for _, p in self.experts if p.grad is not None], self.mesh.replica_group, world)
        else:
            for _, p in self.experts:
                if p.grad is not None:
                    p.grad.div_(world)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global-norm clipping over the whole (sharded) model; returns the norm before clipping."""
        # FSDP gradients are DTensor shards: their local parts partition the whole, summed over the world.
        dense = [_local(p.grad) for _, p in self.dense if p.grad is not None]
        expert = [_local(p.grad) for _, p in self.experts if p.grad is not None]
        device = (dense or expert)[0].device
        sq_dense = sum((g.float().square().sum() for g in dense), torch.zeros((), device=device))
        sq_expert = sum((g.float().square().sum() for g in expert), torch.zeros((), device=device))
        if self.fsdp and self.mesh.world_size > 1:
            dist.all_reduce(sq_dense)
        if self.expert_fsdp:
            dist.all_reduce(sq_expert)  # FSDP shards of each expert group's shards: each piece once
        elif self.mesh.expert_group is not None:
            dist.all_reduce(sq_expert, group=self.mesh.expert_group)  # each shard counted once
        norm = (sq_dense + sq_expert).sqrt()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in dense + expert:
                g.mul_(scale)
        return norm

    def collect(self, model: nn.Module) -> None:
        """(Re)list the model's parameters as dense or expert-sharded."""
        expert_names = expert_param_names(model)
        self.dense, self.experts = [], []
        for name, p in model.named_parameters():
            (self.experts if name in expert_names else self.dense).append((name, p))

    def take_a2a_bytes(self) -> int:
        total = sum(d.bytes_sent for d in self.dispatchers)
        for d in self.dispatchers:
            d.bytes_sent = 0
        return total


def assign_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param[...] = full, where param may be a shard of a DTensor (FSDP2): every rank passes the
    same whole tensor and keeps its own part, with no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        part = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(full)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _all_reduce_flat(grads: list[torch.Tensor], group, world: int) -> None:
    """Sum in one flat buffer (one collective instead of one per tensor), then divide by world."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def expert_param_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, MoE):
            names.update(f"{mod_name}.experts.{n}" for n, _ in mod.experts.named_parameters())
    return names


def parallelize(model: nn.Module, mesh: Mesh, dense: str = "replicate", device_type: str = "cpu",
                compute_dtype: torch.dtype | None = None) -> ParallelPlan:
    """The one place where parallelism is applied, in this order: (1) expert parallelism cuts each
    MoE layer to this rank's experts and swaps in the all-to-all; (2) with dense='fsdp', FSDP2's
    fully_shard wraps each MoE layer's experts over their replica group (when there is more than
    one replica: torchtitan's FSDP over the data axis beside EP), then every transformer block and
    the root over all ranks; with a bf16 `compute_dtype` FSDP gathers the parameters in bf16 and
    reduce-scatters gradients in fp32 (the fp32 master shards stay what AdamW updates).
    Activation checkpointing is applied inside the model's forward (model.checkpoint_every),
    beneath both; nothing is torch.compile'd yet (it would wrap each block here, before
    fully_shard). Call on a model built on the meta device, then `materialize`."""
    plan = ParallelPlan(mesh, fsdp=dense == "fsdp" and mesh.world_size > 1)
    local = mesh.local_experts()
    # Frozen parameters (model/lora.py set_trainable) are listed too: checkpoints and the optimizer
    # filter on requires_grad, and their gradients, never computed, are skipped by the syncs below.
    for mod in model.modules():
        if not isinstance(mod, MoE):
            continue
        if mesh.expert_degree > 1:
            experts = mod.experts
            # Every parameter of the stack is [E, ...]: the weights and, with LoRA, their adapters.
            for name, full in list(experts.named_parameters(recurse=False)):
                setattr(experts, name, nn.Parameter(full.data[local.start : local.stop].clone(), requires_grad=full.requires_grad))
            experts.num_experts = len(local)
            experts.first_expert = local.start
            # An instance attribute shadows the single-device method: the model file stays as is.
            mod.routed = ExpertParallelRouted(mod, mesh.expert_degree, mesh.expert_group)
            plan.dispatchers.append(mod.routed)
    if plan.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        world_mesh = init_device_mesh(device_type, (mesh.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else MixedPrecisionPolicy()
        replica_mesh = None
        if mesh.data_degree > 1:
            # Ranks holding the same experts (same expert index): rank = data_index * E_deg + expert_index.
            replica_mesh = world_mesh if mesh.expert_degree == 1 else init_device_mesh(
                device_type, (mesh.data_degree, mesh.expert_degree), mesh_dim_names=("data", "expert"))["data"]
        plan.expert_fsdp = replica_mesh is not None
        moes = [mod for mod in model.modules() if isinstance(mod, MoE)]
        ignored = set()
        for mod in moes:
            if plan.expert_fsdp:
                # Each replica keeps 1/data_degree of its experts' rows; FSDP gathers them for the
                # layer's expert GEMMs and reduce-scatters their gradients over the replicas. Divided
                # by the world, not the replica count: the all-to-all's backward already summed the
                # expert group's contributions (see the module docstring).
                fully_shard(mod.experts, mesh=replica_mesh, mp_policy=mp)
                mod.experts.set_gradient_divide_factor(float(mesh.world_size))
                mod.experts.set_force_sum_reduction_for_comms(True)  # scale + SUM: gloo has no PREMUL_SUM
            else:
                ignored.update(mod.experts.parameters())
        for block in model.layers:  # sharded experts are already FSDP's (their own group): skipped here
            fully_shard(block, mesh=world_mesh, ignored_params=ignored, mp_policy=mp)
        fully_shard(model, mesh=world_mesh, ignored_params=ignored, mp_policy=mp)  # embedding, final norm, head
    plan.collect(model)
    return plan


def materialize(model: nn.Module, plan: ParallelPlan, device: torch.device) -> None:
    """Allocate a model built on the meta device and parallelized there: only what this rank owns
    (its experts' rows) gets memory. Uninitialized: call model.init_weights (and lora.init_adapters)
    or load weights next."""
    model.to_empty(device=device)  # new Parameter objects: re-tie, and re-list them for the plan
    model.tie_weights()
    plan.collect(model)
