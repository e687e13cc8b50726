"""`raymoe submit` / `raymoe jobs` without a cluster: the job a submission describes (entrypoint,
uploads, runtime env), the token-auth switch, and the one-line errors a user can cause.
The real thing, against a two-node cluster, is tests/ray/test_cluster.py.

    .venv/bin/python -m pytest tests/unit/test_submit.py -q
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import raymoe
from raymoe.config import ConfigError
from raymoe.submit import (
    EXCLUDES,
    SubmitError,
    _excluded,
    build_submission,
    enable_token_auth,
    token_source,
)

REPO = Path(__file__).resolve().parents[2]
RAYMOE = os.path.join(os.path.dirname(sys.executable), "raymoe")
DEMO = "jobs/configs/demo.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def test_entrypoint_runs_raymoe_train_with_every_override_intact_through_the_shell():
    overrides = ["train.steps=200", "train.sample_prompt='# a b'", "name=it's", "output_dir=/shared/x y"]
    sub = build_submission("train", DEMO, overrides)
    assert shlex.split(sub.entrypoint) == [
        "python", "-m", "raymoe.cli", "train", DEMO,
        "--set", "train.steps=200", "--set", "train.sample_prompt='# a b'", "--set", "name=it's", "--set", "output_dir=/shared/x y",
    ]
    assert sub.metadata == {"raymoe.command": "train", "raymoe.config": DEMO, "raymoe.name": "it's"}


def test_runtime_env_uploads_the_working_dir_without_local_state_and_ships_this_raymoe():
    sub = build_submission("train", DEMO, working_dir=".")
    env = sub.runtime_env
    assert env["working_dir"] == str(REPO)
    for pattern in (".venv", ".git", ".raymoe", "mlruns", "*.db", "__pycache__", ".pytest_cache"):
        assert pattern in env["excludes"], pattern
    assert env["py_modules"] == [os.path.dirname(raymoe.__file__)]
    assert os.path.isfile(os.path.join(env["py_modules"][0], "cli.py"))
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1"}  # no tracking URI unless given


def test_tracking_uri_reaches_the_job_and_beats_the_config(tmp_path):
    sub = build_submission("train", DEMO, tracking_uri="http://10.0.0.5:5000")
    assert sub.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert "tracking.uri" not in sub.entrypoint  # the config leaves it to the environment
    cfg = REPO / "jobs" / "configs" / "demo.yaml"
    own = tmp_path / "own.yaml"
    own.write_text(cfg.read_text().replace("  uri: null", "  uri: sqlite:////tmp/x.db"))
    sub = build_submission("train", str(own), tracking_uri="http://10.0.0.5:5000", working_dir=str(tmp_path))
    assert shlex.split(sub.entrypoint)[-2:] == ["--set", "tracking.uri=http://10.0.0.5:5000"]


def test_relative_output_dir_and_missing_tracking_uri_are_pointed_out():
    notes = build_submission("train", DEMO).notes
    assert any("output_dir '.raymoe' is relative" in n for n in notes)
    assert any("no --tracking-uri" in n for n in notes)
    assert build_submission("train", DEMO, ["output_dir=/shared/raymoe"], tracking_uri="http://h:5000").notes == ()


def test_tune_resume_is_passed_on_and_train_resume_is_refused():
    assert shlex.split(build_submission("tune", "jobs/configs/tune-demo.yaml", resume=True).entrypoint)[-1] == "--resume"
    with pytest.raises(SubmitError, match="--resume applies to `raymoe submit tune` only"):
        build_submission("train", DEMO, resume=True)


def test_a_config_the_job_could_not_see_is_refused_before_uploading(tmp_path):
    outside = tmp_path / "c.yaml"
    outside.write_text("name: c\n")
    with pytest.raises(SubmitError, match="is outside the uploaded working dir"):
        build_submission("train", str(outside), working_dir=str(REPO))
    (tmp_path / ".raymoe").mkdir()
    hidden = tmp_path / ".raymoe" / "best.yaml"
    hidden.write_text("name: best\n")
    with pytest.raises(SubmitError, match=r"is not uploaded \(it matches the exclude '.raymoe'\)"):
        build_submission("train", str(hidden), working_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="no such config file"):
        build_submission("train", "jobs/configs/nope.yaml")
    with pytest.raises(ConfigError, match="model.top_k=9"):
        build_submission("train", DEMO, ["model.top_k=9"])


@pytest.mark.parametrize("path, pattern", [
    ("jobs/configs/demo.yaml", None),
    ("out/mlflow.db", "*.db"),
    ("bench/results/serve.json", "bench/results"),
    ("a/.venv/lib/x.py", ".venv"),
    ("platform/raymoe/__pycache__/x.pyc", "__pycache__"),
    ("benchmarks/results.yaml", None),
])
def test_excluded_matches_like_gitignore(path, pattern):
    assert _excluded(path, EXCLUDES) == pattern


def test_token_auth_is_switched_on_only_when_unset_and_a_token_exists(tmp_path):
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    assert token_source(env) is None and enable_token_auth(env) is False and "RAY_AUTH_MODE" not in env
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("t" * 64)
    assert enable_token_auth(env) is True and env["RAY_AUTH_MODE"] == "token"
    explicit = {"HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    assert enable_token_auth(explicit) is False and explicit["RAY_AUTH_MODE"] == "disabled"
    assert token_source({"RAY_AUTH_TOKEN": "x"}) == "$RAY_AUTH_TOKEN"
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}) is None  # Ray would refuse it too


# ----------------------------------------------------------------------------- the console script


def _raymoe(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run([RAYMOE, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_submit_and_jobs_are_listed_in_help():
    r = _raymoe("--help")
    assert "submit" in r.stdout and "jobs" in r.stdout
    r = _raymoe("submit", "--help")
    for flag in ("--address", "--tracking-uri", "--no-follow", "--set", "--working-dir"):
        assert flag in r.stdout


def test_submit_with_a_config_error_exits_2_before_contacting_the_cluster():
    r = _raymoe("submit", "train", DEMO, "--set", "model.top_k=9", "--address", "http://127.0.0.1:9")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"raymoe: config error: {DEMO}: model.top_k=9 must be in [1, model.num_experts=8]"]


@pytest.mark.slow
def test_submit_to_an_unreachable_address_exits_2_saying_what_to_check():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = _raymoe("submit", "train", DEMO, "--set", "output_dir=/tmp/x", "--tracking-uri", "http://h:5000",
                "--address", f"http://127.0.0.1:{port}")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"raymoe: cannot reach the Ray dashboard at http://127.0.0.1:{port}")
    assert "check --address" in last


@pytest.mark.slow
def test_jobs_without_an_address_exits_2_asking_for_one():
    r = _raymoe("jobs", "status", "raysubmit_x")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("raymoe: --address is needed: the Ray dashboard of the head node")


def test_submit_of_something_else_is_a_usage_error():
    r = _raymoe("submit", "serve", DEMO)
    assert r.returncode == 2 and "invalid choice: 'serve'" in r.stderr
