"""`raymoe plan`: the layout it chooses for the shipped DeepSeek configs, its per-rank figures in
closed form from the parameter counts, and a refusal that says what would fit.
(tests/distributed/test_fsdp.py checks the same figures against held bytes.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raymoe.config import load_config
from raymoe.model.params import count_params
from raymoe.parallel.memory import GB, Layout, plan_layout, rank_memory

REPO = Path(__file__).resolve().parents[2]
RAYMOE = os.path.join(os.path.dirname(sys.executable), "raymoe")
V2_LITE = REPO / "jobs/configs/deepseek-v2-lite.yaml"
V3 = REPO / "jobs/configs/deepseek-v3.yaml"


def test_state_bytes_are_sixteen_per_trainable_parameter_split_by_layout():
    cfg = load_config(V2_LITE)
    c = count_params(cfg.model)
    routed = c.breakdown["routed_experts"]
    dense = c.total - routed
    rep = rank_memory(cfg, 8, Layout(8, "replicate", 1))
    assert rep.params == 4 * (dense + routed // 8)  # fp32 master weights
    assert rep.grads == rep.params
    assert rep.optimizer == 2 * rep.params  # two fp32 AdamW moments
    fsdp = rank_memory(cfg, 8, Layout(8, "fsdp", 1))
    # Dense tensors sharded 8 ways (dim 0 rounded up per tensor); experts unchanged.
    assert 4 * (dense / 8 + routed / 8) <= fsdp.params < 4 * (dense / 8 + routed / 8) * 1.001
    assert fsdp.activations == rep.activations


def test_v2_lite_on_8x80gb_needs_recomputation_and_v3_on_256_a_smaller_micro_batch():
    plan = plan_layout(load_config(V2_LITE), gpus=8, gpu_memory=80 * GB)
    layout, mem = plan.chosen
    assert layout == Layout(8, "replicate", 1)
    assert mem.total <= 72 * GB
    # Keeping every block's activations fits nowhere. With recomputation, replicated dense
    # parameters fit at expert degree 8 only (the fastest such layout: chosen); FSDP-sharded ones
    # at every expert degree (experts FSDP-sharded over their replicas).
    fits = {lay for lay, m in plan.candidates if m.total <= 72 * GB}
    assert fits == {Layout(8, "replicate", 1)} | {Layout(ep, "fsdp", 1) for ep in (8, 4, 2, 1)}

    v3 = load_config(V3)
    plan = plan_layout(v3, gpus=256, gpu_memory=80 * GB)
    assert plan.chosen is None and plan.fits_at_batch == 2
    plan = plan_layout(v3, gpus=256, gpu_memory=80 * GB, batch_size=1)
    assert plan.chosen[0] == Layout(256, "fsdp", 1)
    assert 40 * GB < plan.chosen[1].params + plan.chosen[1].grads + plan.chosen[1].optimizer < 45 * GB


@pytest.mark.slow
def test_cli_prints_the_choice_and_refuses_in_one_line_with_exit_1(capsys):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([RAYMOE, "plan", str(V2_LITE), "--gpus", "8", "--gpu-memory", "80GB"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--set parallel.expert_degree=8 --set parallel.dense=replicate --set train.activation_checkpointing=1" in r.stdout
    r = subprocess.run([RAYMOE, "plan", str(V3), "--gpus", "64", "--gpu-memory", "80GB"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 1
    refusal = [line for line in r.stdout.splitlines() if line.startswith("nothing fits")]
    assert len(refusal) == 1 and "Use more GPUs" in refusal[0]
    from raymoe.cli import main

    with pytest.raises(SystemExit) as exit_:  # argparse refuses the size before anything runs
        main(["plan", str(V3), "--gpus", "8", "--gpu-memory", "lots"])
    assert exit_.value.code == 2 and "is not a size like 4GB" in capsys.readouterr().err


@pytest.mark.parametrize("gpus", [0, -1])
def test_no_gpus_is_refused(gpus):
    with pytest.raises(ValueError, match="--gpus"):
        plan_layout(load_config(V2_LITE), gpus=gpus, gpu_memory=80 * GB)
