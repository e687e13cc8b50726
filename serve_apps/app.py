"""Typed Serve application builder: `serve deploy serve_apps/config.yaml` passes `args:` here.

    serve run serve_apps.app:app model=models:/raymoe-demo/latest mode=routed num_groups=2
"""

from typing import Literal, Optional

from pydantic import BaseModel


class AppArgs(BaseModel):
    model: str
    """A raymoe checkpoint dir, a model dir, or runs:/<id>/model, models:/<name>/<version|latest>."""
    mode: Literal["routed", "monolithic"] = "routed"
    num_groups: int = 2
    max_batch: int = 16
    max_tokens: int = 256
    api_key: Optional[str] = None
    tracking_uri: Optional[str] = None
    router_min_replicas: int = 1
    router_max_replicas: int = 1
    group_min_replicas: int = 1
    group_max_replicas: int = 1
    data_path: Literal["direct", "handle"] = "direct"


def app(args: AppArgs):
    from raymoe.serve.deployments import ServeSettings, build_app

    return build_app(ServeSettings(
        model=args.model, mode=args.mode, num_groups=args.num_groups, max_batch=args.max_batch,
        max_tokens=args.max_tokens, api_key=args.api_key, tracking_uri=args.tracking_uri,
        router_replicas=(args.router_min_replicas, args.router_max_replicas), group_replicas=(args.group_min_replicas, args.group_max_replicas),
        data_path=args.data_path,
    ))
