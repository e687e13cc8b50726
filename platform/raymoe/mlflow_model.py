"""The trained model as an MLflow model: a pyfunc that turns prompts into generated text, around
an unchanged raymoe model directory (model_dir.py).

    logged = log_pyfunc_model(client, run_id, "out/model")     # runs:/<run id>/model, a logged model of the run
    register_logged_model(client, "my-moe", logged)            # models:/my-moe/<version>
    mlflow.pyfunc.load_model("models:/my-moe/1").predict(pd.DataFrame({"prompt": ["def "]}), params={"max_tokens": 32})
    mlflow models predict -m runs:/<run id>/model -i in.json -t json --env-manager local
        # in.json: {"dataframe_split": {"columns": ["prompt"], "data": [["def "]]}, "params": {"temperature": 0}}

What `runs:/<id>/model` and `models:/<name>/<version>` download to:
    MLmodel                  the pyfunc flavor, the signature, `artifacts: model_dir: path: artifacts/model_dir`
    python_model.pkl         TextGenerationModel, pickled by reference to this module: no tensors
    requirements.txt, ...    raymoe (the model loads where raymoe is installed: no code is copied in)
    input_example.json       one prompt, for the UI's and `mlflow models predict`'s examples
    artifacts/model_dir/     the model directory as training wrote it: config.yaml, model.safetensors, tokenizer files

What is notable:
- The weights stay safetensors files, logged as the pyfunc's `model_dir` artifact; `find_model_dir`
  takes raymoe from the downloaded MLflow model to the model directory inside it, so `raymoe serve`,
  `model.init_from` and export read the same artifact as before.
- It is logged into an existing run by id through an MlflowClient, without an active run (as
  MlflowTracker logs): the LoggedModel is what the MLflow UI lists under "Logged models", and
  `runs:/<id>/<name>` resolves to it (MLflow 3 keeps a logged model's files apart from the run's).
- No code_paths: a copy of raymoe inside the model would go first on sys.path of every process
  that loads it (MLflow prepends it), shadowing the installed raymoe.
- Generation is raymoe's own `Engine`: every row of one predict call in one continuous batch.

    .venv/bin/python -m pytest tests/unit/test_mlflow_model.py -q
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading

import mlflow.pyfunc
import pandas as pd
import yaml

MLMODEL = "MLmodel"
MODEL_DIR_ARTIFACT = "model_dir"
"""The pyfunc artifact that is the raymoe model directory (its path is in MLmodel)."""


def find_model_dir(path: str) -> str:
    """The raymoe model directory in `path`: `path` itself, or, when `path` is an MLflow model that
    log_pyfunc_model wrote, the directory its MLmodel names as the `model_dir` artifact."""
    mlmodel = os.path.join(path, MLMODEL)
    if not os.path.isfile(mlmodel):
        return path
    with open(mlmodel) as f:
        conf = yaml.safe_load(f) or {}
    artifacts = (conf.get("flavors") or {}).get("python_function", {}).get("artifacts") or {}
    rel = (artifacts.get(MODEL_DIR_ARTIFACT) or {}).get("path")
    if not rel:
        return path  # some other MLflow model: the caller reports what it is not
    inner = os.path.normpath(os.path.join(path, rel))
    # MLmodel is downloaded data: a path that leaves the download is not ours to follow.
    if os.path.commonpath([inner, os.path.normpath(path)]) != os.path.normpath(path):
        return path
    return inner


def text_signature():
    """Prompts in (a `prompt` column of strings), text out (a `text` column); sampling as params,
    their defaults those of serve.engine.SamplingParams."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from raymoe.serve.engine import SamplingParams

    d = SamplingParams()
    params = ParamSchema([
        ParamSpec("max_tokens", "long", d.max_tokens),
        ParamSpec("temperature", "double", d.temperature),  # 0 = greedy
        ParamSpec("top_p", "double", d.top_p),
        ParamSpec("top_k", "long", d.top_k),  # 0 = no top-k filter
        ParamSpec("seed", "long", None),  # every row draws from its own generator with this seed
        ParamSpec("stop", "string", list(d.stop), shape=(-1,)),
    ])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string", "text")]),
                          params=params)


_PARAM_TYPES = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int, "stop": tuple}
"""The signature's params, as SamplingParams takes them."""


