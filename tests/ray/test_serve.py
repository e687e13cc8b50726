"""Serving on the session's local Ray: the routed apps (router + 2 ExpertGroup deployments, a hot
expert replicated in both) and the monolithic app answer the same requests with the same text,
over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.model_dir import save_model

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = config_from_dict({"name": "tiny-serve", "model": {"hidden_size": 32, "num_layers": 3, "first_k_dense_layers": 1,
                                                         "num_experts": 8, "top_k": 2, "max_seq_len": 128}})
    model = MoETransformer(cfg.model)
    model.init_weights(0)
    d = tmp_path_factory.mktemp("model")
    save_model(model, cfg, str(d))
    return str(d)


def _hot_expert_placement():
    """Expert 0 hot: 8 experts on 2 groups of 5 slots, so the two spare slots become copies."""
    from raymoe.serve.placement import plan_placement

    return plan_placement([100, 40, 5, 5, 5, 5, 5, 5], 2, slots_per_group=5)


@pytest.fixture(scope="module")
def served(serve_session, model_dir):
    """The monolithic app and two routed apps, one per data path (the direct channel and Serve
    handles), both on a planned placement that replicates the hot expert 0. Routed serving on the
    default contiguous placement is held against transformers in test_hf_e2e.py."""
    from ray import serve

    from raymoe.serve.deployments import build_app
    from raymoe.serve.settings import ServeSettings

    placement = _hot_expert_placement().to_dict()
    serve.run(build_app(ServeSettings.of(model_dir, mode="monolithic")), name="mono", route_prefix="/mono")
    # CPU reservations fit all three apps in the session's 4 CPUs.
    serve.run(build_app(ServeSettings.of(model_dir, mode="routed", num_groups=2, placement=placement, router_cpus=0.5,
                                      group_cpus=0.25)), name="routed", route_prefix="/routed")
    serve.run(build_app(ServeSettings.of(model_dir, mode="routed", num_groups=2, placement=placement, data_path="handle",
                                      router_cpus=0.25, group_cpus=0.125)), name="handle", route_prefix="/handle")
    yield serve_session
    for name in ("mono", "routed", "handle"):
        serve.delete(name)


def test_routed_and_monolithic_apps_give_the_same_completions(served):
    with httpx.Client(timeout=60) as http:
        for prompt in ("def ", "import os\n", "x = "):
            req = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
            mono = http.post(f"{served}/mono/v1/completions", json=req).json()
            for app in ("routed", "handle"):  # the direct channel and Serve handles
                routed = http.post(f"{served}/{app}/v1/completions", json=req).json()
                assert routed["choices"][0]["text"] == mono["choices"][0]["text"], (app, prompt)
                assert routed["usage"]["completion_tokens"] == 12
        direct = http.get(f"{served}/routed/v1/expert_load").json()["groups"]
        handle = http.get(f"{served}/handle/v1/expert_load").json()["groups"]
    assert (direct["data_path"], direct["fallbacks"]) == ("direct", 0)  # every call went over the channel
    assert handle["data_path"] == "handle"
    assert direct["tokens"] == handle["tokens"]  # the same routed slots reached the same groups


def test_routed_router_makes_at_most_one_call_per_group_per_layer_per_step(served):
    with httpx.Client(timeout=60) as http:
        http.post(f"{served}/routed/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0})
        load = http.get(f"{served}/routed/v1/expert_load").json()
    calls, tokens = load["groups"]["calls"], load["groups"]["tokens"]
    forwards = load["decode_steps"] + load["prefills"]
    assert sum(tokens) == sum(load["total_per_expert"])  # every routed slot went to exactly one group
    assert all(c > 0 for c in calls)
    # 2 MoE layers x 2 groups: never more than 4 hops per forward (decode steps + prefills).
    assert sum(calls) <= 4 * forwards


def test_bad_request_is_a_4xx_and_streaming_works_through_serve(served):
    with httpx.Client(timeout=60) as http:
        bad = http.post(f"{served}/routed/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "error" in bad.json()
        with http.stream("POST", f"{served}/routed/v1/completions", json={"prompt": "def ", "max_tokens": 6, "stream": True, "temperature": 0}) as r:
            lines = [l for l in r.iter_lines() if l.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 2


def test_a_planned_placement_with_a_replicated_hot_expert_serves_the_same_text(served):
    placement = _hot_expert_placement()
    assert placement.replicas[0] == 2 and sorted(placement.groups[0] + placement.groups[1]) != list(range(8))
    with httpx.Client(timeout=60) as http:
        for prompt in ("def ", "x = "):
            req = {"prompt": prompt, "max_tokens": 10, "temperature": 0}
            mono = http.post(f"{served}/mono/v1/completions", json=req).json()["choices"][0]["text"]
            placed = http.post(f"{served}/routed/v1/completions", json=req).json()["choices"][0]["text"]
            assert placed == mono, prompt
        load = http.get(f"{served}/routed/v1/expert_load").json()
    assert load["groups"]["placement"]["replicas"]["0"] == 2
    assert all(t > 0 for t in load["groups"]["tokens"])


def _scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every sample on this node's Ray metrics endpoint (Prometheus text format)."""
    import re
    import urllib.request

    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for line in body.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1).startswith("ray_raymoe_"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out.append((m.group(1)[len("ray_"):], labels, float(m.group(3))))
    return out


def test_operator_metrics_reach_rays_prometheus_endpoint(served):
    """Request latency, TTFT, time per output token, finish reasons, tokens routed to each group
    and replicas per group, as an operator's Prometheus scrapes them (exported every 2 s here, conftest.py)."""
    import time

    with httpx.Client(timeout=60) as http:
        for _ in range(2):
            r = http.post(f"{served}/routed/v1/completions", json={"prompt": "def ", "max_tokens": 5, "temperature": 0})
            assert r.status_code == 200
    want = {"request_latency_seconds_count", "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
            "requests_total", "output_tokens_total", "requests_running", "routed_tokens_total", "expert_group_replicas"}
    def total(name, **labels):
        return sum(v for n, lab, v in samples if n == f"raymoe_{name}" and all(lab.get(k) == w for k, w in labels.items()))

    # Each process exports on its own ~10 s cycle: wait until every replica has exported once.
    deadline = time.time() + 45
    while True:
        samples = _scrape()
        names = {n[len("raymoe_"):] for n, _, _ in samples}
        replicas = [total("expert_group_replicas", group=g) for g in ("0", "1")]
        if (want <= names and min(replicas) >= 2) or time.time() > deadline:
            break
        time.sleep(2)
    assert want <= names, f"missing from the metrics endpoint: {sorted(want - names)}"

    assert total("time_to_first_token_seconds_count", model="tiny-serve") >= 2
    assert total("requests_total", model="tiny-serve", finish_reason="length") >= 2
    assert total("output_tokens_total", model="tiny-serve") >= 10
    assert total("request_latency_seconds_sum") > total("time_to_first_token_seconds_sum") > 0
    for g in ("0", "1"):
        assert total("routed_tokens_total", group=g) > 0
        # The "routed" and "handle" apps each run one replica of every group.
        assert total("expert_group_replicas", group=g) >= 2, [(lab.get("WorkerId", "")[:8], lab.get("group"), v) for n, lab, v in samples if n == "raymoe_expert_group_replicas"]
    assert {lab.get("group") for n, lab, _ in samples if n == "raymoe_routed_tokens_total"} == {"0", "1"}  # bounded labels
