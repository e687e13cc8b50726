"""Expert placement for serving: the contiguous default, the EPLB-style planner on hand-checked
examples, its invariants on random loads, JSON round trips, load history and user errors.

    .venv/bin/python -m pytest tests/unit/test_placement.py -q
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from raymoe.serve.placement import Placement, contiguous_placement, load_from_history, plan_placement, report

# Two hot experts that training's contiguous layout puts in the same group.
SKEWED = [100, 90, 1, 1, 1, 1, 1, 1]
MEAN_GROUP_LOAD = sum(SKEWED) / 4  # 49.0


def assert_valid(p: Placement, num_experts: int, slots_per_group: int) -> None:
    """Every expert hosted, no group with two copies of one expert, every group full."""
    hosted = [e for experts in p.groups for e in experts]
    assert set(hosted) == set(range(num_experts))
    for experts in p.groups:
        assert len(experts) == slots_per_group
        assert len(set(experts)) == len(experts)
    for e in range(num_experts):
        assert p.replicas[e] == hosted.count(e) == len(p.group_of(e))


def test_contiguous_placement_matches_training_expert_layout():
    p = contiguous_placement(8, 4)
    assert p.groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert p.replicas == {e: 1 for e in range(8)}
    assert p.group_of(5) == [2]
    assert p.num_experts == 8


def test_uniform_load_is_perfectly_balanced_under_contiguous_placement():
    assert contiguous_placement(8, 4).balance([7] * 8) == 1.0
    assert contiguous_placement(8, 4).balance([0] * 8) == 1.0  # no load, nothing to balance


def test_plan_without_spare_slots_separates_hot_experts_to_the_optimum():
    before = contiguous_placement(8, 4)
    assert before.group_loads(SKEWED) == [190, 2, 2, 2]
    assert before.balance(SKEWED) == pytest.approx(MEAN_GROUP_LOAD / 190)

    after = plan_placement(SKEWED, 4)
    assert_valid(after, 8, 2)
    assert all(n == 1 for n in after.replicas.values())
    # 100 -> g0, 90 -> g1, then the 1s fill the empty groups first and the last two top up g1, g0.
    assert after.groups == ((0, 7), (1, 6), (2, 4), (3, 5))
    assert after.group_loads(SKEWED) == [101, 91, 2, 2]
    # Optimal: expert 0 shares its group with at least one other expert, so max >= 100 + 1.
    assert after.balance(SKEWED) == pytest.approx(MEAN_GROUP_LOAD / 101)


def test_spare_slots_replicate_the_hottest_experts_and_improve_balance():
    after = plan_placement(SKEWED, 4, slots_per_group=3)
    assert_valid(after, 8, 3)
    # 4 spare slots, each to the highest load per copy: 0 (100), 1 (90), 0 (50), 1 (45).
    assert after.replicas == {0: 3, 1: 3, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}
    assert after.group_of(0) == [0, 1, 2]
    assert after.groups == ((0, 1, 6), (0, 1, 7), (0, 4, 5), (1, 2, 3))
    assert after.group_loads(SKEWED) == pytest.approx([100 / 3 + 30 + 1, 100 / 3 + 30 + 1, 100 / 3 + 2, 30 + 2])
    assert after.balance(SKEWED) == pytest.approx(MEAN_GROUP_LOAD / (100 / 3 + 31))
    assert after.balance(SKEWED) > plan_placement(SKEWED, 4).balance(SKEWED)


def test_max_replicas_caps_copies_and_spreads_spare_slots_to_cooler_experts():
    after = plan_placement(SKEWED, 4, slots_per_group=3, max_replicas=2)
    assert_valid(after, 8, 3)
    # 0 and 1 stop at 2 copies; the next spare slots go to the lowest ids among the 1s.
    assert after.replicas == {0: 2, 1: 2, 2: 2, 3: 2, 4: 1, 5: 1, 6: 1, 7: 1}
    assert after.group_loads(SKEWED) == pytest.approx([51, 51, 47, 47])
    assert after.balance(SKEWED) == pytest.approx(MEAN_GROUP_LOAD / 51)


def test_packing_recovers_when_every_free_slot_already_holds_the_expert():
    # Every expert gets 2 copies (per copy 1.5, 1.5, 0.5 x4). Greedy fills groups 1 and 2 first and
    # is left with both copies of expert 5 and only group 0 free; a move makes room.
    load = [3, 3, 1, 1, 1, 1]
    p = plan_placement(load, 3, slots_per_group=4, max_replicas=2)
    assert_valid(p, 6, 4)
    assert p.replicas == {e: 2 for e in range(6)}
    # Optimal: four 1.5-copies of two experts over 3 groups put two in one group: 3 + 0.5 + 0.5.
    assert sorted(p.group_loads(load)) == pytest.approx([3, 3, 4])
    assert p.balance(load) == pytest.approx((10 / 3) / 4)


def test_plan_is_valid_on_random_loads():
    for seed in range(300):
        rng = random.Random(seed)
        num_groups = rng.randint(1, 8)
        num_experts = rng.randint(num_groups, 24)
        slots = rng.randint(-(-num_experts // num_groups), num_experts)
        max_replicas = rng.randint(-(-slots * num_groups // num_experts), num_groups)
        load = [int(rng.paretovariate(1.0) * 10) for _ in range(num_experts)]
        p = plan_placement(load, num_groups, slots, max_replicas)
        assert_valid(p, num_experts, slots)
        assert max(p.replicas.values()) <= max_replicas
        assert sum(p.group_loads(load)) == pytest.approx(sum(load))


def test_plan_is_deterministic_and_accepts_numpy_and_torch():
    load = [5, 5, 5, 9, 9, 0, 0, 3]
    first = plan_placement(load, 4, slots_per_group=3)
    assert plan_placement(load, 4, slots_per_group=3) == first
    assert plan_placement(np.array(load), 4, slots_per_group=3) == first
    assert plan_placement(torch.tensor(load), 4, slots_per_group=3) == first
    # Ties go to the lower expert id: 3 and 4 are equally hot, only one spare slot.
    one_spare = plan_placement(load, 3, slots_per_group=3)
    assert [e for e, n in one_spare.replicas.items() if n > 1] == [3]


def test_to_dict_from_dict_round_trip_through_json():
    p = plan_placement(SKEWED, 4, slots_per_group=3)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["replicas"]["0"] == 3
    back = Placement.from_dict(d)
    assert back == p
    assert back.balance(SKEWED) == p.balance(SKEWED)


def test_from_dict_rejects_an_inconsistent_placement():
    with pytest.raises(ValueError, match="group 0 hosts experts \\[1\\] more than once"):
        Placement.from_dict({"num_groups": 2, "groups": [[1, 1], [0, 2]], "replicas": {"0": 1, "1": 2, "2": 1}})
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        Placement.from_dict({"num_groups": 2, "groups": [[0], [2]], "replicas": {"0": 1, "2": 1}})
    with pytest.raises(ValueError, match="replicas\\[0\\]=2 but 1 groups host expert 0"):
        Placement.from_dict({"num_groups": 2, "groups": [[0], [1]], "replicas": {"0": 2, "1": 1}})
    with pytest.raises(ValueError, match="unknown placement keys \\['layers'\\]"):
        Placement.from_dict({"num_groups": 1, "groups": [[0]], "replicas": {"0": 1}, "layers": 2})


def test_load_from_history_sums_layers_and_last_n_steps():
    history = [
        {"step": 10, "load": [[10, 20, 30, 40], [25, 25, 25, 25]]},
        {"step": 20, "load": [[40, 30, 20, 10], [0, 50, 50, 0]]},
    ]
    history = json.loads(json.dumps(history))  # as read back from expert_load.json
    np.testing.assert_array_equal(load_from_history(history), [75, 125, 125, 75])
    np.testing.assert_array_equal(load_from_history(history, last_n=1), [40, 80, 70, 10])
    np.testing.assert_array_equal(load_from_history(history, last_n=5), [75, 125, 125, 75])
    assert plan_placement(load_from_history(history), 2).balance(load_from_history(history)) == 1.0


def test_load_from_history_rejects_bad_input():
    with pytest.raises(ValueError, match="history is empty"):
        load_from_history([])
    with pytest.raises(ValueError, match="last_n=0 must be >= 1"):
        load_from_history([{"step": 1, "load": [[1, 2]]}], last_n=0)
    with pytest.raises(ValueError, match="step=2: 3 experts, but earlier entries have 2"):
        load_from_history([{"step": 1, "load": [[1, 2]]}, {"step": 2, "load": [[1, 2, 3]]}])


def test_report_shows_group_loads_and_balance_before_and_after():
    text = report(SKEWED, contiguous_placement(8, 4), plan_placement(SKEWED, 4, slots_per_group=3))
    lines = text.splitlines()
    assert lines[0] == "expert placement: 8 experts over 4 groups, total load 196"
    assert lines[2].split() == ["before", "0.258", "190.0", "190.0", "2.0", "2.0", "2.0"]
    assert lines[3].split() == ["after", "0.762", "64.3", "64.3", "64.3", "35.3", "32.0"]
    assert "replicated (expert x copies): 0x3 1x3" in text
    no_spare = report(SKEWED, contiguous_placement(8, 4), plan_placement(SKEWED, 4))
    assert "replicated (expert x copies): none" in no_spare


def test_user_errors_name_what_to_change():
    with pytest.raises(ValueError, match="num_groups=3 must divide num_experts=8"):
        contiguous_placement(8, 3)
    with pytest.raises(ValueError, match="num_groups=3 must divide num_experts=8 .* slots_per_group >= 3"):
        plan_placement(SKEWED, 3)
    assert_valid(plan_placement(SKEWED, 3, slots_per_group=3), 8, 3)  # 9 slots: G need not divide E
    with pytest.raises(ValueError, match="= 6 slots cannot host num_experts=8; need slots_per_group >= 2"):
        plan_placement(SKEWED, 6, slots_per_group=1)
    with pytest.raises(ValueError, match="max_replicas=5 must be in 1..num_groups=4"):
        plan_placement(SKEWED, 4, slots_per_group=3, max_replicas=5)
    with pytest.raises(ValueError, match="exceed num_experts=8 \\* max_replicas=1"):
        plan_placement(SKEWED, 4, slots_per_group=3, max_replicas=1)
    with pytest.raises(ValueError, match="load_E has 7 entries but the placement has 8 experts"):
        contiguous_placement(8, 4).balance(SKEWED[:7])
    with pytest.raises(ValueError, match="load_E has 9 entries"):
        report(SKEWED + [1], contiguous_placement(8, 4), contiguous_placement(8, 4))
    with pytest.raises(ValueError, match="shape \\[E\\]"):
        plan_placement([SKEWED, SKEWED], 4)
    with pytest.raises(ValueError, match="non-negative"):
        plan_placement([1, -1], 2)
