"""The ExpertGroup autoscaling policy: it sums the tokens/s the routers report for its group,
ignores stale reports, and asks for ceil(load / target) replicas within the deployment's bounds."""

from __future__ import annotations

from types import SimpleNamespace


from raymoe.serve import autoscale
from raymoe.serve.autoscale import REPORT_STALE_S, desired_replicas, expert_group_autoscaling, routed_load
from raymoe.serve.experts import TokenRate


def test_desired_replicas_is_load_over_target_rounded_up_within_bounds():
    assert desired_replicas(0, 100, 1, 4) == 1
    assert desired_replicas(250, 100, 1, 4) == 3
    assert desired_replicas(10_000, 100, 1, 4) == 4


def test_token_rate_is_a_sliding_window():
    rate = TokenRate(window_s=2)
    rate.add(100, now=10.0)
    rate.add(300, now=11.0)
    assert rate.rate(now=11.5) == 200  # 400 tokens over a 2 s window
    assert rate.rate(now=12.5) == 150  # the first event left the window


def test_routed_load_sums_fresh_router_reports_for_one_group():
    now = 1000.0
    reports = [{"t": now - 1, "tokens_per_s": [300.0, 5.0]},
               {"t": now - 2, "tokens_per_s": [200.0, 0.0]},
               {"t": now - REPORT_STALE_S - 1, "tokens_per_s": [9999.0, 9999.0]}]  # a router that died
    assert routed_load(reports, 0, now) == (500.0, 2)
    assert routed_load(reports, 1, now) == (5.0, 2)
    assert routed_load([], 0, now) == (0.0, 0)


class FakeBoard:
    reads = 0

    def __init__(self, key):
        assert key == "app-key"

    def reports(self):
        FakeBoard.reads += 1
        return FakeBoard.current


def _ctx(state, lo=1, hi=4, group=0):
    cfg = expert_group_autoscaling(lo, hi, target_tokens_per_s=100, app_key="app-key", group=group)
    policy = SimpleNamespace(policy_kwargs=cfg["policy"]["policy_kwargs"])
    return SimpleNamespace(config=SimpleNamespace(policy=policy), policy_state=state, deployment_name=f"ExpertGroup{group}",
                           capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi)


def test_policy_scales_the_hot_group_and_keeps_the_cold_one_at_its_minimum(monkeypatch):
    monkeypatch.setattr(autoscale, "_board", FakeBoard)
    now = autoscale.time.time()
    FakeBoard.current = [{"t": now, "tokens_per_s": [350.0, 20.0]}, {"t": now, "tokens_per_s": [100.0, 0.0]}]
    hot, hot_state = autoscale.expert_load_policy(_ctx({}, group=0))
    cold, cold_state = autoscale.expert_load_policy(_ctx({}, group=1))
    assert (hot, hot_state["routed_tokens_per_s"], hot_state["routers"]) == (4, 450.0, 2)  # ceil(450/100) = 5, capped at 4
    assert (cold, cold_state["routed_tokens_per_s"]) == (1, 20.0)


def test_policy_reads_the_board_at_most_every_half_second(monkeypatch):
    monkeypatch.setattr(autoscale, "_board", FakeBoard)
    FakeBoard.current, FakeBoard.reads = [{"t": autoscale.time.time(), "tokens_per_s": [250.0]}], 0
    want, state = autoscale.expert_load_policy(_ctx({}))
    FakeBoard.current = []  # the load vanished, but the cached reading stands until it is re-read
    again, state = autoscale.expert_load_policy(_ctx(state))
    assert (want, again, FakeBoard.reads) == (3, 3, 1)
    state["read_at"] -= 1.0
    later, _ = autoscale.expert_load_policy(_ctx(state))
    assert (later, FakeBoard.reads) == (1, 2)

