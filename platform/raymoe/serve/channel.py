"""A direct data path between Router replicas and ExpertGroup replicas: plain TCP, one fixed
binary frame per call, no pickle.

Why: a Serve handle call costs a few milliseconds on a busy machine (docs/PERFORMANCE.md), and a
routed decode step makes one sequential round of group calls per MoE layer. A socket round trip
between two processes costs tens of microseconds plus the copy.

What Serve still owns: every ExpertGroup replica is a Serve replica. Serve starts it, checks its
health, scales it on the load the routers report (autoscale.py) and stops it. Each replica
opens an `ExpertServer` when it starts and keeps its address registered in its application's
directory (a named actor, directory.py); Serve calling the replica's destructor on a graceful
stop removes it, and an address not refreshed for ten seconds expires. Routers read that registry (at most once a second, and at once after a failure) and deal
each group's calls round-robin over its live replicas.

Failures: a call whose connection breaks (the replica was killed, or Serve is stopping it) is sent
again to another live replica of the group; expert groups are stateless, so a retry is always
safe. With no live replica in the registry the caller falls back to the Serve handle, which
waits for Serve to bring one up.

Wire format (little-endian). A connection opens with a challenge: the server sends MAGIC and 32
random bytes, the client answers MAGIC + HMAC-SHA256(token, those bytes), and the server closes a
connection whose answer is wrong (constant-time comparison). An answer overheard on one
connection is worthless on the next, and the token never crosses the wire. Then, per call:
    request:  int32 layer, rows, dim, local_experts, dtype  |  int64 counts[local_experts]  |  rows x dim values
    reply:    int32 status (0 ok, 1 error), rows, dim        |  rows x dim values (or a UTF-8 message)
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import secrets
import selectors
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Callable

import torch

from raymoe.serve.transport import TransportError

if TYPE_CHECKING:
    from raymoe.serve.directory import Registry

MAGIC = b"RMX1"
REQUEST = struct.Struct("<5i")
REPLY = struct.Struct("<3i")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

Call = tuple[int, torch.Tensor, torch.Tensor]
"""(layer, rows sorted by local expert [n, D], tokens per local expert [e])."""


class ChannelError(TransportError):
    """The replica at the other end is gone or refused the call; send it elsewhere."""


NONCE_BYTES = 32


def challenge_response(token: str, nonce: bytes) -> bytes:
    """What a client proves knowing the token with, for this connection's nonce only."""
    return hmac.new(token.encode(), b"raymoe-expert-channel/" + nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelError("connection closed by the other end")
        got += k
    return buf


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _tensor_from(buf: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def _send_parts(sock: socket.socket, *parts) -> None:
    """Send the parts back to back in as few system calls as the socket allows (one, usually)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0], sent = views[0][sent:], 0


def send_call(sock: socket.socket, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> None:
    n, d = rows.shape
    head = REQUEST.pack(layer, n, d, counts.numel(), DTYPES.index(rows.dtype))
    _send_parts(sock, head + counts.to(torch.int64).numpy().tobytes(), _tensor_bytes(rows) if n else b"")


def recv_call(sock: socket.socket) -> Call:
    layer, n, d, e, code = REQUEST.unpack(_recv_exact(sock, REQUEST.size))
    if not (0 <= code < len(DTYPES)) or n < 0 or d <= 0 or e <= 0:
        raise ValueError(f"malformed call header (layer={layer} rows={n} dim={d} experts={e} dtype={code})")
    counts = _tensor_from(_recv_exact(sock, 8 * e), torch.int64, (e,))
    dtype = DTYPES[code]
    rows = _tensor_from(_recv_exact(sock, n * d * dtype.itemsize), dtype, (n, d))
    return layer, rows, counts


def recv_reply(sock: socket.socket, dtype: torch.dtype) -> torch.Tensor:
    status, n, d = REPLY.unpack(_recv_exact(sock, REPLY.size))
    if status != 0:
        raise RuntimeError(f"expert group failed the call: {_recv_exact(sock, n).decode(errors='replace')}")
    return _tensor_from(_recv_exact(sock, n * d * dtype.itemsize), dtype, (n, d))


class ExpertServer:
    """Serves one ExpertGroup replica's experts over TCP.

    One thread does everything: it waits for any connection to have a call, reads one call from
    each connection that has one, runs them together through `run_calls` (the same function the
    Serve-handle path uses, so calls from several routers become one grouped GEMM per layer), and
    writes the replies. No hand-off between threads sits on the path of a call.
    """

    def __init__(self, run_calls: Callable[[list[Call]], list[torch.Tensor]], token: str, host: str = "127.0.0.1",
                 poll_s: float = 0.2):
        self.run_calls, self.token, self.poll_s = run_calls, token, poll_s
        self.listener = socket.create_server((host, 0))
        self.listener.setblocking(False)
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.closing = False
        self.calls_served = 0
        self.batches_run = 0
        self._thread = threading.Thread(target=self._loop, name="expert-channel", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "listener")

        def drop(conn: socket.socket) -> None:
            sel.unregister(conn)
            conn.close()

        try:
            while not self.closing:
                calls: list[Call] = []
                callers: list[socket.socket] = []
                for key, _ in sel.select(timeout=self.poll_s):
                    conn = key.fileobj
                    if key.data == "listener":
                        while True:  # everyone waiting to connect
                            try:
                                new, _ = self.listener.accept()
                            except OSError:
                                break  # none left (or closing)
                            new.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                            new.settimeout(5.0)  # accepted sockets block: a frame, once started, arrives whole
                            nonce = secrets.token_bytes(NONCE_BYTES)
                            try:
                                new.sendall(MAGIC + nonce)
                            except OSError:
                                new.close()
                                continue
                            sel.register(new, selectors.EVENT_READ, ("hello", challenge_response(self.token, nonce)))
                        continue
                    try:
                        if isinstance(key.data, tuple):  # ("hello", the answer this connection owes)
                            hello = _recv_exact(conn, len(MAGIC) + len(key.data[1]))
                            if hello[: len(MAGIC)] != MAGIC or not hmac.compare_digest(bytes(hello[len(MAGIC):]), key.data[1]):
                                drop(conn)  # not one of our routers
                            else:
                                sel.modify(conn, selectors.EVENT_READ, "calls")
                            continue
                        calls.append(recv_call(conn))
                        callers.append(conn)
                    except ValueError as e:
                        _send_error(conn, str(e))
                        drop(conn)
                    except (ChannelError, OSError):
                        drop(conn)  # the router went away
                if not calls:
                    continue
                try:
                    outs, error = self.run_calls(calls), None
                except Exception as e:  # noqa: BLE001 - reported to every caller of the batch
                    outs, error = [None] * len(calls), f"{type(e).__name__}: {e}"
                self.calls_served += len(calls)
                self.batches_run += 1
                for conn, out in zip(callers, outs):
                    try:
                        if error is not None:
                            _send_error(conn, error)
                        else:
                            _send_parts(conn, REPLY.pack(0, out.shape[0], out.shape[1]), _tensor_bytes(out) if out.shape[0] else b"")
                    except OSError:
                        drop(conn)
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()

    def close(self) -> None:
        """Stop serving: connections close, and routers send their next calls to other replicas."""
        self.closing = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # refuse new connections at once
        except OSError:
            pass
        self._thread.join(timeout=5 * self.poll_s)


def _send_error(conn: socket.socket, message: str) -> None:
    msg = message.encode()
    conn.sendall(REPLY.pack(1, len(msg), 0) + msg)


class ChannelCall:
    """A call in flight on one connection; `result()` reads the reply."""

    def __init__(self, client: "ExpertChannel", group: int, address: str, sock: socket.socket, dtype: torch.dtype):
        self.client, self.group, self.address, self.sock, self.dtype = client, group, address, sock, dtype

    def result(self) -> torch.Tensor:
        try:
            out = recv_reply(self.sock, self.dtype)
            self.client._unread.discard(self.sock)
            return out
        except (OSError, ChannelError) as e:
            self.client._broken(self.group, self.address, e)
            raise ChannelError(f"expert group {self.group} replica {self.address}: {e}") from e


class ExpertChannel:
    """A router's side: picks a live replica of a group and sends it the call.

    Connections are per thread (decode micro-batches run in threads) and kept open.
    `refresh_s` bounds how stale the replica list may be, so a replica Serve just added receives
    calls within about a second.
    """

    def __init__(self, token: str, num_groups: int, registry: "Registry", refresh_s: float = 1.0,
                 timeout_s: float = 30.0):
        """`registry`: where group replicas are listed (directory.Registry, or any object with
        `addresses(group)` and `drop_address(group, address)`)."""
        self.token = token
        self.registry = registry
        self.num_groups, self.refresh_s, self.timeout_s = num_groups, refresh_s, timeout_s
        self._addresses: list[list[str]] = [[] for _ in range(num_groups)]
        self._read_at = [0.0] * num_groups
        self._turn = [itertools.count() for _ in range(num_groups)]
        self._local = threading.local()
        self._unread: set[socket.socket] = set()
        self.failures = 0

    def _live(self, g: int) -> list[str]:
        if time.monotonic() - self._read_at[g] > self.refresh_s:
            try:
                self._addresses[g] = self.registry.addresses(g)
            except Exception as e:  # noqa: BLE001 - a registry hiccup: keep calling the replicas known so far
                logging.getLogger("raymoe.serve").warning("expert group %d: registry unreadable (%s); using %d known replica(s)",
                                                          g, e, len(self._addresses[g]))
            self._read_at[g] = time.monotonic()
        return self._addresses[g]

    def _conn(self, address: str) -> socket.socket:
        conns = self._local.__dict__.setdefault("conns", {})
        sock = conns.get(address)
        if sock is not None and sock in self._unread:
            # A reply on it was never read (its caller failed in between): the stream is out of
            # step, so start a fresh connection.
            self._unread.discard(sock)
            sock.close()
            sock = None
        if sock is None:
            host, port = address.rsplit(":", 1)
            sock = socket.create_connection((host, int(port)), timeout=2.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout_s)
            try:
                greeting = _recv_exact(sock, len(MAGIC) + NONCE_BYTES)
            except OSError:
                sock.close()
                raise
            if greeting[: len(MAGIC)] != MAGIC:
                sock.close()
                raise ChannelError(f"{address} is not an expert channel (bad greeting)")
            sock.sendall(MAGIC + challenge_response(self.token, bytes(greeting[len(MAGIC):])))
            conns[address] = sock
        return sock

    def _broken(self, g: int, address: str, error: BaseException) -> None:
        """Close that connection and stop using the address until the registry is read again."""
        self.failures += 1
        sock = self._local.__dict__.get("conns", {}).pop(address, None)
        if sock is not None:
            self._unread.discard(sock)
            sock.close()
        if address in self._addresses[g]:
            self._addresses[g] = [a for a in self._addresses[g] if a != address]
        if isinstance(error, ConnectionRefusedError):
            try:
                self.registry.drop_address(g, address)
            except Exception:  # noqa: BLE001 - it expires from the registry by itself (directory.ENTRY_TTL_S)
                pass

    def send(self, g: int, layer: int, rows: torch.Tensor, counts: torch.Tensor) -> ChannelCall | None:
        """Send to a live replica of group g; None when the registry has none left."""
        tried: set[str] = set()
        for _ in range(2):  # the cached list, then a fresh read of the registry
            live = [a for a in self._live(g) if a not in tried]
            for i in range(len(live)):
                address = live[(next(self._turn[g]) + i) % len(live)]
                tried.add(address)
                try:
                    sock = self._conn(address)
                    send_call(sock, layer, rows, counts)
                    self._unread.add(sock)
                    return ChannelCall(self, g, address, sock, rows.dtype)
                except OSError as e:
                    self._broken(g, address, e)
            self._read_at[g] = 0.0
        return None
