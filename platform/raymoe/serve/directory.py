"""One application's soft state shared by its replicas: where each expert group's replicas listen
(the direct channel) and how many tokens per second each router sends each group (the autoscaler).

It lives in one small named Ray actor per application (`Directory`, public Ray API: named
actors, `get_if_exists`), not in Ray's private GCS key-value store:

    directory = AppDirectory(settings.app_key)
    registry, board = Registry(directory), LoadBoard(directory)
    registry.register(group, replica_id, "10.0.0.5:41234")      # an ExpertGroup replica, every 2 s
    registry.addresses(group)                                   # a router, about once a second
    board.publish(router_id, [tokens_per_s, ...])               # a router, once a second
    board.reports()                                             # the autoscaling policy

Everything in it is soft state with a time to live: replicas re-register every HEARTBEAT_S and
routers publish every second, and an entry not refreshed for ENTRY_TTL_S is gone (its replica died
without a word). So the actor needs neither persistence nor a restart policy: whichever replica
of the application touches it first creates it and owns it; when that replica stops, the actor
goes with it, the next replica to call creates a new one, and within one heartbeat it holds
everything again. Nothing outlives the application: every owner is one of its replicas. The
Serve controller (where the autoscaling policy runs) only looks the actor up, so it never owns it.
"""

from __future__ import annotations

import json
import threading
import time

import ray

NAMESPACE = "raymoe-serve"
"""Every application's directory actor is named in this Ray namespace."""
ENTRY_TTL_S = 10.0
"""An entry not refreshed for this long is dropped (its replica or router died without a word)."""
HEARTBEAT_S = 2.0
"""How often an ExpertGroup replica re-registers its address."""
CALL_TIMEOUT_S = 5.0
"""A directory call not answered by then fails (the caller keeps serving and retries later)."""


@ray.remote(num_cpus=0, max_restarts=0)
class Directory:
    """Sections of key -> (value, time written); entries older than `ttl_s` read as absent."""

    def __init__(self, ttl_s: float = ENTRY_TTL_S):
        self.ttl_s = ttl_s
        self.sections: dict[str, dict[str, tuple[str, float]]] = {}

    def put(self, section: str, key: str, value: str) -> None:
        self.sections.setdefault(section, {})[key] = (value, time.time())

    def delete(self, section: str, key: str | None = None, value: str | None = None) -> int:
        """Delete `key`, or every key holding `value`; returns how many went."""
        entries = self.sections.get(section, {})
        gone = [k for k, (v, _) in entries.items() if (key is None or k == key) and (value is None or v == value)]
        for k in gone:
            del entries[k]
        return len(gone)

    def read(self, section: str) -> dict[str, str]:
        entries = self.sections.get(section, {})
        cutoff = time.time() - self.ttl_s
        for k in [k for k, (_, t) in entries.items() if t < cutoff]:
            del entries[k]
        return {k: v for k, (v, _) in sorted(entries.items())}


class AppDirectory:
    """A process's client of one application's Directory actor (thread-safe).

    `create=False` (the Serve controller) only looks the actor up and reads nothing while there is
    none; otherwise the first call creates it, and a call that finds it dead creates it again."""

    def __init__(self, app_key: str, *, create: bool = True, ttl_s: float = ENTRY_TTL_S):
        self.name = f"raymoe-directory-{app_key}"
        self.create, self.ttl_s = create, ttl_s
        self._actor = None
        self._lock = threading.Lock()

    def _handle(self):
        with self._lock:
            if self._actor is None:
                if self.create:
                    self._actor = Directory.options(name=self.name, namespace=NAMESPACE, get_if_exists=True).remote(self.ttl_s)
                else:
                    try:
                        self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
                    except ValueError:  # not created yet, or its owner just stopped
                        return None
            return self._actor

    def call(self, method: str, *args, default=None):
        """Run one Directory method; `default` when there is no directory to read (create=False)."""
        for attempt in range(2):
            actor = self._handle()
            if actor is None:
                return default
            try:
                return ray.get(getattr(actor, method).remote(*args), timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                # Its owner stopped and took it along: look it up (or create it) afresh, once.
                with self._lock:
                    self._actor = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class Registry:
    """Where the replicas of each expert group listen, for routers' direct channels (channel.py)."""

    def __init__(self, directory: AppDirectory):
        self.directory = directory

    def register(self, group: int, replica: str, address: str) -> None:
        self.directory.call("put", f"replicas/{group}", replica, address)

    def deregister(self, group: int, replica: str) -> None:
        self.directory.call("delete", f"replicas/{group}", replica)

    def drop_address(self, group: int, address: str) -> None:
        """Forget a replica that refused connections (it died without deregistering)."""
        self.directory.call("delete", f"replicas/{group}", None, address)

    def addresses(self, group: int) -> list[str]:
        return sorted(self.directory.call("read", f"replicas/{group}", default={}).values())


class Heartbeat:
    """Re-registers one replica's address every HEARTBEAT_S until stopped (a background thread)."""

    def __init__(self, registry: Registry, group: int, replica: str, address: str, every_s: float = HEARTBEAT_S):
        self.registry, self.group, self.replica, self.address = registry, group, replica, address
        self._stop = threading.Event()
        registry.register(group, replica, address)
        self._thread = threading.Thread(target=self._run, args=(every_s,), name="raymoe-directory-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.registry.register(self.group, self.replica, self.address)
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the entry outlives a few
                print(f"raymoe: could not refresh expert group {self.group}'s address: {e}", flush=True)

    def stop(self) -> None:
        """Stop refreshing and leave the registry at once, so routers stop choosing this replica."""
        self._stop.set()
        self.registry.deregister(self.group, self.replica)


class LoadBoard:
    """The routers' reports of routed tokens per second per expert group (autoscale.py reads them)."""

    def __init__(self, directory: AppDirectory):
        self.directory = directory

    def publish(self, router: str, tokens_per_s: list[float], now: float | None = None) -> None:
        report = {"t": time.time() if now is None else now, "tokens_per_s": [round(r, 3) for r in tokens_per_s]}
        self.directory.call("put", "load", router, json.dumps(report))

    def withdraw(self, router: str) -> None:
        self.directory.call("delete", "load", router)

    def reports(self) -> list[dict]:
        return [json.loads(v) for v in self.directory.call("read", "load", default={}).values()]
