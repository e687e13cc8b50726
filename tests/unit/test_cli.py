"""The installed `raymoe` console script, run as a user would: help, parameter reports, config
checks, and config errors that exit 2 in one line before Ray is ever imported.

    .venv/bin/python -m pytest tests/unit/test_cli.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from readonly import read_only_dir
from raymoe.config import load_config
from raymoe.model.params import format_report
from tiny_hf import save

REPO = Path(__file__).resolve().parents[2]
RAYMOE = os.path.join(os.path.dirname(sys.executable), "raymoe")
CONFIGS = REPO / "jobs" / "configs"


def _raymoe(*args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([RAYMOE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_console_script_is_installed():
    assert os.access(RAYMOE, os.X_OK), RAYMOE


def test_help_lists_every_command():
    r = _raymoe("--help")
    assert r.returncode == 0, r.stderr
    for command in ("train", "params", "check"):
        assert command in r.stdout
    assert "Mixture-of-Experts" in r.stdout


def test_no_command_is_a_usage_error():
    r = _raymoe()
    assert r.returncode == 2
    assert "usage: raymoe" in r.stderr


def test_train_with_impossible_config_exits_2_in_one_line_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: bad\noutput_dir: {tmp_path / 'out'}\nmodel:\n  num_experts: 8\n  top_k: 9\n")
    t0 = time.monotonic()
    r = _raymoe("train", str(bad), cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert elapsed < 15, f"took {elapsed:.1f}s: it should fail before starting Ray"
    lines = r.stderr.strip().splitlines()
    assert lines == [f"raymoe: config error: {bad}: model.top_k=9 must be in [1, model.num_experts=8]"]
    assert r.stdout == ""
    out = (r.stdout + r.stderr).lower()
    assert "started a local ray instance" not in out
    assert "ray" not in out.replace("raymoe", "")  # no Ray startup chatter at all
    assert not (tmp_path / "out").exists()  # nothing was written for a run that never began


def test_train_with_bad_override_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("name: ok\ntrain:\n  steps: 100\n  warmup_steps: 10\n")
    r = _raymoe("train", str(cfg), "--set", "train.warmup_steps=1000", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"raymoe: config error: {cfg}: train.warmup_steps=1000 must be in [0, train.steps=100]"
    ]


def test_train_with_missing_config_exits_2_saying_so(tmp_path):
    r = _raymoe("train", "missing.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "raymoe: config error: missing.yaml: no such config file"


def test_params_reports_deepseek_v3_at_671b_total_and_37b_activated():
    r = _raymoe("params", "jobs/configs/deepseek-v3.yaml")
    assert r.returncode == 0, r.stderr
    assert "671.03B" in r.stdout
    assert "36.63B" in r.stdout
    total = next(line for line in r.stdout.splitlines() if line.startswith("total"))
    activated = next(line for line in r.stdout.splitlines() if line.startswith("activated "))
    assert total.split()[1:] == ["671.03B", "671,026,404,352"]
    assert activated.split()[1:] == ["36.63B", "36,625,603,584"]


def test_params_reports_mixtral_8x7b_at_46_7b_total():
    r = _raymoe("params", "jobs/configs/mixtral-8x7b.yaml")
    assert r.returncode == 0, r.stderr
    total = next(line for line in r.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1] == "46.70B"


def test_params_applies_overrides():
    base = _raymoe("params", "jobs/configs/mixtral-8x7b.yaml")
    more = _raymoe("params", "jobs/configs/mixtral-8x7b.yaml", "--set", "model.num_experts=16")
    assert more.returncode == 0, more.stderr
    assert "16 routed experts" in more.stdout
    assert more.stdout != base.stdout


def test_check_accepts_the_demo_config():
    r = _raymoe("check", "jobs/configs/demo.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok: jobs/configs/demo.yaml (demo)"


def test_check_accepts_every_shipped_config_at_once():
    # Not finetune-demo.yaml: its init_from is the model `make demo` registers (test_shipped_configs
    # loads it against a stand-in).
    paths = sorted(str(p.relative_to(REPO)) for p in CONFIGS.glob("*.yaml") if "init_from:" not in p.read_text())
    r = _raymoe("check", *paths)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == len(paths)


def test_check_rejects_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  balance:\n    foo: 1\n")
    r = _raymoe("check", str(bad))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"{bad}: unknown key model.balance.foo" in r.stderr


def test_check_reports_every_bad_file_and_exits_2(tmp_path):
    files = {
        "a.yaml": "name: a\n",
        "bad1.yaml": "name: bad1\ntrain:\n  steps: 10\n   lr: 3.0e-4\n",
        "b.yaml": "name: b\n",
        "bad2.yaml": "name: bad2\nmodel:\n  top_k: 9\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    r = _raymoe("check", *files, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout.splitlines() == ["ok: a.yaml (a)", "ok: b.yaml (b)"]
    assert r.stderr.splitlines() == [
        "raymoe: config error: bad1.yaml:4:6: not valid YAML: mapping values are not allowed here",
        "raymoe: config error: bad2.yaml: model.top_k=9 must be in [1, model.num_experts=8]",
    ]




@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_unwritable_output_dir_exits_2_in_one_line_before_ray_starts(tmp_path, command, where):
    if where == "under_a_file":
        (tmp_path / "afile").write_text("")
        out, reason = tmp_path / "afile" / "out", f"{tmp_path / 'afile'} is a file, not a directory"
    else:
        out, reason = read_only_dir(), "Operation not permitted"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"name: run\noutput_dir: {out}\ntune:\n  space:\n    train.lr: {{loguniform: [1.0e-4, 1.0e-3]}}\n")
    r = _raymoe(command, str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"raymoe: config error: output_dir={out} is not writable ({reason}); set output_dir to a writable directory"
    ]
    assert r.stdout == ""


def test_unwritable_data_cache_dir_exits_2_naming_the_key(tmp_path):
    cache = read_only_dir()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"name: run\noutput_dir: {tmp_path / 'out'}\ndata:\n  cache_dir: {cache}\n")
    r = _raymoe("train", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"raymoe: config error: data.cache_dir={cache} is not writable (Operation not permitted); "
                                     "set data.cache_dir to a writable directory (null = <output_dir>/data)"]


@pytest.mark.parametrize("command", ["train", "params"])
def test_override_without_equals_exits_2(command):
    r = _raymoe(command, "jobs/configs/demo.yaml", "--set", "train.lr")
    assert r.returncode == 2
    assert "--set 'train.lr' must look like key.path=value" in r.stderr


@pytest.mark.slow
def test_import_params_and_export_of_a_hugging_face_checkpoint(tmp_path):
    """As a user runs them: import a Hugging Face directory, count it, export it back; a second
    import into the same place is refused in one line and leaves the first untouched."""
    hf_dir, _ = save("Qwen2MoeForCausalLM", tmp_path / "hf")
    r = _raymoe("import", hf_dir, "--out", str(tmp_path / "model"))
    assert r.returncode == 0, r.stderr
    assert "Qwen2MoeForCausalLM -> raymoe model" in r.stdout and "tokenizer: yes" in r.stdout
    assert (tmp_path / "model" / "config.yaml").exists() and (tmp_path / "model" / "tokenizer.json").exists()

    hf_report = _raymoe("params", hf_dir)
    assert hf_report.returncode == 0, hf_report.stderr
    # The same table as for the equivalent raymoe config (the imported model's config.yaml).
    assert format_report(load_config(tmp_path / "model" / "config.yaml").model, 4096) in hf_report.stdout

    r = _raymoe("export", str(tmp_path / "model"), str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]

    before = sorted(os.listdir(tmp_path / "model"))
    again = _raymoe("import", hf_dir, "--out", str(tmp_path / "model"))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "already exists and is not empty" in again.stderr
    assert sorted(os.listdir(tmp_path / "model")) == before


@pytest.mark.slow
def test_import_of_an_unsupported_architecture_exits_2_naming_it(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    r = _raymoe("import", str(tmp_path / "llama"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "architectures='LlamaForCausalLM' is not supported" in r.stderr
    assert not (tmp_path / "out").exists()
