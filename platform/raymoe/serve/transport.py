"""How a router's expert-group calls travel: one interface, two implementations.

    transport = DirectTransport(channel, fallback=HandleTransport(handles, loop_of))
    pending = transport.send(group, layer, rows, counts)     # all groups' calls go out first
    out = pending.result()                                    # then each is awaited

`HandleTransport` calls a group's Serve deployment handle; `DirectTransport` sends over the
direct TCP channel (channel.py) and falls back to the handle while the group has no registered
replica. Either raises `TransportError` when a call was lost with its replica: expert groups are
stateless, so the caller (experts.RemoteExperts) sends it again.

Both move tensors through host memory: a router on a GPU pays a device-to-host copy of the rows
and a host-to-device copy of the answer on every hop (`bench/expert_hop.py` measures it). A GPU
transport (device to device: Ray Direct Transport over NCCL, or CUDA IPC within a node) would be
a third implementation of the same two methods; none exists yet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from typing import Callable, Protocol

import torch

CALL_TIMEOUT_S = 30.0
"""An expert-group call not answered by then is taken as lost with its replica (and sent again)."""


class TransportError(ConnectionError):
    """A call was lost with the replica serving it; sending it again is safe."""


class PendingCall(Protocol):
    def result(self) -> torch.Tensor:
        """The group's output rows, in the order of the rows sent; raises TransportError."""


class ExpertTransport(Protocol):
    name: str
    """'direct' or 'handle' (what /v1/expert_load reports)."""

    def send(self, group: int, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> PendingCall:
        """Start one call: `rows` sorted by the group's local expert, `counts` rows per local expert."""


class _OnDevice:
    """A call whose rows left `device` for the host: its answer goes back there."""

    def __init__(self, pending: PendingCall, device: torch.device):
        self.pending, self.device = pending, device

    def result(self) -> torch.Tensor:
        return self.pending.result().to(self.device)


def host_call(send, group: int, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> PendingCall:
    """`send(group, layer, rows, counts)` with the tensors in host memory, the answer brought back
    to the rows' device (a no-op for CPU tensors)."""
    if rows.device.type == "cpu":
        return send(group, layer, rows, counts.cpu())
    return _OnDevice(send(group, layer, rows.cpu(), counts.cpu()), rows.device)


def throughput_optimized() -> bool:
    """Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED mode, in which a handle refuses calls made outside
    the replica's event loop."""
    return os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0") == "1"


class _HandleCall:
    def __init__(self, response, group: int):
        self.response, self.group = response, group

    def result(self) -> torch.Tensor:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        try:
            if isinstance(self.response, concurrent.futures.Future):
                return self.response.result(timeout=CALL_TIMEOUT_S)
            return self.response.result(timeout_s=CALL_TIMEOUT_S)
        except (RayActorError, ActorDiedError, ActorUnavailableError, TimeoutError, concurrent.futures.TimeoutError) as e:
            raise TransportError(f"expert group {self.group}: {type(e).__name__}: {e}") from e


class HandleTransport:
    """Calls `handles[group].forward` (ExpertGroup's `@serve.batch` method); Serve picks the replica."""

    name = "handle"

    def __init__(self, handles: list, loop_of: Callable[[], asyncio.AbstractEventLoop | None] = lambda: None):
        """`loop_of()`: the replica's event loop, which handle calls must be submitted to in
        throughput-optimized mode; otherwise the engine thread calls directly (a killed replica
        then surfaces as an error at once, which the caller's retry needs)."""
        self.handles, self.loop_of = handles, loop_of

    def send(self, group: int, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> PendingCall:
        return host_call(self._send, group, layer, rows, counts)

    def _send(self, group: int, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> PendingCall:
        handle = self.handles[group]
        loop = self.loop_of() if throughput_optimized() else None
        if loop is None:
            return _HandleCall(handle.forward.remote((layer, rows, counts)), group)

        async def call():
            return await handle.forward.remote((layer, rows, counts))

        return _HandleCall(asyncio.run_coroutine_threadsafe(call(), loop), group)


class DirectTransport:
    """The direct channel (channel.ExpertChannel) to the group's registered replicas; while a
    group has none registered, `fallback` (the Serve handle, which waits for Serve to bring
    one up), or a TransportError without one."""

    name = "direct"

    def __init__(self, channel, fallback: HandleTransport | None = None):
        self.channel, self.fallback = channel, fallback
        self.fallbacks = 0
        """Calls that went through the fallback because no replica was registered."""

    def send(self, group: int, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> PendingCall:
        return host_call(self._send, group, layer, rows, counts)

    def _send(self, group: int, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> PendingCall:
        call = self.channel.send(group, layer, rows, counts)
        if call is not None:
            return call
        if self.fallback is None:
            raise TransportError(f"expert group {group} has no registered replica")
        self.fallbacks += 1
        return self.fallback._send(group, layer, rows, counts)
