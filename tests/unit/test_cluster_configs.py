"""The shipped cluster configs: both launcher files pass the autoscaler schema that ships with the
installed Ray (the same `prepare_config` + `validate_config` that `ray up` runs, minus the cloud
calls), say what the issue asks of them, and the KubeRay manifests agree with them and with
serve_apps/config.yaml. No cloud or Kubernetes here: this is what can be checked without one.

    .venv/bin/python -m pytest tests/unit/test_cluster_configs.py -q
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_CONFIGS = [REPO / "cluster.yaml", REPO / "cluster-local.yaml"]
MLFLOW_URI_K8S = "http://raymoe-mlflow:5000"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _validated(config: dict) -> dict:
    """What `ray up` checks before it touches a provider (ray.autoscaler._private.commands._bootstrap_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_the_autoscaler_schema_shipped_with_ray(path):
    prepared = _validated(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_the_schema_check_rejects_a_broken_config():
    import jsonschema

    broken = _load(REPO / "cluster.yaml")
    broken["available_node_types"]["ray.worker.h100x8"]["resources"]["GPU"] = "8"  # a string, not an integer
    with pytest.raises(jsonschema.ValidationError):
        _validated(broken)
    unknown = _load(REPO / "cluster.yaml")
    unknown["available_node_types"]["ray.head.cpu"]["min_worker"] = 0  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        _validated(unknown)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_placeholders_are_marked_and_nothing_else_is_left_to_guess(path):
    text = path.read_text()
    placeholders = set(re.findall(r"<[^<>\s]+>", text))
    assert placeholders, "expected <PLACEHOLDER> values the user fills in"
    assert all(re.fullmatch(r"<[A-Z][A-Z0-9_]*>", p) for p in placeholders), placeholders


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_nodes_start_ray_with_token_auth_and_the_head_runs_the_mlflow_server(path):
    cfg = _load(path)
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    for commands in (head, worker):
        assert "export RAY_AUTH_MODE=token" in commands
        assert "MLFLOW_TRACKING_URI=http://" in commands and ":5000" in commands
        assert commands.index("MLFLOW_TRACKING_URI") < commands.index("ray start")  # inherited by every job
    assert "ray start --head" in head
    assert "$RAY_HEAD_IP:5000" in worker and "ray start --address=$RAY_HEAD_IP:6379" in worker
    mlflow = next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    backend = re.search(r"--backend-store-uri (\S+)", mlflow).group(1)
    assert backend.startswith(("postgresql://", "sqlite:///")), backend  # a database, not a file store
    assert "--artifacts-destination" in mlflow and "--serve-artifacts" in mlflow  # every node logs through the proxy
    assert "--host 0.0.0.0 --port 5000" in mlflow
    # The cluster's auth token reaches every node; this checkout is installed on every node.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert cfg["file_mounts"]["~/raymoe"] == "."
    assert ".venv" in cfg["rsync_exclude"] and ".raymoe" in cfg["rsync_exclude"]


def test_aws_head_is_cpu_only_and_gpu_workers_are_8x_h100_autoscaled():
    cfg = _load(REPO / "cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"]["use_internal_ips"] is True  # the nodes live in the private subnet it recommends
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    (worker_type,) = [t for t in types if t != cfg["head_node_type"]]
    gpu = types[worker_type]
    assert gpu["resources"]["GPU"] == 8 and gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    assert "--num-cpus" not in " ".join(cfg["head_start_ray_commands"])  # the node type's resources say it
    # torch before raymoe on each node type, so pip keeps the build chosen for it.
    for commands, torch_line in ((cfg["head_setup_commands"], "whl/cpu"), (cfg["worker_setup_commands"], "torch==")):
        torch_at = next(i for i, c in enumerate(commands) if torch_line in c)
        raymoe_at = next(i for i, c in enumerate(commands) if "-e ~/raymoe" in c)
        assert torch_at < raymoe_at, commands
    assert "-v /shared:/shared" in cfg["docker"]["run_options"]


def test_local_provider_config_lists_the_machines():
    cfg = _load(REPO / "cluster-local.yaml")
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] == "<HEAD_IP>"
    assert cfg["provider"]["worker_ips"] and all(ip.startswith("<WORKER_IP") for ip in cfg["provider"]["worker_ips"])
    assert "available_node_types" not in cfg  # the local provider refuses node types
    assert any("pip install -q -e ~/raymoe" in c for c in cfg["setup_commands"])


def test_image_tags_match_the_installed_ray_everywhere():
    import ray

    cfg = _load(REPO / "cluster.yaml")
    for image in (cfg["docker"]["head_image"], cfg["docker"]["worker_image"]):
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image
    assert f"FROM rayproject/ray:{ray.__version__}-" in (REPO / "k8s" / "Dockerfile").read_text()
    for name in ("rayjob-train.yaml", "rayservice.yaml"):
        spec = _load(REPO / "k8s" / name)["spec"]
        cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
        assert cluster["rayVersion"] == ray.__version__, name


# ----------------------------------------------------------------------------- KubeRay


def _ray_cluster(name: str) -> dict:
    spec = _load(REPO / "k8s" / name)["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayservice.yaml"])
