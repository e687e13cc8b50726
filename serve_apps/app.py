"""The Serve application builder for `serve deploy serve_apps/config.yaml` and k8s/rayservice.yaml.

    serve run serve_apps.app:app model=models:/raymoe-demo/latest num_groups=2

`args:` are keys of the run config's `serve:` section (config.ServeConfig), checked by the same
loader and the same model checks as `raymoe serve`, so a bad setting fails the deploy in one line
naming the key instead of crash-looping replicas. Two more keys: `config` (a run config YAML
whose serve: section the other args override) and `check_model` (default true: read the
model's config and tokenizer while building). host and port do not apply here: Serve's
`http_options` in the deploy file set them.
"""

from __future__ import annotations


def app(args: dict):
    import yaml

    from raymoe.config import ConfigError, config_from_dict
    from raymoe.serve.deployments import build_app
    from raymoe.serve.settings import settings_from_config

    args = dict(args)
    path = args.pop("config", None)
    check_model = args.pop("check_model", True)
    tree: dict = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"serve_apps args: config={path!r} cannot be read ({e.strerror})") from None
    if not isinstance(tree.get("serve", {}), dict):
        raise ConfigError(f"{path}: serve must be a mapping of serve keys")
    tree["serve"] = {**tree.get("serve", {}), **args}
    cfg = config_from_dict(tree, source=path or "serve_apps args")
    return build_app(settings_from_config(cfg, check_model=bool(check_model)))
