"""serve/directory.py on the session's local Ray: the named directory actor that replaced Ray's
private internal KV for expert-group discovery and router load reports."""

from __future__ import annotations

import time
import uuid

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_directory_follows_its_owner_recovers_from_heartbeats_and_expires_silent_replicas(ray_cluster):
    ray = ray_cluster
    from raymoe.serve.directory import NAMESPACE, AppDirectory, Heartbeat, LoadBoard, Registry

    key = uuid.uuid4().hex[:8]

    @ray.remote(num_cpus=0)
    class Replica:
        """Stands in for an ExpertGroup replica: the first to call creates (and owns) the directory."""

        def start(self, key, address):
            self.beat = Heartbeat(Registry(AppDirectory(key, ttl_s=1.0)), 0, "r-owner", address, every_s=0.2)

    owner = Replica.remote()
    ray.get(owner.start.remote(key, "10.0.0.1:1"))
    registry = Registry(AppDirectory(key))
    registry.register(0, "r-driver", "10.0.0.2:2")
    registry.register(1, "r-other-group", "10.0.0.3:3")
    assert registry.addresses(0) == ["10.0.0.1:1", "10.0.0.2:2"]
    assert registry.addresses(1) == ["10.0.0.3:3"]
    registry.drop_address(0, "10.0.0.2:2")  # a replica that refused connections
    assert registry.addresses(0) == ["10.0.0.1:1"]

    # The controller's reader never creates a directory, and reads nothing where there is none.
    assert LoadBoard(AppDirectory(uuid.uuid4().hex[:8], create=False)).reports() == []
    board = LoadBoard(AppDirectory(key, create=False))
    LoadBoard(AppDirectory(key)).publish("router-a", [12.5, 0.0])
    assert [r["tokens_per_s"] for r in board.reports()] == [[12.5, 0.0]]

    # The owner goes, and the directory with it (nothing outlives the application's replicas).
    ray.kill(owner)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            ray.get_actor(f"raymoe-directory-{key}", namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the directory outlived the replica that created it")
    assert board.reports() == []  # the controller's side: no directory, no load, no error

    # A heartbeat of a surviving replica creates it again and fills it within one beat.
    survivor = Heartbeat(Registry(AppDirectory(key, ttl_s=1.0)), 0, "r-survivor", "10.0.0.4:4", every_s=0.2)
    time.sleep(0.5)
    assert registry.addresses(0) == ["10.0.0.4:4"]
    # A replica that dies without a word (no heartbeat, no deregister) expires after the TTL...
    survivor._stop.set()
    time.sleep(1.5)
    assert registry.addresses(0) == []
    # ...and one that stops cleanly leaves at once.
    beat = Heartbeat(Registry(AppDirectory(key, ttl_s=1.0)), 0, "r-clean", "10.0.0.5:5", every_s=0.2)
    assert registry.addresses(0) == ["10.0.0.5:5"]
    beat.stop()
    assert registry.addresses(0) == []
