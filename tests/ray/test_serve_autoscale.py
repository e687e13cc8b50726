"""Per-group autoscaling on the expert load the routers report: traffic whose tokens all route to group 0 makes
that ExpertGroup scale up while group 1 stays at its minimum; when the load falls it scales back
down; no request fails at any point, with routers on the direct channel (channel.py)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.model_dir import save_model

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def hot_group_model(tmp_path_factory):
    """A model whose routers always choose experts of group 0 (experts 0-3 of 8)."""
    cfg = config_from_dict({"name": "skewed", "model": {"hidden_size": 32, "num_layers": 2, "num_experts": 8, "top_k": 2,
                                                      "max_seq_len": 128}})
    model = MoETransformer(cfg.model)
    model.init_weights(0)
    for moe in model.moe_layers():
        moe.router.expert_bias[:4] = 10.0  # selection bias: group 0 wins every choice
    d = tmp_path_factory.mktemp("skewed")
    save_model(model, cfg, str(d))
    return str(d)


def _replicas(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def test_hot_group_scales_up_then_down_and_cold_group_stays_at_minimum(serve_url, hot_group_model):
    from ray import serve

    from raymoe.serve.deployments import build_app
    from raymoe.serve.settings import ServeSettings

    settings = ServeSettings.of(hot_group_model, mode="routed", num_groups=2, group_replicas=(1, 2), target_tokens_per_s=20,
                             downscale_delay_s=4.0)
    serve.run(build_app(settings), name="skew", route_prefix="/skew")
    assert _replicas("skew", "ExpertGroup0") == 1 and _replicas("skew", "ExpertGroup1") == 1

    url, heavy, stop, statuses = f"{serve_url}/skew/v1/completions", threading.Event(), threading.Event(), []
    heavy.set()

    def client(i):
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                if i > 0 and not heavy.is_set():
                    time.sleep(0.2)  # light phase: one client keeps requests flowing through the scale-down
                    continue
                light = not heavy.is_set()
                r = http.post(url, json={"prompt": f"def f{i}(", "max_tokens": 2 if light else 16, "seed": i})
                statuses.append(r.status_code)
                if light:
                    time.sleep(4.0)  # a trickle: under 10 routed tokens/s, half of one replica's target

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    start = time.monotonic()
    for t in threads:
        t.start()
    scaled_up_after = _wait_for(lambda: _replicas("skew", "ExpertGroup0") >= 2, start, 60)
    reported = httpx.get(f"{serve_url}/skew/v1/expert_load").json()["groups"]["tokens_per_s"]  # what the policy read
    time.sleep(2)  # keep heavy traffic flowing across the new replica's start
    cold_during_load = _replicas("skew", "ExpertGroup1")
    up_statuses = len(statuses)
    heavy.clear()
    light_start = time.monotonic()
    scaled_down_after = _wait_for(lambda: _replicas("skew", "ExpertGroup0") == 1
                                  and serve.status().applications["skew"].deployments["ExpertGroup0"].status == "HEALTHY",
                                  light_start, 60)
    time.sleep(2)  # and the trickle goes on after the replica is gone
    stop.set()
    for t in threads:
        t.join()
    load = httpx.get(f"{serve_url}/skew/v1/expert_load").json()
    print(f"hot group reached 2 replicas {scaled_up_after} s after the load started and went back to 1 "
          f"{scaled_down_after} s after it fell; {up_statuses} requests during the load, {len(statuses) - up_statuses} after; "
          f"{load['groups']['retries']} expert calls retried, {load['groups']['fallbacks']} through a Serve handle")
    assert scaled_up_after is not None and scaled_up_after < 30
    assert cold_during_load == 1  # the cold group stays at its minimum
    assert reported[0] > settings.serve.target_tokens_per_s and reported[1] == 0
    assert scaled_down_after is not None
    assert len(statuses) > up_statuses  # requests were in flight during the scale-down
    assert statuses and set(statuses) == {200}  # no request failed while scaling up or down
    assert load["groups"]["data_path"] == "direct"
    assert load["groups"]["tokens"][1] == 0 and load["groups"]["tokens"][0] > 0


def _wait_for(condition, start: float, timeout_s: float) -> float | None:
    """Seconds from start until condition() held (polled every 0.5 s), or None."""
    while time.monotonic() - start < timeout_s:
        if condition():
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def test_replicas_killed_under_load_fail_no_unstarted_request_and_end_cut_streams_with_an_error_event(serve_url, hot_group_model):
    """Two Router replicas and two replicas of each ExpertGroup under streaming and non-streaming
    load; first an ExpertGroup0 replica (the group every token goes to) is killed, then a Router
    replica. A non-streamed request has shown its client nothing, so every one must succeed (an
    expert call is sent to the group's other replica; a request is sent to the other Router); a
    stream the dead Router had started ends with an OpenAI-shaped error event and [DONE], never
    truncated."""
    import json

    import ray
    from ray import serve

    from raymoe.serve.deployments import build_app
    from raymoe.serve.settings import ServeSettings

    settings = ServeSettings.of(hot_group_model, mode="routed", num_groups=2, router_replicas=2, group_replicas=(2, 2),
                                router_cpus=0.5, group_cpus=0.25)
    serve.run(build_app(settings), name="kills", route_prefix="/kills")
    base, stop, statuses, streams, done_at = f"{serve_url}/kills/v1", threading.Event(), [], [], []

    def plain(i):
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                statuses.append(http.post(f"{base}/completions", json={"prompt": f"x{i}", "max_tokens": 24, "seed": i}).status_code)
                done_at.append(time.monotonic())

    def streaming(i):
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                body = {"prompt": f"s{i}", "max_tokens": 48, "seed": i, "stream": True}
                with http.stream("POST", f"{base}/completions", json=body) as r:
                    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                streams.append((r.status_code, events))

    def victims(kind):
        return [a for a in ray.util.list_named_actors(all_namespaces=True) if "kills" in a["name"] and kind in a["name"]]

    threads = [threading.Thread(target=plain, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=streaming, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)
    groups, routers = victims("ExpertGroup0"), victims("Router")
    assert len(groups) == 2 and len(routers) == 2, (groups, routers)
    ray.kill(ray.get_actor(groups[0]["name"], namespace=groups[0]["namespace"]), no_restart=True)
    time.sleep(3)
    # Each Router counts its own resent expert calls: read both (Serve alternates) before one dies.
    retries = max(httpx.get(f"{base}/expert_load").json()["groups"]["retries"] for _ in range(4))
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(routers[0]["name"], namespace=routers[0]["namespace"]), no_restart=True)
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join()
    load = httpx.get(f"{base}/expert_load").json()
    errored = [events for _, events in streams if any('"error"' in e for e in events)]
    after = sorted(t for t in done_at if t > killed_at)
    gap = max(b - a for a, b in zip([killed_at] + after, after)) if after else None
    print(f"{len(statuses)} plain requests, {len(streams)} streams; after the ExpertGroup0 kill {retries} expert call(s) "
          f"resent; after the Router kill {len(errored)} stream(s) ended by it, {load['ingress']['resent']} call(s) resent "
          f"before and {load['ingress']['lost_mid_way']} cut after their first token, longest gap between completions {gap:.2f} s")
    assert statuses and set(statuses) == {200}  # no request that had not started failed
    assert all(code == 200 and events[-1] == "[DONE]" for code, events in streams)  # none truncated
    for events in errored:  # an error event, in OpenAI's shape, right before [DONE]
        assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert len(errored) <= 3  # at most the streams in flight on the killed Router
    assert load["ingress"]["lost_mid_way"] >= len(errored)
    assert retries >= 1 and load["groups"]["data_path"] == "direct"
    assert gap is not None and gap < 10