def test_kuberay_cluster_matches_cluster_yaml(name):
    aws = _load(REPO / "cluster.yaml")
    gpu_type = aws["available_node_types"]["ray.worker.h100x8"]
    cluster = _ray_cluster(name)
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == str(aws["available_node_types"]["ray.head.cpu"]["resources"]["CPU"])
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] == "h100x8"
    assert (group["minReplicas"], group["maxReplicas"]) == (gpu_type["min_workers"], gpu_type["max_workers"])
    pod = group["template"]["spec"]
    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == gpu_type["node_config"]["InstanceType"]
    (worker,) = pod["containers"]
    limits = worker["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == gpu_type["resources"]["GPU"]
    assert int(limits["cpu"]) <= gpu_type["resources"]["CPU"]
    for container in (head["template"]["spec"]["containers"][0], worker):
        assert _env(container)["MLFLOW_TRACKING_URI"] == MLFLOW_URI_K8S
        assert container["image"] == "<REGISTRY>/raymoe:<TAG>"


def test_k8s_mlflow_service_and_shared_volume_are_what_the_manifests_use():
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO / "k8s" / "shared.yaml").read_text())}
    service = docs["Service"]
    assert f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}" == MLFLOW_URI_K8S
    args = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[:2] == ["mlflow", "server"] and any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert any(a.startswith("--allowed-hosts=raymoe-mlflow:*") for a in args)  # pods use the Service name
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    cluster = _ray_cluster("rayjob-train.yaml")
    for pod in (cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == claim
        assert {"name": "shared", "mountPath": "/shared"} in pod["containers"][0]["volumeMounts"]


def test_rayjob_entrypoint_is_a_valid_raymoe_train_on_the_shared_volume():
    from raymoe.config import load_config

    args = shlex.split(_load(REPO / "k8s" / "rayjob-train.yaml")["spec"]["entrypoint"])
    assert args[:4] == ["python", "-m", "raymoe.cli", "train"]
    image_path = args[4]
    assert image_path.startswith("/home/ray/raymoe/")  # k8s/Dockerfile's checkout
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(REPO / image_path.removeprefix("/home/ray/raymoe/"), overrides)
    assert cfg.output_dir.startswith("/shared/")
    assert cfg.scaling.use_gpu and cfg.scaling.worker_range[1] == _load(REPO / "cluster.yaml")[
        "available_node_types"]["ray.worker.h100x8"]["resources"]["GPU"]  # one full node


def test_rayservice_serves_the_application_of_serve_apps_config_with_the_model_the_rayjob_registers():
    from raymoe.config import load_config

    shipped = _load(REPO / "serve_apps" / "config.yaml")
    serve = yaml.safe_load(_load(REPO / "k8s" / "rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    (expected,) = shipped["applications"]
    assert {**app, "args": {**app["args"], "model": None}} == {**expected, "args": {**expected["args"], "model": None}}
    # What the RayJob's entrypoint trains registers a version of exactly the model served.
    args = shlex.split(_load(REPO / "k8s" / "rayjob-train.yaml")["spec"]["entrypoint"])
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    trained = load_config(REPO / args[4].removeprefix("/home/ray/raymoe/"), overrides)
    assert trained.tracking.registered_model and app["args"]["model"] == f"models:/{trained.tracking.registered_model}/latest"
    # Its args are serve: keys that the builder accepts (the model itself is checked at deploy time).
    import importlib
    import sys

    sys.path.insert(0, str(REPO))
    try:
        built = importlib.import_module("serve_apps.app").app({**app["args"], "check_model": False})
    finally:
        sys.path.remove(str(REPO))
    assert built._bound_deployment.init_args[0].model == app["args"]["model"]
    # KubeRay probes each worker's own Serve proxy (kuberay#4994): HeadOnly would leave every worker NotReady.
    assert serve["proxy_location"] == "EveryNode"
    assert serve["http_options"]["port"] == shipped["http_options"]["port"]
    assert serve["http_options"]["host"] == "0.0.0.0"  # reachable through the Kubernetes Service
    head = _ray_cluster("rayservice.yaml")["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": shipped["http_options"]["port"], "name": "serve"} in head["ports"]
