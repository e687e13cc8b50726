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


def test_typed_builder_builds_a_router_and_one_group_deployment_per_group():
    from ray.serve.deployment import Application

    module = importlib.import_module("serve_apps.app")
    with open(os.path.join(ROOT, "serve_apps", "config.yaml")) as f:
        args = yaml.safe_load(f)["applications"][0]["args"]
    built = module.app(module.AppArgs(**args))
    assert isinstance(built, Application)
    bound = built._bound_deployment
    assert bound.name == "Router"
    groups = [a for a in bound.init_args if hasattr(a, "_bound_deployment")]
    assert [g._bound_deployment.name for g in groups] == ["ExpertGroup0", "ExpertGroup1"]
    mono = module.app(module.AppArgs(model="m", mode="monolithic"))
    assert not [a for a in mono._bound_deployment.init_args if hasattr(a, "_bound_deployment")]


def test_typed_builder_rejects_a_bad_mode():
    module = importlib.import_module("serve_apps.app")
    with pytest.raises(Exception, match="mode"):
        module.AppArgs(model="m", mode="sideways")


def test_router_and_groups_autoscale_when_given_a_replica_range():
    from raymoe.serve.deployments import ServeSettings, build_app

    app = build_app(ServeSettings(model="m", router_replicas=(1, 3), group_replicas=(1, 4), max_batch=8))
    router = app._bound_deployment
    assert router._deployment_config.autoscaling_config.max_replicas == 3
    assert router._deployment_config.autoscaling_config.target_ongoing_requests == 8
    group = [a for a in router.init_args if hasattr(a, "_bound_deployment")][0]._bound_deployment
    cfg = group._deployment_config.autoscaling_config
    assert cfg.max_replicas == 4 and cfg.policy.policy_function == "raymoe.serve.autoscale:expert_load_policy"
    kwargs = [g._bound_deployment._deployment_config.autoscaling_config.policy.policy_kwargs
              for g in router.init_args if hasattr(g, "_bound_deployment")]
    assert [k["group"] for k in kwargs] == [0, 1]  # each group scales on its own share of the routers' reports
    assert kwargs[0]["app_key"] == kwargs[1]["app_key"] == router.init_args[0].app_key is not None
