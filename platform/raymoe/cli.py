"""`raymoe`: the command line.

    raymoe train jobs/configs/demo.yaml --set train.steps=50
    raymoe params jobs/configs/deepseek-v3.yaml
    raymoe check jobs/configs/*.yaml

Config errors are reported in one line naming the file and key, before Ray starts, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from raymoe.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")


def _cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
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
    if outcome.recovery:
        r = outcome.recovery
        print(f"recovery:   rank {r['rank']} was killed after step {r['killed_after_step']}; the group restarted from the "
              f"step-{r['resumed_from_step']} checkpoint and finished its first step {r['recovery_s']:.1f}s after the kill "
              f"({r['steps_lost']} steps recomputed)")
    print_where_to_look(outcome.tracking_uri, outcome.mlflow_run_id)
    if outcome.registered_model:
        print(f"registered: {outcome.registered_model}  (serve it: raymoe serve {outcome.registered_model})")
    if outcome.sample is not None:
        print("sample from the trained model:")
        print("-" * 60)
        print(outcome.sample)
        print("-" * 60)
    return 0


def _cmd_params(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from raymoe.model.params import format_report

    print(format_report(cfg.model, args.seq_len or cfg.train.seq_len))
    return 0


def _cmd_check(args) -> int:
    for path in args.configs:
        cfg = load_config(path)
        print(f"ok: {path} ({cfg.name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description="Train DeepSeek-style Mixture-of-Experts models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on Ray Train, tracked in MLflow (resumes a run of the same name)")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(fn=_cmd_train)

    p = sub.add_parser("params", help="total / activated parameters and training FLOPs per token of a config")
    _add_config_args(p)
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: train.seq_len)")
    p.set_defaults(fn=_cmd_params)

    p = sub.add_parser("check", help="validate config files without running anything")
    p.add_argument("configs", nargs="+")
    p.set_defaults(fn=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"raymoe: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raymoe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from raymoe.parallel.checkpoint import CheckpointError
        from raymoe.train.data import DataError

        if isinstance(e, (DataError, CheckpointError)):
            print(f"raymoe: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
