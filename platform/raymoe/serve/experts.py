"""Routed expert serving without Ray: the router's side of an MoE layer (`RemoteExperts`) and an
expert group's compute (`GroupExperts`). serve/deployments.py puts them in Serve replicas.

At each MoE layer of a forward the router sorts the batch's routed slots by expert and makes ONE
call per expert group that received any (all groups' calls are in flight at once, over an
ExpertTransport), runs the layer's shared experts while waiting, then combines the returned
outputs with the routing weights. A group is stateless: any replica of it can answer any call,
and a call lost with its replica is sent again.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from raymoe.model.moe import GroupedExperts, Routing, permute, unpermute
from raymoe.serve.channel import Call
from raymoe.serve.placement import Placement, contiguous_placement
from raymoe.serve.transport import ExpertTransport, PendingCall, TransportError


class RemoteExperts:
    """Replaces `MoE.routed` in the router: one batched call per expert group per layer, and the
    layer's shared experts computed while those calls are in flight.

    Any placement works: a group may host any set of experts, and an expert hosted by k groups
    (a replicated hot expert) has its slots dealt round-robin over the k copies. Without
    replicated experts, the slots are sorted straight into (group, local expert) order by giving
    each expert its position in the groups' concatenated lists, so each group's rows are one
    contiguous slice and nothing is re-sorted.
    """

    def __init__(self, layer: int, placement: Placement, transport: ExpertTransport, stats: "RouterStats",
                 shared: torch.nn.Module | None = None):
        self.layer, self.placement, self.transport, self.stats = layer, placement, transport, stats
        self.shared = shared  # the layer's shared experts (the caller must not add them again)
        E, G = placement.num_experts, placement.num_groups
        self.sizes = [len(experts) for experts in placement.groups]
        self.replicated = any(n > 1 for n in placement.replicas.values())
        self.slot_of = torch.empty(E, dtype=torch.long)  # expert -> its row in the concatenated group lists
        for offset, experts in zip(itertools.accumulate([0] + self.sizes), placement.groups):
            self.slot_of[list(experts)] = torch.arange(offset, offset + len(experts))
        copies = [placement.group_of(e) for e in range(E)]
        self.num_copies = torch.tensor([len(c) for c in copies])
        self.copy_group = torch.tensor([c + [c[0]] * (G - len(c)) for c in copies])  # [E, G], padded
        self.local_index = torch.full((G, E), -1, dtype=torch.long)  # [G, E]: row of e in group g
        for g, experts in enumerate(placement.groups):
            self.local_index[g, list(experts)] = torch.arange(len(experts))

    def __call__(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        shared: list[torch.Tensor] = []

        def while_waiting() -> None:  # the layer's shared experts, run while the group calls are in flight
            if self.shared is not None:
                shared.append(self.shared(x_TD))

        path = self._replicated if self.replicated else self._contiguous
        out_ND, token_N, weight_N = path(x_TD, routing, while_waiting)
        y_TD = unpermute(out_ND, token_N, weight_N, x_TD.shape[0])
        return y_TD + shared[0] if shared else y_TD

    def _contiguous(self, x_TD: torch.Tensor, routing: Routing, while_waiting):
        """No replicated expert: slots sorted by (group, local expert) in one permute; each group's rows are a slice."""
        routing = dataclasses.replace(routing, expert_TK=self.slot_of[routing.expert_TK])
        x_ND, counts, token_N, weight_N = permute(x_TD, routing, len(self.slot_of))
        pending, row = [], 0
        for g, counts_g in enumerate(counts.split(self.sizes)):
            n = int(counts_g.sum())
            if n:
                rows = x_ND[row : row + n]
                pending.append((g, rows, counts_g, self._send(g, rows, counts_g)))
                self.stats.add(g, n)
            row += n
        while_waiting()
        out_ND = torch.cat([self._result(g, call, rows, c) for g, rows, c, call in pending]) if pending else x_ND
        return out_ND, token_N, weight_N

    def _replicated(self, x_TD: torch.Tensor, routing: Routing, while_waiting):
        """The general path: slots of a replicated expert are dealt over its copies, then sorted by group."""
        E, G = self.placement.num_experts, self.placement.num_groups
        x_ND, counts_E, token_N, weight_N = permute(x_TD, routing, E)
        counts_host = counts_E.cpu()
        expert_N = torch.repeat_interleave(torch.arange(E), counts_host)
        rank_N = torch.arange(expert_N.numel()) - (torch.cumsum(counts_host, 0) - counts_host)[expert_N]
        group_N = self.copy_group[expert_N, rank_N % self.num_copies[expert_N]]
        local_N = self.local_index[group_N, expert_N]
        order = torch.argsort(group_N * E + local_N, stable=True)  # by group, then by its local expert
        x_sorted = x_ND[order]
        sizes = torch.bincount(group_N, minlength=G).tolist()
        pending, offset = [], 0
        for g, n in enumerate(sizes):
            if n:
                counts = torch.bincount(local_N[group_N == g], minlength=len(self.placement.groups[g]))
                rows = x_sorted[offset : offset + n]
                pending.append((offset, n, g, rows, counts, self._send(g, rows, counts)))
                self.stats.add(g, n)
            offset += n
        while_waiting()
        out_sorted = x_ND.new_empty(x_ND.shape)
        for start, n, g, rows, counts, response in pending:  # all calls are in flight before the first wait
            out_sorted[start : start + n] = self._result(g, response, rows, counts)
        return torch.empty_like(out_sorted).index_copy_(0, order, out_sorted), token_N, weight_N

    def _send(self, g: int, rows: torch.Tensor, counts: torch.Tensor) -> PendingCall | TransportError:
        """Start one group call; a call that cannot even start is returned as its error, so that
        every group's call is out before the first wait and the retry below handles both."""
        try:
            return self.transport.send(g, self.layer, rows, counts)
        except TransportError as e:
            return e

    def _result(self, g: int, pending: PendingCall | TransportError, rows: torch.Tensor, counts: torch.Tensor,
                attempts: int = 3) -> torch.Tensor:
        """The group's answer; if its replica died mid-call, the same call again (a live replica of
        that group takes it: groups are stateless, so a retry is always safe)."""
        for attempt in range(attempts):
            try:
                if isinstance(pending, TransportError):
                    raise pending
                return pending.result()
            except TransportError:
                if attempt == attempts - 1:
                    raise
                self.stats.retries += 1
                pending = self._send(g, rows, counts)
        raise AssertionError("unreachable")


