"""`raymoe`: the command line.

    raymoe train jobs/configs/demo.yaml --set train.steps=50
    raymoe params jobs/configs/deepseek-v3.yaml        # or a Hugging Face config.json / model directory
    raymoe check jobs/configs/*.yaml
    raymoe import ~/hf/DeepSeek-V2-Lite --out models/v2-lite   # Hugging Face -> raymoe model directory
    raymoe export models/v2-lite out/v2-lite-hf                # back, loadable by from_pretrained
    raymoe submit train jobs/configs/demo.yaml --address http://HEAD:8265   # as a Ray job on a cluster
    raymoe jobs status|logs|stop JOB_ID --address http://HEAD:8265

Config errors are reported in one line naming the file and key, before Ray starts, with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from raymoe.config import ConfigError, check_writable, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")


def _cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    check_writable(cfg)
    with open(args.config) as f:
        original = f.read()
    from raymoe.ray_train import run_training
    from raymoe.tracking import print_where_to_look

    yaml_text = original if not args.overrides else cfg.to_yaml()
    outcome = run_training(cfg, yaml_text, address=args.address)
    print()
    print(f"done: step {outcome.step} in {outcome.seconds:.0f}s"
          + (f", train loss {outcome.train_loss:.4f}" if outcome.train_loss is not None else "")
          + (f", val loss {outcome.val_loss:.4f}" if outcome.val_loss is not None else ""))
    if outcome.checkpoint_path:
        print(f"checkpoint: {outcome.checkpoint_path}")
    # Restarts, injected or not, were listed by run_training ("restarts in this invocation").
    print_where_to_look(outcome.tracking_uri, outcome.mlflow_run_id)
    if outcome.registered_model:
        print(f"registered: {outcome.registered_model}  (serve it: raymoe serve {outcome.registered_model})")
    if outcome.sample is not None:
        print("sample from the trained model:")
        print("-" * 60)
        print(outcome.sample)
        print("-" * 60)
    return 0


def _cmd_placement(args) -> int:
    import json

    from raymoe.serve.placement import contiguous_placement, load_from_history, plan_placement, report

    path = args.source
    if os.path.isdir(path):
        from raymoe.tracking import LOAD_HISTORY

        path = os.path.join(path, LOAD_HISTORY)
    try:
        with open(path) as f:
            history = json.load(f)
    except (OSError, ValueError) as e:
        print(f"raymoe: {args.source}: need an expert_load.json (from a training checkpoint or MLflow run): {e}", file=sys.stderr)
        return 2
    load = load_from_history(history, last_n=args.last)
    before = contiguous_placement(len(load), args.groups)
    after = plan_placement(load, args.groups, slots_per_group=args.slots_per_group)
    print(report(load, before, after))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(after.to_dict(), f, indent=1)
        print(f"wrote {args.out}  (raymoe serve MODEL --groups {args.groups} --set serve.placement={args.out})")
    return 0


def _cmd_tune(args) -> int:
    cfg = load_config(args.config, args.overrides)
    check_writable(cfg)
    from raymoe.tune import run_search

    out = run_search(cfg, address=args.address, resume=args.resume)
    print()
    print(f"best: {out.best_yaml}  ({cfg.tune.metric} {out.best_metric:.4f})")
    print(f"train it: raymoe train {out.best_yaml}")
    print(f"results:  {out.table_csv}")
    if out.parent_run_id:
        from raymoe.tracking import print_where_to_look, tracking_uri

        print_where_to_look(tracking_uri(cfg), out.parent_run_id)
    return 0


def _cmd_submit(args) -> int:
    from raymoe import submit as jobs

    submission = jobs.build_submission(args.kind, args.config, args.overrides, working_dir=args.working_dir,
                                       tracking_uri=args.tracking_uri, resume=args.resume)
    for note in submission.notes:
        print(f"raymoe: note: {note}", file=sys.stderr)
    import logging

    # Ray's packaging logs a line per .gitignore it honours and a warning per default exclude, on
    # every upload; what is uploaded is already said by its "Uploading package" lines.
    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)
    address = jobs.resolve_address(args.address)
    client = jobs.connect(address)
    job_id = jobs.submit(client, address, submission)
    print(f"job: {job_id}  ({submission.entrypoint})")
    print(f"  raymoe jobs status|logs|stop {job_id} --address {address}")
    if args.no_follow:
        return 0
    try:
        status = jobs.follow(client, address, job_id)
    except KeyboardInterrupt:
        print(f"\nraymoe: stopped following; the job keeps running (raymoe jobs stop {job_id} --address {address})", file=sys.stderr)
        return 130
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_jobs(args) -> int:
    from raymoe import submit as jobs

    address = jobs.resolve_address(args.address)
    client = jobs.connect(address)
    if args.action == "list":
        for job in jobs.list_jobs(client, address):
            print(f"{job.submission_id or job.job_id}  {job.status.value:<9}  {job.entrypoint}")
        return 0
    if args.action == "status":
        info = jobs.job_info(client, address, args.job_id)
        print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
        return 0
    if args.action == "logs":
        if not args.follow:
            sys.stdout.write(jobs.job_logs(client, address, args.job_id))
            return 0
        status = jobs.follow(client, address, args.job_id)
        print(f"job {args.job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    assert args.action == "stop", args.action
    if jobs.stop(client, address, args.job_id):
        print(f"stop requested for {args.job_id}")
    else:
        print(f"{args.job_id} had already ended ({jobs.status_of(client, address, args.job_id)})")
    return 0


def _hf_config_path(path: str) -> str | None:
    """A Hugging Face config.json named directly or inside a directory (no config.yaml beside it)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(os.path.join(path, "config.yaml")):
        return os.path.join(path, "config.json")
    if os.path.basename(path) == "config.json" and os.path.isfile(path):
        return path
    return None


