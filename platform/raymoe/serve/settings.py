"""What one serving application runs with: the typed `serve:` section (config.ServeConfig)
resolved against its model and checked before Ray starts.

    settings = settings_from_config(load_config("jobs/configs/demo.yaml", ["serve.num_groups=4"]))
    run_serving(settings)                      # serve/deployments.py

The `raymoe serve` command, the `serve_apps/` builder (`serve deploy`) and k8s/rayservice.yaml all
come through `settings_from_config`, so a setting means the same everywhere and an impossible one
(groups that cannot hold the experts, a placement for another model, a routed model without
routed experts) fails here, in one line naming the key, instead of inside replicas that then
crash-loop.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from raymoe.config import ConfigError, ModelConfig, RunConfig, ServeConfig


@dataclass(frozen=True)
class ServeSettings:
    """A ServeConfig resolved for one application: what every replica is constructed with."""

    model: str
    """The MODEL source (model_dir.MODEL_SOURCES), made absolute when it is a local path."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking_uri: str | None = None
    """Where models:/ and runs:/ resolve (None = $MLFLOW_TRACKING_URI)."""
    placement: dict | None = None
    """The contents of serve.placement (Placement.to_dict()); None = contiguous groups."""
    api_key: str | None = None
    """The key clients must send (read from serve.api_key_env); None = an open server."""
    channel_token: str | None = None
    """Shared secret of the direct channel; build_app draws one per application."""
    app_key: str | None = None
    """Names the application's directory actor (directory.py); build_app draws one per application."""

    @classmethod
    def of(cls, model: str, *, tracking_uri: str | None = None, placement: dict | None = None, api_key: str | None = None,
           channel_token: str | None = None, app_key: str | None = None, **serve) -> "ServeSettings":
        """Settings from serve keys given as keywords (tests, benchmarks), unchecked against the
        model: `ServeSettings.of(model_dir, mode="routed", num_groups=2)`."""
        return cls(model=model, serve=ServeConfig(**serve), tracking_uri=tracking_uri, placement=placement, api_key=api_key,
                   channel_token=channel_token, app_key=app_key)

    @property
    def routed(self) -> bool:
        return self.serve.mode == "routed"


def default_model(cfg: RunConfig) -> str:
    """What serve.model: null serves: the model this config's training registers, else its run directory."""
    if cfg.tracking.registered_model:
        return f"models:/{cfg.tracking.registered_model}/latest"
    return os.path.join(cfg.storage_path, cfg.name)


def _read_placement(path: str) -> dict:
    try:
        with open(os.path.expanduser(path)) as f:
            placement = json.load(f)
    except OSError as e:
        raise ConfigError(f"serve.placement={path!r} cannot be read ({e.strerror}); write one with `raymoe placement`") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"serve.placement={path!r} is not JSON ({e.msg} at line {e.lineno}); write one with `raymoe placement`") from None
    if not isinstance(placement, dict):
        raise ConfigError(f"serve.placement={path!r} must hold a JSON object as `raymoe placement` writes")
    return placement


def check_against_model(serve: ServeConfig, placement: dict | None, model: ModelConfig, name: str) -> None:
    """The settings that need the model: raises ConfigError naming the serve key to change."""
    from raymoe.serve.placement import Placement

    if serve.mode != "routed":
        return
    E = model.num_experts
    if E == 0:
        raise ConfigError(f"serve.mode=routed needs routed experts and {name!r} has none; set serve.mode=monolithic")
    if placement is None:
        if E % serve.num_groups:
            raise ConfigError(f"serve.num_groups={serve.num_groups} must divide the {E} routed experts of {name!r} "
                              "(or give serve.placement from `raymoe placement`)")
        return
    try:
        planned = Placement.from_dict(placement)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"serve.placement={serve.placement!r} is not a placement ({type(e).__name__}: {e}); "
                          "write one with `raymoe placement`") from None
    if planned.num_experts != E or planned.num_groups != serve.num_groups:
        raise ConfigError(f"serve.placement={serve.placement!r} places {planned.num_experts} experts in {planned.num_groups} "
                          f"groups, but {name!r} has {E} routed experts and serve.num_groups={serve.num_groups}")


def settings_from_config(cfg: RunConfig, *, check_model: bool = True, log=print) -> ServeSettings:
    """cfg.serve resolved: the model source, the placement file read, the API key read from its
    environment variable; with `check_model`, the model's config is read (an MLflow model is
    downloaded once per process) and the settings that need it are checked, tokenizer included."""
    from raymoe.tracking import tracking_uri

    serve = cfg.serve
    model = serve.model or default_model(cfg)
    if "://" not in model and ":/" not in model:
        model = os.path.abspath(os.path.expanduser(model))
    placement = _read_placement(serve.placement) if serve.placement else None
    api_key = (os.environ.get(serve.api_key_env) or None) if serve.api_key_env else None
    settings = ServeSettings(model=model, serve=serve, tracking_uri=tracking_uri(cfg), placement=placement, api_key=api_key)
    if check_model:
        from raymoe.model_dir import ModelSourceError, open_source
        from raymoe.tokenizer import TokenizerError

        try:
            src = open_source(model, tracking_uri=settings.tracking_uri)
            for note in src.notes:
                log(f"raymoe: note: {note}")
            src.tokenizer()
        except (ModelSourceError, TokenizerError) as e:
            hint = "" if serve.model else f" (serve.model is null, so {cfg.name!r} serves what its training made)"
            raise ConfigError(f"serve.model={model!r}: {e}{hint}") from None
        check_against_model(serve, placement, src.cfg.model, src.cfg.name)
    return settings