class TextGenerationModel(mlflow.pyfunc.PythonModel):
    """Generates a completion of each prompt with raymoe's Engine over the model_dir artifact.

    model_config `device` (at load: mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})):
    'auto' (default: cuda when available), 'cpu', 'cuda', 'cuda:1', ..."""

    def load_context(self, context) -> None:
        import torch

        from raymoe.model_dir import open_model
        from raymoe.serve.engine import Engine

        device = (context.model_config or {}).get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg, model, tokenizer, _ = open_model(context.artifacts[MODEL_DIR_ARTIFACT], device=device)
        # Sized as `raymoe serve` sizes a router replica's engine, from the run's serve: section.
        self._engine = Engine(model, tokenizer, max_batch=cfg.serve.max_batch,
                              max_len=min(cfg.serve.max_len, cfg.model.max_seq_len))
        self._lock = threading.Lock()  # one engine, and scoring servers may call predict from threads

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        from raymoe.serve.engine import RequestError, SamplingParams

        prompts = list(model_input["prompt"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        # MLflow has filled in the signature's defaults; None (no seed) leaves SamplingParams' own.
        given = {k: cast(params[k]) for k, cast in _PARAM_TYPES.items() if (params or {}).get(k) is not None}
        try:
            sampling = SamplingParams(**given)
        except RequestError as e:
            raise MlflowException.invalid_parameter_value(f"params: {e}") from None
        with self._lock:
            engine, reqs = self._engine, []
            try:
                for i, prompt in enumerate(prompts):
                    try:
                        reqs.append(engine.add_request(str(prompt), sampling))
                    except RequestError as e:
                        raise MlflowException.invalid_parameter_value(f"prompt {i}: {e}") from None
                while any(r.finish_reason is None for r in reqs):
                    engine.step()
            finally:
                for r in reqs:  # a failed call leaves no rows behind in the shared engine
                    if r.finish_reason is None:
                        engine.abort(r)
        return pd.DataFrame({"text": [r.text for r in reqs]})


def default_pip_requirements() -> list[str]:
    """raymoe, at the version that logged the model where it is installed: what TextGenerationModel
    imports. (A job submitted with `raymoe submit` ships raymoe as a py_module: no version to read.)"""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return [f"raymoe=={version('raymoe')}"]
    except PackageNotFoundError:
        return ["raymoe"]


def log_pyfunc_model(client, run_id: str, model_dir: str, name: str = "model", *, step: int = 0,
                     pip_requirements: list[str] | None = None):
    """Log `model_dir` as run `run_id`'s pyfunc model `name` (runs:/<run_id>/<name>) through
    `client` (an MlflowClient), as mlflow.pyfunc.log_model would into an active run. Returns the
    LoggedModel (register it with register_logged_model)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run = client.get_run(run_id)
    # Like log_model: the logged model carries the run's params, so the UI can compare models by them.
    logged = client.create_logged_model(experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
                                        params=dict(run.data.params))
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        meta = Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                     model_uuid=logged.model_id)
        with tempfile.TemporaryDirectory(prefix="raymoe-mlmodel-") as d:
            # save_model copies its artifacts, and a model directory can be a terabyte: it saves an
            # empty stand-in of the same name, and the model directory is uploaded into its place.
            stand_in = os.path.join(d, MODEL_DIR_ARTIFACT)
            os.makedirs(stand_in)
            path = os.path.join(d, name)
            example = (pd.DataFrame({"prompt": ["Once upon a time"]}), {"max_tokens": 16, "temperature": 0.0})
            # Explicit requirements: inferring them would load the whole model in a subprocess.
            mlflow.pyfunc.save_model(path, python_model=TextGenerationModel(), artifacts={MODEL_DIR_ARTIFACT: stand_in},
                                     signature=text_signature(), input_example=example, mlflow_model=meta,
                                     pip_requirements=pip_requirements or default_pip_requirements())
            saved = Model.load(path)
            entry = saved.flavors["python_function"]["artifacts"][MODEL_DIR_ARTIFACT]
            entry["uri"] = os.path.abspath(model_dir)  # where the files came from, not the stand-in
            saved.model_size_bytes = (saved.model_size_bytes or 0) + _size_of(model_dir)
            saved.save(os.path.join(path, MLMODEL))
            # The weights first: a download that finds MLmodel finds every file it names.
            client.log_model_artifacts(logged.model_id, model_dir, entry["path"])
            client.log_model_artifacts(logged.model_id, path)
    except BaseException:
        with contextlib.suppress(Exception):  # MLflow may be what failed: the first error is the one to see
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def register_logged_model(client, name: str, logged) -> str:
    """A new version of registered model `name` (which must exist) from a LoggedModel; returns the
    version. As mlflow.register_model does: the source is models:/<model id>, which the UI shows
    as the version's "Source Model", and the logged model lists the version in its
    mlflow.modelVersions tag."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    from raymoe.tracking import process_tracking_uri

    # A local (sqlite) registry looks models:/<model id> up through the process's tracking URI,
    # not the client's; a tracking server looks it up itself.
    with process_tracking_uri(client.tracking_uri):
        version = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=logged.source_run_id,
                                              model_id=logged.model_id).version
    listed = json.loads(client.get_logged_model(logged.model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed + [{"name": name, "version": version}])})
    return str(version)


def _size_of(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)