class TokenRate:
    """Tokens per second over a sliding window."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int, now: float | None = None) -> None:
        self.events.append((time.monotonic() if now is None else now, tokens))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()
        return sum(t for _, t in self.events) / self.window_s


@dataclass
class RouterStats:
    """Calls and tokens the router sent to each expert group (what the group autoscaler reads)."""

    num_groups: int
    tokens: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    rates: list[TokenRate] = field(default_factory=list)
    """Routed tokens per second to each group over the last 5 s (what the group autoscaler reads)."""
    retries: int = 0
    """Calls sent again because the replica serving them died."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.tokens = [0] * self.num_groups
        self.calls = [0] * self.num_groups
        self.rates = [TokenRate() for _ in range(self.num_groups)]

    def add(self, group: int, tokens: int) -> None:
        with self._lock:
            self.tokens[group] += tokens
            self.calls[group] += 1
            self.rates[group].add(tokens)

    def tokens_per_s(self) -> list[float]:
        with self._lock:
            return [r.rate() for r in self.rates]


def resolve_placement(placement: dict | None, num_groups: int, num_experts: int) -> Placement:
    """A planned placement (Placement.to_dict()) or, for None, contiguous groups; checked against the model."""
    if placement is None:
        return contiguous_placement(num_experts, num_groups)
    planned = Placement.from_dict(placement)
    if planned.num_experts != num_experts or planned.num_groups != num_groups:
        raise ValueError(f"the placement has {planned.num_experts} experts in {planned.num_groups} groups; the model has "
                         f"{num_experts} routed experts and num_groups={num_groups}")
    return planned


class GroupExperts:
    """One expert group's compute, no Ray: its experts of every MoE layer, and `run_calls`, which
    merges the calls for the same layer into one grouped GEMM and hands each caller its rows."""

    def __init__(self, model, experts: list[int]):
        self.experts = list(experts)
        self.layers: dict[int, GroupedExperts] = {}
        for i, moe in enumerate(model.moe_layers()):
            full = moe.experts
            part = GroupedExperts(len(self.experts), full.w2.shape[2], full.w2.shape[1])
            for name in ("w13", "w2"):
                getattr(part, name).data = getattr(full, name).data[self.experts].clone()
            self.layers[i] = part.eval()
        self.tokens, self.batches = 0, 0
        self._lock = threading.Lock()

    def run_calls(self, calls: list[Call]) -> list[torch.Tensor]:
        """Each call: (layer, rows sorted by local expert, counts per local expert)."""
        with self._lock:  # the handle path and the direct channel may both be running calls
            return self._run_calls(calls)

    def _run_calls(self, calls: list[Call]) -> list[torch.Tensor]:
        self.batches += 1
        out: list[torch.Tensor | None] = [None] * len(calls)
        by_layer: dict[int, list[int]] = {}
        for i, (layer, _, _) in enumerate(calls):
            by_layer.setdefault(layer, []).append(i)
        with torch.no_grad():
            for layer, idx in by_layer.items():
                xs = [calls[i][1] for i in idx]
                counts = [calls[i][2] for i in idx]
                e = len(self.experts)
                if any(c.shape != (e,) for c in counts) or layer not in self.layers:
                    raise ValueError(f"call for layer {layer} with counts {[tuple(c.shape) for c in counts]}: this group has "
                                     f"{e} experts in layers {sorted(self.layers)}")
                if len(idx) == 1:  # one caller: its rows are already sorted by local expert
                    out[idx[0]] = self.layers[layer](xs[0], counts[0])
                else:
                    local = torch.cat([torch.repeat_interleave(torch.arange(e), c) for c in counts])
                    order = torch.argsort(local, stable=True)
                    y_sorted = self.layers[layer](torch.cat(xs)[order], torch.stack(counts).sum(0))
                    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
                    for i, part in zip(idx, y.split([x.shape[0] for x in xs])):
                        out[i] = part
                self.tokens += int(sum(x.shape[0] for x in xs))
        return out
