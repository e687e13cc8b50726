"""`serve deploy serve_apps/config.yaml`: the config validates against Serve's own schema, and its
import path and args build the app through the typed builder (no cluster needed to check that)."""

from __future__ import annotations

import importlib
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def repo_root_on_path(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # what `serve deploy` does with the working dir


def test_shipped_serve_config_validates_against_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    with open(os.path.join(ROOT, "serve_apps", "config.yaml")) as f:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(f))
    app = schema.applications[0]
    assert app.import_path == "serve_apps.app:app"
    assert schema.http_options.host == "127.0.0.1"


def _router(app):
    """The Router deployment an application's Ingress is bound to."""
    return app._bound_deployment.init_args[1]._bound_deployment


def _shipped_args() -> dict:
    with open(os.path.join(ROOT, "serve_apps", "config.yaml")) as f:
        return yaml.safe_load(f)["applications"][0]["args"]


def test_typed_builder_builds_a_router_and_one_group_deployment_per_group():
    from ray.serve.deployment import Application

    module = importlib.import_module("serve_apps.app")
    built = module.app({**_shipped_args(), "check_model": False})
    assert isinstance(built, Application)
    assert built._bound_deployment.name == "Ingress"  # HTTP in front, the Router behind it
    bound = _router(built)
    assert bound.name == "Router"
    groups = [a for a in bound.init_args if hasattr(a, "_bound_deployment")]
    assert [g._bound_deployment.name for g in groups] == ["ExpertGroup0", "ExpertGroup1"]
    mono = _router(module.app({"model": "m", "mode": "monolithic", "check_model": False}))
    assert not [a for a in mono.init_args if hasattr(a, "_bound_deployment")]


@pytest.mark.parametrize("args, key", [
    ({"mode": "sideways"}, "serve.mode"), ({"group_replicas": [3, 1]}, "serve.group_replicas"),
    ({"num_grouups": 2}, "serve.num_grouups"), ({"max_batch": "16"}, "serve.max_batch"),
])
def test_the_builder_refuses_bad_args_naming_the_serve_key(args, key):
    from raymoe.config import ConfigError

    module = importlib.import_module("serve_apps.app")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        module.app({"model": "m", "check_model": False, **args})


def test_the_builder_reads_a_run_configs_serve_section_and_checks_the_model(tmp_path):
    """`config:` points at a run config; its serve: section, overridden by the other args, is what
    runs; with the model checked, groups that cannot hold its experts fail the deploy by key."""
    from raymoe.config import ConfigError, config_from_dict
    from raymoe.model.transformer import MoETransformer
    from raymoe.model_dir import save_model

    cfg = config_from_dict({"name": "tiny", "model": {"hidden_size": 32, "num_layers": 2, "num_experts": 8, "max_seq_len": 128}})
    model = MoETransformer(cfg.model)
    save_model(model, cfg, str(tmp_path / "m"))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"name": "tiny", "serve": {"model": str(tmp_path / "m"), "num_groups": 4, "max_batch": 4}}))
    module = importlib.import_module("serve_apps.app")
    built = module.app({"config": str(run), "max_tokens": 32})
    settings = built._bound_deployment.init_args[0]
    assert (settings.serve.num_groups, settings.serve.max_batch, settings.serve.max_tokens) == (4, 4, 32)
    assert len([a for a in _router(built).init_args if hasattr(a, "_bound_deployment")]) == 4
    with pytest.raises(ConfigError, match=r"serve\.num_groups=3 must divide the 8 routed experts"):
        module.app({"config": str(run), "num_groups": 3})


def test_router_and_groups_autoscale_when_given_a_replica_range():
    from raymoe.serve.deployments import build_app
    from raymoe.serve.settings import ServeSettings

    app = build_app(ServeSettings.of("m", router_replicas=(1, 3), group_replicas=(1, 4), max_batch=8))
    router = _router(app)
    assert router._deployment_config.autoscaling_config.max_replicas == 3
    assert router._deployment_config.autoscaling_config.target_ongoing_requests == 8
    group = [a for a in router.init_args if hasattr(a, "_bound_deployment")][0]._bound_deployment
    cfg = group._deployment_config.autoscaling_config
    assert cfg.max_replicas == 4 and cfg.policy.policy_function == "raymoe.serve.autoscale:expert_load_policy"
    kwargs = [g._bound_deployment._deployment_config.autoscaling_config.policy.policy_kwargs
              for g in router.init_args if hasattr(g, "_bound_deployment")]
    assert [k["group"] for k in kwargs] == [0, 1]  # each group scales on its own share of the routers' reports
    assert kwargs[0]["app_key"] == kwargs[1]["app_key"] == router.init_args[0].app_key is not None
