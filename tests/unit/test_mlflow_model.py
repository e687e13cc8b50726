"""mlflow_model.py against a real MLflow sqlite store: a tiny random model logged into a run as a
pyfunc, registered, loaded back by MLflow and by raymoe, and run by `mlflow models predict`.

    .venv/bin/python -m pytest tests/unit/test_mlflow_model.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.model_dir import open_model, open_source, resolve_local, save_model
from raymoe.mlflow_model import find_model_dir, log_pyfunc_model, register_logged_model
from raymoe.serve.engine import Engine, SamplingParams

MLFLOW = os.path.join(os.path.dirname(sys.executable), "mlflow")
NAME = "tiny-moe"
PROMPTS = ["def f(x):", "Once upon"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = config_from_dict({"name": "tiny", "model": {"hidden_size": 32, "num_layers": 2, "num_experts": 8, "max_seq_len": 128}})
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    with torch.no_grad():  # at its initialisation the model answers every prompt with the same byte
        for p in model.parameters():
            p.normal_(0, 0.3)
    d = str(tmp_path_factory.mktemp("mlflow_model") / "model")
    save_model(model, cfg, d)
    return d


@pytest.fixture(scope="module")
def logged(tmp_path_factory, model_dir):
    """The model logged into a run and registered as version 1 of NAME; the process's tracking URI
    points at the store meanwhile (mlflow.pyfunc.load_model has no other way to be told)."""
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    root = tmp_path_factory.mktemp("mlflow")
    uri = "sqlite:///" + str(root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp, _use_tracking_uri(uri):
        mp.chdir(root)
        client = MlflowClient(uri)
        exp = client.create_experiment("exp", artifact_location="file://" + str(root / "artifacts"))
        run_id = client.create_run(exp).info.run_id
        client.log_param(run_id, "model.num_experts", "8")
        lm = log_pyfunc_model(client, run_id, model_dir)
        client.create_registered_model(NAME)
        version = register_logged_model(client, NAME, lm)
        client.set_terminated(run_id)
        yield {"uri": uri, "client": client, "run_id": run_id, "model": lm, "version": version, "root": root}


@pytest.fixture(scope="module")
def pyfunc(logged):
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{NAME}/{logged['version']}")


def _engine_texts(model_dir, params: SamplingParams) -> list[str]:
    _, model, tok, _ = open_model(model_dir)
    return [Engine(model, tok, max_batch=2).generate(p, params).text for p in PROMPTS]


def test_registered_pyfunc_generates_what_the_engine_generates_on_the_same_weights(pyfunc, model_dir):
    greedy = pyfunc.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_tokens": 8, "temperature": 0.0})
    assert list(greedy.columns) == ["text"]
    expected = _engine_texts(model_dir, SamplingParams(max_tokens=8, temperature=0))
    assert list(greedy["text"]) == expected and expected[0] != expected[1]
    # Params the call leaves out take the signature's defaults (SamplingParams'); a seed repeats.
    sampled = pyfunc.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_tokens": 6, "seed": 3})
    assert list(sampled["text"]) == _engine_texts(model_dir, SamplingParams(max_tokens=6, temperature=1.0, seed=3))


def test_bad_params_and_prompts_are_refused_naming_them_and_leave_the_engine_clean(pyfunc, model_dir):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"params: temperature=-1.0 must be >= 0"):
        pyfunc.predict(pd.DataFrame({"prompt": PROMPTS}), params={"temperature": -1.0})
    with pytest.raises(MlflowException, match=r"prompt 1: the prompt has 300 tokens; this model takes at most 127"):
        pyfunc.predict(pd.DataFrame({"prompt": [PROMPTS[0], "x" * 300]}), params={"temperature": 0.0})
    # Prompt 0 of the refused call was aborted, not left to decode into the next call.
    again = pyfunc.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_tokens": 8, "temperature": 0.0})
    assert list(again["text"]) == _engine_texts(model_dir, SamplingParams(max_tokens=8, temperature=0))


def test_registered_version_has_the_text_signature_and_links_the_runs_logged_model(logged):
    import mlflow
    from mlflow.entities import LoggedModelStatus

    c, lm = logged["client"], logged["model"]
    sig = mlflow.models.get_model_info(f"models:/{NAME}/{logged['version']}").signature
    assert sig.inputs.input_names() == ["prompt"] and sig.outputs.input_names() == ["text"]
    assert [p.name for p in sig.params.params] == ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop"]
    # What the UI shows: the run's "Logged models", the version's "Source Model", the model's versions.
    assert [o.model_id for o in c.get_run(logged["run_id"]).outputs.model_outputs] == [lm.model_id]
    [listed] = c.search_logged_models(experiment_ids=[lm.experiment_id])
    assert (listed.name, listed.status, listed.params) == ("model", LoggedModelStatus.READY, {"model.num_experts": "8"})
    assert c.get_model_version(NAME, logged["version"]).source == f"models:/{lm.model_id}"
    assert json.loads(listed.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": int(logged["version"])}]


@pytest.mark.parametrize("uri", ["runs:/{run_id}/model", "models:/" + NAME + "/{version}"])
def test_raymoe_reads_the_logged_model_as_its_model_directory(logged, model_dir, uri):
    # open_source(uri) once model_dir._open_local calls find_model_dir: resolve_local downloads.
    local = resolve_local(uri.format(**logged), logged["uri"])
    assert os.path.isfile(os.path.join(local, "MLmodel"))
    inner = find_model_dir(local)
    # The weights are the model directory's own safetensors files; the pickle is the class alone.
    assert sorted(os.listdir(inner)) == sorted(os.listdir(model_dir)) == ["config.yaml", "model.safetensors"]
    assert os.path.getsize(os.path.join(local, "python_model.pkl")) < 4096
    src, orig = open_source(inner), open_source(model_dir)
    assert src.kind == "model" and src.cfg == orig.cfg and src.names() == orig.names()
    assert all(torch.equal(src.tensor(n), orig.tensor(n)) for n in orig.names())
    assert find_model_dir(model_dir) == model_dir  # a plain model directory is its own


def test_find_model_dir_follows_only_a_model_dir_artifact_inside_the_download(tmp_path):
    for name, mlmodel in [("other", "flavors: {python_function: {loader_module: x}}\n"),
                          ("escape", "flavors: {python_function: {artifacts: {model_dir: {path: ../../etc}}}}\n")]:
        d = tmp_path / name
        d.mkdir()
        (d / "MLmodel").write_text(mlmodel)
        assert find_model_dir(str(d)) == str(d)  # then open_source says it is not a model


@pytest.mark.slow
def test_mlflow_models_predict_runs_the_logged_model(logged, model_dir, tmp_path):
    body = {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]},
            "params": {"max_tokens": 8, "temperature": 0}}
    (tmp_path / "input.json").write_text(json.dumps(body))
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"]}
    r = subprocess.run([MLFLOW, "models", "predict", "-m", f"runs:/{logged['run_id']}/model", "-i", "input.json",
                        "-t", "json", "--env-manager", "local", "-o", "out.json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert [p["text"] for p in predictions] == _engine_texts(model_dir, SamplingParams(max_tokens=8, temperature=0))
