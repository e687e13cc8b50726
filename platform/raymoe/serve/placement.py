"""Expert placement for serving: which expert group hosts which routed experts, and which hot
experts get extra copies.

In serving, the E routed experts of every MoE layer are split over G expert groups, one Ray Serve
deployment each, scaling its replicas on its own load. A group's load is the tokens routed to the
experts it hosts, so two hot experts in one group make that group the bottleneck while the others
idle. `plan_placement` plans from recorded expert loads, in the spirit of DeepSeek's Expert
Parallelism Load Balancer (EPLB):

1. replicate: with `slots_per_group * G` slots for E experts, each spare slot goes in turn to the
   expert whose load per copy is then highest; an expert's tokens split evenly over its copies;
2. pack: (expert, copy) items go heaviest first into the lightest group that has a free slot and
   no copy of that expert yet (greedy longest-processing-time with a capacity per group).

One layout serves every MoE layer: loads are summed over layers before planning, so a placement
balances the total over layers, not each layer on its own. (Per-layer layouts balance better but
would make a group host a different expert set in each layer.)

Loads come from `expert_load.json` (training, `[{"step": int, "load": [[int]*E]*L}, ...]`) or from
serving's counters. Pure Python + numpy, no Ray:

    .venv/bin/python -m pytest tests/unit/test_placement.py -q
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

# Shape suffixes: E experts, G expert groups, L MoE layers


@dataclass(frozen=True)
class Placement:
    """Which expert groups host which routed experts; one layout shared by every MoE layer."""

    num_groups: int
    """G: expert groups (one Ray Serve deployment each)."""
    groups: tuple[tuple[int, ...], ...]
    """Per group, the ids of the experts it hosts (ascending, each at most once per group)."""
    replicas: dict[int, int]
    """Expert id -> how many groups host a copy of it (1 = not replicated); every expert is a key."""

    def __post_init__(self) -> None:
        # A placement can come from a user's JSON file, so bad content is a ValueError.
        if self.num_groups < 1:
            raise ValueError(f"num_groups={self.num_groups} must be >= 1")
        if len(self.groups) != self.num_groups:
            raise ValueError(f"groups lists {len(self.groups)} groups but num_groups={self.num_groups}")
        hosted: Counter[int] = Counter()
        for g, experts in enumerate(self.groups):
            twice = sorted(e for e, n in Counter(experts).items() if n > 1)
            if twice:
                raise ValueError(f"group {g} hosts experts {twice} more than once; a group holds one copy of an expert")
            hosted.update(experts)
        if not hosted or min(hosted) < 0:
            raise ValueError(f"groups must host expert ids 0..E-1; got {sorted(hosted) or 'none'}")
        missing = [e for e in range(max(hosted) + 1) if e not in hosted]
        if missing:
            raise ValueError(f"groups must host every expert id 0..E-1 at least once; missing {missing}")
        for e in sorted(set(hosted) | set(self.replicas)):
            if self.replicas.get(e, 0) != hosted[e]:
                raise ValueError(f"replicas[{e}]={self.replicas.get(e, 0)} but {hosted[e]} groups host expert {e}")

    @property
    def num_experts(self) -> int:
        return len(self.replicas)

    def group_of(self, expert: int) -> list[int]:
        """The groups hosting a copy of `expert`, ascending."""
        if expert not in self.replicas:
            raise ValueError(f"expert={expert} is not in this placement (experts 0..{self.num_experts - 1})")
        return [g for g, experts in enumerate(self.groups) if expert in experts]

    def group_loads(self, load_E: Any) -> list[float]:
        """Load of each group; an expert with k copies sends 1/k of its load to each."""
        load = _as_load(load_E, self.num_experts)
        return [sum(load[e] / self.replicas[e] for e in experts) for experts in self.groups]

    def balance(self, load_E: Any) -> float:
        """Mean / max of the group loads: 1.0 is perfect, 1/G is all load on one group."""
        loads_G = self.group_loads(load_E)
        peak = max(loads_G)
        if peak <= 0:
            return 1.0  # no load, nothing to balance
        return sum(loads_G) / len(loads_G) / peak

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (replicas keys become strings, as JSON requires)."""
        return {
            "num_groups": self.num_groups,
            "groups": [list(experts) for experts in self.groups],
            "replicas": {str(e): n for e, n in sorted(self.replicas.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        unknown = sorted(set(d) - {"num_groups", "groups", "replicas"})
        if unknown:
            raise ValueError(f"unknown placement keys {unknown}; expected num_groups, groups, replicas")
        return cls(
            num_groups=int(d["num_groups"]),
            groups=tuple(tuple(int(e) for e in experts) for experts in d["groups"]),
            replicas={int(e): int(n) for e, n in d["replicas"].items()},
        )


def _as_load(load_E: Any, num_experts: int | None = None) -> list[float]:
    """A load vector (list, numpy array or torch tensor on any device) as a list of floats."""
    if hasattr(load_E, "detach"):  # torch.Tensor, without importing torch
        load_E = load_E.detach().cpu().numpy()
    arr = np.asarray(load_E, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"load_E must be one load per expert (shape [E]), got shape {tuple(arr.shape)}; sum over layers first")
    if num_experts is not None and arr.shape[0] != num_experts:
        raise ValueError(f"load_E has {arr.shape[0]} entries but the placement has {num_experts} experts")
    if arr.shape[0] == 0:
        raise ValueError("load_E is empty: need one load per expert")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("load_E must hold finite, non-negative token counts")
    return arr.tolist()


def contiguous_placement(num_experts: int, num_groups: int) -> Placement:
    """Group g hosts experts [g*E/G, (g+1)*E/G), the layout training's expert parallelism uses."""
    if num_experts < 1 or num_groups < 1:
        raise ValueError(f"num_experts={num_experts} and num_groups={num_groups} must both be >= 1")
    if num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide num_experts={num_experts} (each group hosts E/G experts)")
    per_group = num_experts // num_groups
    groups = tuple(tuple(range(g * per_group, (g + 1) * per_group)) for g in range(num_groups))
    return Placement(num_groups=num_groups, groups=groups, replicas={e: 1 for e in range(num_experts)})


def plan_placement(
    load_E: Any,
    num_groups: int,
    slots_per_group: int | None = None,
    max_replicas: int | None = None,
) -> Placement:
    """Plan a placement that balances `load_E` (tokens per expert, summed over layers) over groups.

    slots_per_group: experts each group hosts; the default E/G leaves no spare slot, so nothing is
        replicated and the plan only regroups experts.
    max_replicas: most copies of one expert; default (and at most) num_groups, since a group
        holds one copy of an expert.
    Deterministic: ties go to the lower expert id, then the lower group index.
    """
    load = _as_load(load_E)
    num_experts = len(load)
    if num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be >= 1")
    if slots_per_group is None:
        if num_experts % num_groups:
            raise ValueError(
                f"num_groups={num_groups} must divide num_experts={num_experts} when slots_per_group is not given; "
                f"pass slots_per_group >= {math.ceil(num_experts / num_groups)}"
            )
        slots_per_group = num_experts // num_groups
    if max_replicas is None:
        max_replicas = num_groups
    if not 1 <= max_replicas <= num_groups:
        raise ValueError(f"max_replicas={max_replicas} must be in 1..num_groups={num_groups} (a group holds one copy of an expert)")
    num_slots = slots_per_group * num_groups
    if num_slots < num_experts:
        raise ValueError(
            f"slots_per_group={slots_per_group} * num_groups={num_groups} = {num_slots} slots cannot host "
            f"num_experts={num_experts}; need slots_per_group >= {math.ceil(num_experts / num_groups)}"
        )
    if num_slots > num_experts * max_replicas:
        raise ValueError(
            f"slots_per_group={slots_per_group} * num_groups={num_groups} = {num_slots} slots exceed "
            f"num_experts={num_experts} * max_replicas={max_replicas}; lower slots_per_group or raise max_replicas"
        )

    # 1) Replicate: each spare slot to the expert with the highest load per copy right now.
    copies = [1] * num_experts
    heap = [(-load[e], e) for e in range(num_experts) if max_replicas > 1]
    heapq.heapify(heap)
    for _ in range(num_slots - num_experts):
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < max_replicas:
            heapq.heappush(heap, (-load[e] / copies[e], e))
    per_copy = [load[e] / copies[e] for e in range(num_experts)]

    # 2) Pack: heaviest copy first into the lightest group with room and no copy of that expert.
    # Copies of one expert are adjacent in this order, so they land in distinct groups together.
    items = sorted((e for e in range(num_experts) for _ in range(copies[e])), key=lambda e: (-per_copy[e], e))
    hosted: list[set[int]] = [set() for _ in range(num_groups)]
    group_load = [0.0] * num_groups
    for e in items:
        open_groups = [g for g in range(num_groups) if len(hosted[g]) < slots_per_group and e not in hosted[g]]
        if open_groups:
            g = min(open_groups, key=lambda g: (group_load[g], g))
            hosted[g].add(e)
            group_load[g] += per_copy[e]
        else:
            _place_by_moving(e, hosted, group_load, per_copy, slots_per_group)

    return Placement(
        num_groups=num_groups,
        groups=tuple(tuple(sorted(h)) for h in hosted),
        replicas={e: copies[e] for e in range(num_experts)},
    )


def _place_by_moving(e: int, hosted: list[set[int]], group_load: list[float], per_copy: list[float], slots: int) -> None:
    """Greedy packing can corner itself: every group with a free slot already hosts `e`. Move some
    expert x from a full group h without `e` into such a group g, then put `e` in h. An x exists:
    h holds `slots` distinct experts and g fewer, so one of h's is not in g. Of all moves, take
    the one with the lowest resulting max(g, h) load."""
    best: tuple[float, int, int, int] | None = None
    for g in range(len(hosted)):
        if len(hosted[g]) >= slots:
            continue
        for h in range(len(hosted)):
            if e in hosted[h]:
                continue
            for x in sorted(hosted[h] - hosted[g]):
                peak = max(group_load[g] + per_copy[x], group_load[h] - per_copy[x] + per_copy[e])
                if best is None or (peak, g, h, x) < best:
                    best = (peak, g, h, x)
    assert best is not None, f"no move places expert {e}"  # excluded by copies <= num_groups
    _, g, h, x = best
    hosted[h].remove(x)
    hosted[g].add(x)
    hosted[h].add(e)
    group_load[g] += per_copy[x]
    group_load[h] += per_copy[e] - per_copy[x]


def load_from_history(history: list[dict[str, Any]], last_n: int | None = None) -> np.ndarray:
    """Tokens per expert (float64 [E]) summed over layers and over the last `last_n` entries of an
    `expert_load.json` history (all of it when None). An entry's load may also be a flat [E]."""
    if not history:
        raise ValueError("expert load history is empty: nothing to plan from")
    if last_n is not None and last_n < 1:
        raise ValueError(f"last_n={last_n} must be >= 1, or None for the whole history")
    window = history[-last_n:] if last_n is not None else history
    total_E: np.ndarray | None = None
    for i, entry in enumerate(window):
        where = f"entry step={entry.get('step', '?')}" if isinstance(entry, dict) else f"entry {i}"
        if not isinstance(entry, dict) or "load" not in entry:
            raise ValueError(f"{where} has no 'load'; expected {{'step': int, 'load': [[int]*E]*L}}")
        load_LE = np.asarray(entry["load"], dtype=np.float64)
        if load_LE.ndim == 1:
            load_LE = load_LE[None]
        if load_LE.ndim != 2:
            raise ValueError(f"{where}: load must be [layers][experts], got shape {tuple(load_LE.shape)}")
        load_E = load_LE.sum(axis=0)
        if total_E is None:
            total_E = load_E
        elif load_E.shape != total_E.shape:
            raise ValueError(f"{where}: {load_E.shape[0]} experts, but earlier entries have {total_E.shape[0]}")
        else:
            total_E = total_E + load_E
    assert total_E is not None
    return total_E


def report(load_E: Any, before: Placement, after: Placement) -> str:
    """Group loads and balance of two placements under the same loads, for logs and the CLI."""
    if before.num_experts != after.num_experts:
        raise ValueError(f"before has {before.num_experts} experts but after has {after.num_experts}")
    load = _as_load(load_E, before.num_experts)
    groups = f"{before.num_groups}" if before.num_groups == after.num_groups else f"{before.num_groups} -> {after.num_groups}"
    lines = [f"expert placement: {before.num_experts} experts over {groups} groups, total load {sum(load):,.0f}"]
    lines.append(f"{'':8}{'balance':>8}{'max':>12}  group loads")
    for name, p in (("before", before), ("after", after)):
        loads_G = p.group_loads(load)
        lines.append(f"{name:8}{p.balance(load):>8.3f}{max(loads_G):>12,.1f}  " + " ".join(f"{x:,.1f}" for x in loads_G))
    replicated = [f"{e}x{n}" for e, n in sorted(after.replicas.items()) if n > 1]
    lines.append("replicated (expert x copies): " + (" ".join(replicated) if replicated else "none"))
    lines.append("after, experts per group: " + " | ".join(" ".join(map(str, experts)) for experts in after.groups))
    return "\n".join(lines)
