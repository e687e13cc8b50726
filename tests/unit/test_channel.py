"""The direct router -> expert-group channel over real loopback sockets (no Ray): exact tensors
round trip, calls from several threads are merged, a stopped or killed replica's calls go to
another, strangers and replayed handshakes are refused. The Ray-backed registry is exercised in
tests/ray/test_directory.py and tests/ray/test_serve*.py;
here an in-memory one stands in for the application's directory actor (serve/directory.py)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest
import torch

from raymoe.serve.channel import (MAGIC, NONCE_BYTES, ChannelError, ExpertChannel, ExpertServer, _recv_exact,
                                  challenge_response, recv_reply, send_call)


class MemoryRegistry:
    """directory.Registry's stand-in: group -> {replica: address}."""

    def __init__(self):
        self.entries: dict[int, dict[str, str]] = {}

    def register(self, group, replica, address):
        self.entries.setdefault(group, {})[replica] = address

    def deregister(self, group, replica):
        self.entries.get(group, {}).pop(replica, None)

    def drop_address(self, group, address):
        for replica, a in list(self.entries.get(group, {}).items()):
            if a == address:
                del self.entries[group][replica]

    def addresses(self, group):
        return sorted(self.entries.get(group, {}).values())


def registry_of(*servers: ExpertServer) -> MemoryRegistry:
    """A registry listing the servers as the replicas of group 0."""
    reg = MemoryRegistry()
    for i, server in enumerate(servers):
        reg.register(0, f"replica{i}", server.address)
    return reg


class Recorder:
    """An expert group's compute: y = 2x + layer, per call; remembers how calls were batched."""

    def __init__(self, delay: threading.Event | None = None):
        self.batches: list[int] = []
        self.delay = delay
        self.entered = threading.Event()

    def __call__(self, calls):
        self.entered.set()
        if self.delay is not None:
            self.delay.wait(5)
        self.batches.append(len(calls))
        return [rows * 2 + layer for layer, rows, counts in calls]


def test_rows_come_back_exactly_for_every_dtype_and_empty_calls():
    server = ExpertServer(Recorder(), token="t")
    reg = registry_of(server)
    channel = ExpertChannel("t", num_groups=1, registry=reg)
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            rows = torch.randn(37, 16).to(dtype)
            out = channel.send(0, 3, rows, torch.tensor([30, 7])).result()
            assert out.dtype == dtype and torch.equal(out, rows * 2 + 3)
        empty = channel.send(0, 1, torch.empty(0, 16), torch.tensor([0, 0])).result()
        assert empty.shape == (0, 16)
        big = torch.randn(8192, 1024)  # 32 MiB: more than one send can take, so the parts go out in pieces
        assert torch.equal(channel.send(0, 0, big, torch.tensor([8000, 192])).result(), big * 2)
    finally:
        server.close()


def test_counts_reach_the_group_unchanged():
    seen = []

    def run(calls):
        seen.extend(counts.tolist() for _, _, counts in calls)
        return [rows for _, rows, _ in calls]

    server = ExpertServer(run, token="t")
    reg = registry_of(server)
    try:
        ExpertChannel("t", 1, registry=reg).send(0, 0, torch.zeros(9, 4), torch.tensor([2, 0, 7])).result()
        assert seen == [[2, 0, 7]]
    finally:
        server.close()