def _cmd_params(args) -> int:
    from raymoe.model.params import format_report

    hf_path = _hf_config_path(args.config)
    if hf_path is not None:
        import json

        from raymoe.model.hf import model_config_from_hf

        if args.overrides:
            raise ConfigError(f"{hf_path}: --set applies to raymoe configs; a Hugging Face config.json is read as it is")
        with open(hf_path) as f:
            model = model_config_from_hf(json.load(f), hf_path)
        print(f"{hf_path} as a raymoe model:")
        print(format_report(model, args.seq_len or 4096))
        return 0
    cfg = load_config(args.config, args.overrides)
    print(format_report(cfg.model, args.seq_len or cfg.train.seq_len))
    return 0


def _cmd_plan(args) -> int:
    from raymoe.parallel.memory import format_plan, plan_layout

    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus} must be >= 1")
    cfg = load_config(args.config, args.overrides)
    plan = plan_layout(cfg, args.gpus, args.gpu_memory, headroom=args.headroom, seq_len=args.seq_len,
                       batch_size=args.batch_size, device_type=args.device)
    print(format_plan(plan, all_layouts=args.all))
    return 0 if plan.chosen is not None else 1


def _parse_bytes(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4GB or 500MiB")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def _cmd_import(args) -> int:
    import time

    from raymoe.model.params import count_params, human
    from raymoe.model_dir import import_hf

    t0 = time.perf_counter()
    print(f"importing {args.source} -> {args.out}")
    src = import_hf(args.source, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    c = count_params(src.cfg.model)
    print(f"done in {time.perf_counter() - t0:.1f}s: {src.hf_architecture} -> raymoe model {args.out} "
          f"({human(c.total)} parameters, {human(c.activated)} activated; tokenizer: "
          f"{'yes' if src.tokenizer_dir else 'none (bytes)'})")
    if args.register:
        from raymoe.tracking import register_model_dir

        uri = register_model_dir(args.out, args.register, tracking_uri=args.tracking_uri, experiment=args.experiment,
                                 source=os.path.abspath(args.source))
        if uri:
            print(f"registered: {uri}  (raymoe serve {uri})")
    print(f"  train on it: model: {{init_from: {os.path.abspath(args.out)}}}   serve it: raymoe serve {args.out}")
    return 0


def _cmd_export(args) -> int:
    import time

    from raymoe.model_dir import ModelSourceError, export_hf, export_model_dir

    t0 = time.perf_counter()
    print(f"exporting {args.source} -> {args.out}")
    if args.format == "raymoe":
        if args.arch:
            raise ModelSourceError("raymoe export: --arch applies to --format hf only; remove it or use --format hf")
        src = export_model_dir(args.source, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                               tracking_uri=args.tracking_uri)
        print(f"done in {time.perf_counter() - t0:.1f}s: a raymoe model directory ({len(src.names())} tensors) in {args.out} "
              f"(raymoe serve {args.out}; model: {{init_from: {os.path.abspath(args.out)}}})")
        return 0
    arch = export_hf(args.source, args.out, architecture=args.arch, dtype=args.dtype,
                     max_shard_bytes=args.max_shard_size, tracking_uri=args.tracking_uri)
    print(f"done in {time.perf_counter() - t0:.1f}s: {arch} in {args.out} "
          f"(transformers.AutoModelForCausalLM.from_pretrained({args.out!r}) loads it)")
    return 0


def _cmd_mlflow_replay(args) -> int:
    from raymoe.tracking import replay_pending

    if not os.path.isfile(args.path):
        print(f"raymoe: {args.path} does not exist (nothing is pending, or it was replayed already)", file=sys.stderr)
        return 2
    try:
        sent = replay_pending(args.path, uri=args.tracking_uri)
    except Exception as e:  # noqa: BLE001 - unreachable again: the file keeps exactly what was not sent
        print(f"raymoe: MLflow is unavailable ({type(e).__name__}: {str(e)[:200]}); "
              f"{args.path} keeps what was not sent, run this again later", file=sys.stderr)
        return 1
    print(f"sent {sent} metric point(s) and the rest of {args.path} to MLflow")
    return 0


def _cmd_check(args) -> int:
    # Every file is checked, so one run over a glob lists every mistake, not just the first.
    num_bad = 0
    for path in args.configs:
        try:
            cfg = load_config(path)
        except Exception as e:
            line = _user_error_line(e)
            if line is None:
                raise
            print(f"raymoe: {line}", file=sys.stderr)
            num_bad += 1
            continue
        print(f"ok: {path} ({cfg.name})")
    return 2 if num_bad else 0


def serve_config(target: str, overrides: list[str]):
    """The RunConfig `raymoe serve TARGET --set serve.k=v` serves: TARGET is a YAML run config (its
    serve: section; serve.model null serves what its training made) or a MODEL, which becomes
    serve.model of the defaults."""
    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        return load_config(target, overrides)
    from raymoe.config import config_from_dict

    return config_from_dict({"serve": {"model": target}}, overrides, source="raymoe serve")


def _cmd_serve(args) -> int:
    from raymoe.serve.settings import settings_from_config

    overrides = list(args.overrides)
    if args.monolithic:
        overrides.append("serve.mode=monolithic")
    for key in ("groups", "host", "port"):
        if getattr(args, key) is not None:
            overrides.append(f"serve.{'num_groups' if key == 'groups' else key}={getattr(args, key)}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    cfg = serve_config(args.target, overrides)
    # Everything that can be wrong with the settings or the model fails here, before Ray starts.
    settings = settings_from_config(cfg, log=lambda line: print(line, file=sys.stderr))
    from raymoe.serve.deployments import run_serving

    until = (lambda url: _try_completions(url, args.try_prompts, api_key=settings.api_key)) if args.try_prompts else None
    run_serving(settings, address=args.address, until=until)
    return 0


def _try_completions(url: str, prompts: list[str], api_key: str | None) -> None:
    """Send each prompt over HTTP, as a client would, and print what came back."""
    import json
    import time
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    for prompt in prompts:
        body = json.dumps({"prompt": prompt, "max_tokens": 64, "temperature": 0.7, "seed": 0}).encode()
        t0 = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/completions", body, headers), timeout=120) as r:
            out = json.load(r)
        dt = time.perf_counter() - t0
        print(f"POST /v1/completions {prompt!r} -> {out['usage']['completion_tokens']} tokens in {dt:.2f}s:")
        print("    " + (prompt + out["choices"][0]["text"]).replace("\n", "\n    "))
    with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/expert_load", headers=headers), timeout=30) as r:
        load = json.load(r)
    if "groups" in load:
        steps = load["decode_steps"] + load["prefills"]
        print(f"expert groups received {load['groups']['tokens']} routed tokens in {sum(load['groups']['calls'])} calls "
              f"({sum(load['groups']['calls']) / max(steps, 1):.1f} hops per forward)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description="Train DeepSeek-style Mixture-of-Experts models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on Ray Train, tracked in MLflow (resumes a run of the same name)")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune (ASHA); writes best.yaml")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name (Tuner.restore)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(fn=_cmd_tune)

    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API on Ray Serve",
                       description="Serve CONFIG_OR_MODEL: a YAML run config (its serve: section) or a MODEL (a Hugging Face or "
                                   "raymoe model dir, a training checkpoint or run dir, runs:/<id>/model, "
                                   "models:/<name>/<version|latest>). Every serve.* key (config.ServeConfig) can be "
                                   "set with --set, e.g. --set serve.group_replicas=[1,4] --set serve.max_len=2048.")
    p.add_argument("target", metavar="CONFIG_OR_MODEL", help="a run config YAML or a MODEL")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set serve.num_groups=4 (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--routed", action="store_true", help="experts in ExpertGroup deployments (serve.mode=routed, the default)")
    mode.add_argument("--monolithic", action="store_true", help="every expert inside the router (serve.mode=monolithic)")
    p.add_argument("--groups", type=int, default=None, help="expert groups in routed mode (serve.num_groups, default 2)")
    p.add_argument("--host", default=None, help="listen address (serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (serve.port, default 8000)")
    p.add_argument("--tracking-uri", default=None, help="where models:/ and runs:/ resolve (tracking.uri; default "
                                                        "$MLFLOW_TRACKING_URI, else the store `raymoe train` writes)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--try", dest="try_prompts", action="append", default=[], metavar="PROMPT",
                   help="send this prompt over HTTP once serving, print the completion, then stop (repeatable)")
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("placement", help="plan which expert groups host (and replicate) which experts, from recorded loads")
    p.add_argument("source", help="expert_load.json, or a training checkpoint directory holding one")
    p.add_argument("--groups", type=int, required=True, help="expert groups (ExpertGroup deployments)")
    p.add_argument("--slots-per-group", type=int, default=None, help="experts per group (default E/groups; more = replicate hot experts)")
    p.add_argument("--last", type=int, default=None, help="use only the last N load records")
    p.add_argument("--out", default=None, help="write the placement JSON here")
    p.set_defaults(fn=_cmd_placement)

    p = sub.add_parser("submit", help="run train or tune as a Ray job on a running cluster (Ray Jobs SDK), following its logs")
    p.add_argument("kind", choices=("train", "tune"), metavar="train|tune", help="what the job runs")
    _add_config_args(p)
    p.add_argument("--address", default=None,
                   help="the head's Ray dashboard, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI as the cluster's nodes reach it, e.g. http://HEAD_PRIVATE_IP:5000 "
                        "(default: the cluster's $MLFLOW_TRACKING_URI)")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir, holding CONFIG (default .)")
    p.add_argument("--resume", action="store_true", help="tune: continue an interrupted search of the same name")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return instead of following the logs")
    p.set_defaults(fn=_cmd_submit)

    p = sub.add_parser("jobs", help="status, logs, stop or list Ray jobs on a cluster")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job"), ("list", "every job")):
        a = actions.add_parser(action, help=text)
        if action != "list":
            a.add_argument("job_id", metavar="JOB_ID", help="the id `raymoe submit` printed (raysubmit_...)")
        if action == "logs":
            a.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        a.add_argument("--address", default=None,
                       help="the head's Ray dashboard, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")
    p.set_defaults(fn=_cmd_jobs)

    p = sub.add_parser("params", help="total / activated parameters and training FLOPs per token of a config "
                                      "(raymoe YAML, or a Hugging Face config.json / model directory)")
    _add_config_args(p)
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: train.seq_len)")
    p.set_defaults(fn=_cmd_params)

    p = sub.add_parser("plan", help="per-rank memory of a training config on N GPUs, and the parallel layout that fits")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) the run would use")
    p.add_argument("--gpu-memory", type=_parse_bytes, default=_parse_bytes("80GB"), metavar="SIZE",
                   help="memory of one GPU, e.g. 80GB, 141GB, 24GiB (default 80GB)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of each GPU kept free for the CUDA context, NCCL and fragmentation (default 0.1)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: train.seq_len)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per rank per micro-batch (default: train.batch_size)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="what the ranks are: cuda (bf16 under precision auto) or cpu workers (fp32, unfused kernels)")
    p.add_argument("--all", action="store_true", help="list every expert degree, not only the widest per dense layout")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser("import", help="a Hugging Face MoE checkpoint -> a raymoe model directory (tensor by tensor)")
    p.add_argument("source", help="Hugging Face model directory: config.json, safetensors (sharded or not), tokenizer files")
    p.add_argument("--out", required=True, help="the raymoe model directory to write (must not exist yet)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="store tensors as (default: as in the checkpoint; FP8 checkpoints become bf16)")
    p.add_argument("--max-shard-size", type=_parse_bytes, default=4 << 30, metavar="SIZE",
                   help="largest safetensors file written, e.g. 4GB (default 4GiB)")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="also log the model to MLflow and register it under NAME (serve it as models:/NAME/latest)")
    p.add_argument("--tracking-uri", default=None, help="MLflow for --register (default $MLFLOW_TRACKING_URI, else "
                                                        "sqlite:///$PWD/.raymoe/mlflow.db)")
    p.add_argument("--experiment", default="raymoe", help="MLflow experiment for --register (default raymoe)")
    p.set_defaults(fn=_cmd_import)

    p = sub.add_parser("export", help="a raymoe model -> a Hugging Face directory that from_pretrained loads "
                                      "(a LoRA run: its base with the adapters merged)")
    p.add_argument("source", help="a raymoe model dir, a training checkpoint or run dir (LoRA ones merged), a Hugging Face "
                                  "dir, or an MLflow URI")
    p.add_argument("out", help="the directory to write (must not exist yet)")
    p.add_argument("--arch", default=None, help="Hugging Face architecture, e.g. DeepseekV3ForCausalLM (default: the one "
                                                "the model was imported from, else the first that expresses it exactly)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="tensor dtype written (default: as stored; training checkpoints hold fp32)")
    p.add_argument("--max-shard-size", type=_parse_bytes, default=4 << 30, metavar="SIZE",
                   help="largest safetensors file written (default 4GiB)")
    p.add_argument("--tracking-uri", default=None, help="where runs:/ and models:/ resolve (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--format", default="hf", choices=["hf", "raymoe"],
                   help="hf: a Hugging Face directory (default); raymoe: a raymoe model directory")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("mlflow-replay", help="send the MLflow records a run could not deliver (the mlflow_pending.jsonl it named)")
    p.add_argument("path", help="the pending file, e.g. .raymoe/runs/NAME/mlflow_pending.jsonl")
    p.add_argument("--tracking-uri", default=None, help="send to this server or store instead of the one the file names")
    p.set_defaults(fn=_cmd_mlflow_replay)

    p = sub.add_parser("check", help="validate config files without running anything")
    p.add_argument("configs", nargs="+")
    p.set_defaults(fn=_cmd_check)
    return parser


def _user_error_line(e: Exception) -> str | None:
    """The one line (after "raymoe: ") a mistake the user can fix is reported in; None for a bug."""
    if isinstance(e, ConfigError):
        return f"config error: {e}"
    # Imported only now: most of these modules import torch.
    from raymoe.model.hf import HFError
    from raymoe.model_dir import ModelSourceError
    from raymoe.parallel.checkpoint import CheckpointError
    from raymoe.serve.engine import RequestError
    from raymoe.submit import SubmitError
    from raymoe.tokenizer import TokenizerError
    from raymoe.train.data import DataError

    if isinstance(e, (SubmitError, ModelSourceError)):
        return str(e)
    if isinstance(e, (DataError, CheckpointError, RequestError, HFError, TokenizerError)):
        return f"{type(e).__name__}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("raymoe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = _user_error_line(e)
        if line is None:
            raise
        print(f"raymoe: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
