"""The typed serve: section and its checks against the model: every impossible setting fails
before Ray starts, in one line naming the key, from the config loader, `raymoe serve` and the
serve_apps builder alike (that one is in test_serve_apps.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raymoe.config import ConfigError, config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.model_dir import save_model
from raymoe.serve.settings import default_model, settings_from_config

RAYMOE = os.path.join(os.path.dirname(sys.executable), "raymoe")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = config_from_dict({"name": "tiny", "model": {"hidden_size": 32, "num_layers": 2, "num_experts": 8, "max_seq_len": 128}})
    d = str(tmp_path_factory.mktemp("serve") / "model")
    save_model(MoETransformer(cfg.model), cfg, d)
    return d


def _settings(serve: dict, **top):
    return settings_from_config(config_from_dict({**top, "serve": serve}), log=lambda line: None)


@pytest.mark.parametrize("serve, message", [
    ({"router_replicas": [2, 1]}, "serve.router_replicas=[2, 1] must be >= 1"),
    ({"group_replicas": 0}, "serve.group_replicas=0 must be >= 1"),
    ({"micro_batches": 8, "max_batch": 4}, "serve.micro_batches=8 must be <= serve.max_batch=4"),
    ({"compile_decode": True}, "serve.compile_decode needs serve.mode=monolithic"),
    ({"compile_decode": True, "mode": "monolithic", "micro_batches": 2}, "serve.compile_decode needs serve.micro_batches=1"),
    ({"max_tokens": 512, "max_len": 512}, "serve.max_tokens=512 must be < serve.max_len=512"),
    ({"port": 70000}, "serve.port=70000 must be in [1, 65535]"),
    ({"mode": "both"}, "serve.mode='both' must be one of"),
    ({"groups": 2}, "unknown key serve.groups"),
])
def test_impossible_serve_settings_fail_at_load_naming_the_key(serve, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"serve": serve})
    assert message in str(e.value)


def test_settings_resolve_the_model_placement_and_key(model_dir, tmp_path, monkeypatch):
    placement = {"num_groups": 2, "groups": [[0, 1, 2, 3, 4], [4, 5, 6, 7]], "replicas": {**{str(e): 1 for e in range(8)}, "4": 2}}
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(placement))
    monkeypatch.setenv("MY_KEY", "s3cret")
    s = _settings({"model": model_dir, "placement": str(path), "api_key_env": "MY_KEY", "group_replicas": [1, 3]})
    assert s.model == model_dir and s.placement == placement and s.api_key == "s3cret"
    assert s.serve.group_range == (1, 3) and s.serve.router_range == (1, 1)
    monkeypatch.delenv("MY_KEY")
    assert _settings({"model": model_dir, "api_key_env": "MY_KEY"}).api_key is None  # unset = open


def test_a_null_model_serves_what_the_configs_training_made(tmp_path):
    registered = config_from_dict({"name": "demo", "tracking": {"registered_model": "raymoe-demo"}})
    assert default_model(registered) == "models:/raymoe-demo/latest"
    plain = config_from_dict({"name": "demo", "output_dir": str(tmp_path)})
    assert default_model(plain) == os.path.join(str(tmp_path), "runs", "demo")
    with pytest.raises(ConfigError, match=r"serve\.model=.*runs/demo.*no such directory.*serves what its training made"):
        settings_from_config(plain, log=lambda line: None)


@pytest.mark.parametrize("serve, message", [
    ({"num_groups": 3}, r"serve\.num_groups=3 must divide the 8 routed experts of 'tiny'"),
    ({"placement": "{missing}"}, r"serve\.placement=.*cannot be read"),
    ({"placement": "{other}"}, r"serve\.placement=.* places 4 experts in 2 groups, but 'tiny' has 8 routed experts"),
    ({"placement": "{broken}"}, r"serve\.placement=.* is not JSON"),
])
def test_settings_that_do_not_fit_the_model_fail_naming_the_key(model_dir, tmp_path, serve, message):
    files = {"missing": tmp_path / "nope.json", "other": tmp_path / "other.json", "broken": tmp_path / "broken.json"}
    files["other"].write_text(json.dumps({"num_groups": 2, "groups": [[0, 1], [2, 3]], "replicas": {str(e): 1 for e in range(4)}}))
    files["broken"].write_text("{not json")
    serve = {k: (v.format(**{n: str(p) for n, p in files.items()}) if isinstance(v, str) else v) for k, v in serve.items()}
    with pytest.raises(ConfigError, match=message):
        _settings({"model": model_dir, **serve})
    _settings({"model": model_dir, "mode": "monolithic", "num_groups": 3})  # groups do not apply to monolithic


def test_a_routed_dense_model_is_refused_with_the_fix(tmp_path):
    cfg = config_from_dict({"name": "dense", "model": {"hidden_size": 32, "num_layers": 2, "num_experts": 0, "max_seq_len": 128}})
    save_model(MoETransformer(cfg.model), cfg, str(tmp_path / "dense"))
    with pytest.raises(ConfigError, match="serve.mode=routed needs routed experts and 'dense' has none; set serve.mode=monolithic"):
        _settings({"model": str(tmp_path / "dense")})


@pytest.mark.slow
def test_raymoe_serve_fails_before_ray_in_one_line_naming_the_key(model_dir):
    """What an operator sees: exit 2, one line, the key to change, and no Ray started (a Ray
    start prints its own lines and takes seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([RAYMOE, "serve", model_dir, "--groups", "3", "--set", "serve.max_batch=4"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "raymoe: config error: serve.num_groups=3 must divide the 8 routed experts of 'tiny' (or give serve.placement from `raymoe placement`)"]
    assert "Ray" not in r.stdout + r.stderr


def test_a_model_directory_carries_its_fine_tuning_chat_template(tmp_path):
    """The template a fine-tuning run rendered with travels in the model directory (MLflow, other
    machines): serving finds it there after the training-side file is gone."""
    from raymoe.model_dir import CHAT_TEMPLATE, open_source
    from raymoe.serve.deployments import chat_template_of
    from raymoe.train.data import ByteTokenizer

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    cfg = config_from_dict({"name": "chat", "model": {"hidden_size": 32, "num_layers": 2, "max_seq_len": 128},
                            "data": {"format": "sft", "chat_template": str(template)}})
    out = str(tmp_path / "model")
    assert CHAT_TEMPLATE in save_model(MoETransformer(cfg.model), cfg, out)
    text = template.read_text()
    template.unlink()
    src = open_source(out)
    chat = chat_template_of(src.cfg, ByteTokenizer(), src.path)
    assert chat is not None and chat.text == text
    assert chat.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == "<|user|>\nhi\n<|assistant|>\n"
    assert chat_template_of(src.cfg, ByteTokenizer()) is None  # without the directory: the file is gone


def test_docs_serving_lists_every_serve_key_with_its_default():
    import dataclasses
    from pathlib import Path

    from raymoe.config import ServeConfig

    text = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    for f in dataclasses.fields(ServeConfig):
        shown = "null" if f.default is None else f.default
        assert f"| `{f.name}` |" in text and f"| `{shown}` |" in text, f.name