def test_calls_arriving_together_from_several_routers_are_merged_into_one_batch():
    gate = threading.Event()
    gate.set()
    compute = Recorder(delay=gate)
    server = ExpertServer(compute, token="t")
    reg = registry_of(server)
    channel = ExpertChannel("t", 1, registry=reg)
    results, connected, go = {}, threading.Barrier(6), threading.Event()

    def router(i):  # each thread has its own connection, like several routers
        channel.send(0, 0, torch.zeros(1, 4), torch.tensor([1])).result()  # connect and warm up
        connected.wait(5)
        go.wait(5)
        if i > 0:
            assert compute.entered.wait(5)  # call 0 is being computed
        results[i] = channel.send(0, 0, torch.full((2, 4), float(i)), torch.tensor([2])).result()

    threads = [threading.Thread(target=router, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    connected.wait(5)
    gate.clear()
    compute.batches.clear()
    compute.entered.clear()
    go.set()
    threads[0].join(0.3)  # call 0 reaches the server, which then blocks on the gate...
    time.sleep(0.5)  # ...while calls 1-4 are written to their sockets
    gate.set()
    for t in threads:
        t.join(10)
    server.close()
    assert compute.batches == [1, 4]
    for i in range(5):
        assert torch.equal(results[i], torch.full((2, 4), 2.0 * i))


def test_calls_are_dealt_round_robin_over_a_groups_replicas():
    a, b = Recorder(), Recorder()
    sa, sb = ExpertServer(a, token="t"), ExpertServer(b, token="t")
    reg = registry_of(sa, sb)
    channel = ExpertChannel("t", 1, registry=reg)
    try:
        for _ in range(10):
            channel.send(0, 0, torch.ones(1, 4), torch.tensor([1])).result()
        assert (sa.calls_served, sb.calls_served) == (5, 5)
    finally:
        sa.close()
        sb.close()


def test_a_replica_stopped_between_calls_is_skipped_and_no_call_fails():
    a, b = ExpertServer(Recorder(), token="t"), ExpertServer(Recorder(), token="t")
    reg = registry_of(a, b)
    channel = ExpertChannel("t", 1, registry=reg, refresh_s=60.0)  # a stale list: the failure must be handled
    try:
        for _ in range(4):
            channel.send(0, 0, torch.ones(3, 4), torch.tensor([3])).result()
        a.close()  # Serve scaled it down; routers have not re-read the registry yet
        for _ in range(6):
            call = channel.send(0, 0, torch.ones(3, 4), torch.tensor([3]))
            try:
                out = call.result()
            except ChannelError:  # the call was already on a connection the replica closed
                out = channel.send(0, 0, torch.ones(3, 4), torch.tensor([3])).result()
            assert torch.equal(out, torch.full((3, 4), 2.0))
        assert b.calls_served >= 6
    finally:
        b.close()


def test_a_killed_replica_left_in_the_registry_is_dropped_from_it():
    a, b = ExpertServer(Recorder(), token="t"), ExpertServer(Recorder(), token="t")
    reg = registry_of(a, b)
    a.close()  # nothing listens at a's address any more, but its entry is still there
    channel = ExpertChannel("t", 1, registry=reg)
    try:
        for _ in range(3):
            assert torch.equal(channel.send(0, 0, torch.ones(1, 2), torch.tensor([1])).result(), torch.full((1, 2), 2.0))
        assert reg.addresses(0) == [b.address]
    finally:
        b.close()


def test_no_live_replica_means_send_returns_none_for_the_serve_handle_fallback():
    reg = MemoryRegistry()
    assert ExpertChannel("t", 1, registry=reg).send(0, 0, torch.ones(1, 2), torch.tensor([1])) is None


def _greeted(address: str) -> tuple[socket.socket, bytes]:
    """A raw connection to a server and the nonce it challenged with."""
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    greeting = _recv_exact(s, len(MAGIC) + NONCE_BYTES)
    assert greeting[: len(MAGIC)] == MAGIC
    return s, bytes(greeting[len(MAGIC):])


def _refused(s: socket.socket) -> None:
    with pytest.raises((ChannelError, OSError)):  # the server hangs up: at the send or at the read
        send_call(s, 0, torch.ones(1, 2), torch.tensor([1]))
        recv_reply(s, torch.float32)


def test_a_connection_without_the_token_gets_nothing():
    server = ExpertServer(Recorder(), token="secret")
    try:
        s, nonce = _greeted(server.address)
        with s:
            s.sendall(MAGIC + challenge_response("not-the-secret", nonce))
            _refused(s)
        assert server.calls_served == 0
    finally:
        server.close()


def test_an_answer_overheard_on_one_connection_is_refused_on_the_next():
    """Challenge-response: each connection gets its own nonce, so replaying a router's handshake
    (or the old fixed sha256(token) greeting) opens nothing."""
    server = ExpertServer(Recorder(), token="secret")
    try:
        first, nonce = _greeted(server.address)
        answer = MAGIC + challenge_response("secret", nonce)
        with first:
            first.sendall(answer)
            send_call(first, 0, torch.ones(1, 2), torch.tensor([1]))
            assert recv_reply(first, torch.float32).shape == (1, 2)  # the genuine answer works once
        second, other = _greeted(server.address)
        assert other != nonce
        with second:
            second.sendall(answer)
            _refused(second)
        third, _ = _greeted(server.address)
        with third:
            third.sendall(MAGIC + hashlib.sha256(b"secret").digest())
            _refused(third)
        assert server.calls_served == 1
    finally:
        server.close()


def test_a_failing_group_reports_the_error_and_keeps_serving():
    def run(calls):
        if calls[0][0] == 99:
            raise ValueError("no layer 99 here")
        return [rows for _, rows, _ in calls]

    server = ExpertServer(run, token="t")
    reg = registry_of(server)
    channel = ExpertChannel("t", 1, registry=reg)
    try:
        with pytest.raises(RuntimeError, match="no layer 99 here"):
            channel.send(0, 99, torch.ones(1, 2), torch.tensor([1])).result()
        assert torch.equal(channel.send(0, 1, torch.ones(1, 2), torch.tensor([1])).result(), torch.ones(1, 2))
    finally:
        server.close()


def test_an_unreadable_registry_keeps_the_known_replicas_serving():
    """A directory call that fails (its actor restarting, a timeout) must not fail routed calls."""
    server = ExpertServer(Recorder(), token="t")
    reg = registry_of(server)
    try:
        channel = ExpertChannel("t", 1, registry=reg, refresh_s=0.0)
        assert channel.send(0, 0, torch.ones(1, 2), torch.tensor([1])).result().shape == (1, 2)
        reg.addresses = lambda group: (_ for _ in ()).throw(TimeoutError("directory busy"))
        assert channel.send(0, 0, torch.ones(1, 2), torch.tensor([1])).result().shape == (1, 2)
    finally:
        server.close()
