"""`raymoe submit` and `raymoe jobs`: training or a search as a Ray job on a running cluster.

    raymoe submit train jobs/configs/demo.yaml --address http://HEAD:8265 --set output_dir=/shared/raymoe
    raymoe jobs status|logs|stop raysubmit_... --address http://HEAD:8265

Through the Ray Jobs SDK (`JobSubmissionClient`), the same as
`ray job submit --working-dir . -- python -m raymoe.cli train CONFIG`, plus what a cluster needs:
- the working directory is uploaded without virtual environments, VCS data, caches, tokenized
  data and local MLflow stores (`EXCLUDES`);
- the raymoe package this command runs from travels as a runtime_env `py_modules` entry, so the
  job driver and every Ray Train worker, on any node, import the code that was submitted (it
  shadows an older raymoe installed on the cluster);
- `--tracking-uri` reaches the job as MLFLOW_TRACKING_URI (and overrides a config's
  `tracking.uri`); without it the job uses the cluster's own MLFLOW_TRACKING_URI, which
  cluster.yaml exports on every node.
- Token authentication (Ray 2.60 clusters): when RAY_AUTH_MODE is unset and a token is at hand
  ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), this process sets
  RAY_AUTH_MODE=token so the SDK sends it. The token itself never goes into the runtime env.

Nothing here imports Ray at module import; errors a user can fix raise `SubmitError`.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import yaml

# gitignore-style patterns (Ray's `excludes`), relative to the working dir. Ray adds the
# working dir's .gitignore and .rayignore on top.
EXCLUDES = (
    ".git", ".venv", "venv", "__pycache__", "*.egg-info",
    ".pytest_cache", ".ruff_cache", ".mypy_cache",
    ".raymoe",  # default output_dir: checkpoints, tokenized data, the local MLflow database
    "mlruns", "mlartifacts", "*.db",  # local MLflow stores
    "bench/results",  # benchmark outputs: jobs never read them
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A submission or job command a user can fix; the message says what to change."""


@dataclass(frozen=True)
class Submission:
    """Everything `JobSubmissionClient.submit_job` is given."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """Warnings for the user (printed, never fatal)."""


def package_dir() -> str:
    """The raymoe package directory this process imported (editable checkout or site-packages)."""
    import raymoe

    return os.path.dirname(os.path.abspath(raymoe.__file__))


def _excluded(rel_path: str, patterns: tuple[str, ...] = EXCLUDES) -> str | None:
    """The pattern that keeps `rel_path` out of the upload, if any (gitignore semantics, roughly:
    a pattern without '/' matches any path component, one with '/' a leading path)."""
    parts = rel_path.replace(os.sep, "/").split("/")
    for pat in patterns:
        if "/" in pat:
            n = pat.count("/") + 1
            if any(fnmatch.fnmatch("/".join(parts[i:i + n]), pat) for i in range(len(parts) - n + 1)):
                return pat
        elif any(fnmatch.fnmatch(p, pat) for p in parts):
            return pat
    return None


def _raw_output_dir(config_path: str, overrides: list[str]) -> str:
    """output_dir as the job will see it, before the job's loader makes it absolute there."""
    with open(config_path) as f:
        data = yaml.safe_load(f) or {}
    value = str(data.get("output_dir", ".raymoe")) if isinstance(data, dict) else ".raymoe"
    for item in overrides:
        key, _, raw = item.partition("=")
        if key.strip() == "output_dir":
            value = raw.strip()
    return value


def build_submission(
    command: Literal["train", "tune"],
    config: str,
    overrides: list[str] = (),
    *,
    working_dir: str = ".",
    tracking_uri: str | None = None,
    resume: bool = False,
) -> Submission:
    """Validate the config here, before anything is uploaded, and describe the job."""
    from raymoe.config import load_config

    cfg = load_config(config, list(overrides))  # ConfigError: one line naming the key, exit 2
    wd = os.path.abspath(working_dir)
    if not os.path.isdir(wd):
        raise SubmitError(f"--working-dir {working_dir}: no such directory")
    rel = os.path.relpath(os.path.abspath(config), wd)
    if rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        raise SubmitError(f"{config} is outside the uploaded working dir {wd}: move it under it, or pass --working-dir")
    pattern = _excluded(rel)
    if pattern is not None:
        raise SubmitError(f"{config} is not uploaded (it matches the exclude {pattern!r}): copy it elsewhere "
                          f"under {wd}, e.g. jobs/configs/")

    overrides = list(overrides)
    env_vars = {"PYTHONUNBUFFERED": "1"}  # progress lines reach `raymoe jobs logs` as they are printed
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
        if cfg.tracking.uri and cfg.tracking.uri != tracking_uri:
            overrides.append(f"tracking.uri={tracking_uri}")  # the command line beats the file
    args = ["python", "-m", "raymoe.cli", command, rel.replace(os.sep, "/")]
    for item in overrides:
        args += ["--set", item]
    if resume:
        if command != "tune":
            raise SubmitError("--resume applies to `raymoe submit tune` only (training resumes by itself)")
        args.append("--resume")

    notes = []
    out = _raw_output_dir(config, overrides)
    if not (os.path.isabs(out) or out.startswith("~")):
        notes.append(f"output_dir {out!r} is relative: on the cluster it lands in the job's unpacked working dir on the "
                     "head node, which other nodes do not see; for a multi-node run pass "
                     "--set output_dir=<a path every node mounts>")
    if not tracking_uri and not cfg.tracking.uri:
        notes.append("no --tracking-uri: the job logs to the cluster's $MLFLOW_TRACKING_URI "
                     "(cluster.yaml sets it to the head's MLflow server), else to sqlite under output_dir")
    return Submission(
        entrypoint=shlex.join(args),
        runtime_env={
            "working_dir": wd,
            "excludes": list(EXCLUDES),
            "py_modules": [package_dir()],
            "env_vars": env_vars,
        },
        metadata={"raymoe.command": command, "raymoe.config": rel, "raymoe.name": cfg.name},
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------- the cluster


def token_source(environ: dict[str, str] | None = None) -> str | None:
    """Where Ray's client would find an auth token (the same places, in its order)."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"$RAY_AUTH_TOKEN_PATH ({path})" if os.path.isfile(path) else None
    default = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".ray", "auth_token")
    return default if os.path.isfile(default) else None


def enable_token_auth(environ: dict[str, str] | None = None) -> bool:
    """Set RAY_AUTH_MODE=token when it is unset and a token exists. Must run before Ray reads its
    config (its first import in this process), which is why `connect` calls it first."""
    env = os.environ if environ is None else environ
    if "RAY_AUTH_MODE" in env:
        return env["RAY_AUTH_MODE"].lower() == "token"
    if token_source(env) is None:
        return False
    env["RAY_AUTH_MODE"] = "token"
    return True


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("--address is needed: the Ray dashboard of the head node, e.g. http://HEAD:8265 "
                          "(or set RAY_API_SERVER_ADDRESS)")
    return address


def connect(address: str | None):
    """A `JobSubmissionClient` for the cluster, or a SubmitError that says what to fix."""
    address = resolve_address(address)
    enable_token_auth()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise SubmitError(_auth_message(address, e)) from None
    except (ConnectionError, OSError, ValueError) as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({str(e).splitlines()[0]}): check --address "
                          "(the head's dashboard, port 8265), or forward it: ray dashboard cluster.yaml") from None


def _auth_message(address: str, e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = token_source()
    have = f"this client sent the token from {where}" if where and os.environ.get("RAY_AUTH_MODE") == "token" else (
        "this client has no token" if not where else "RAY_AUTH_MODE is not 'token' here")
    return (f"the cluster at {address} refused the request ({first}); {have}: copy the head's token "
            "(`ray get-auth-token` there) to ~/.ray/auth_token or set RAY_AUTH_TOKEN, with RAY_AUTH_MODE=token")


def _call(address: str, what: str, fn, job_id: str | None = None):
    """One SDK call, with a missing job or a refused token turned into a SubmitError."""
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as e:
        raise SubmitError(_auth_message(address, e)) from None
    except RuntimeError as e:
        if job_id is not None and "status code 404" in str(e):
            raise SubmitError(f"no job {job_id!r} on the cluster at {address}: see raymoe jobs list --address {address}") from None
        raise SubmitError(f"{what} failed at {address}: {str(e).splitlines()[0]}") from None


def submit(client, address: str, submission: Submission) -> str:
    """Upload and start the job; returns its submission id."""
    return _call(address, "submitting the job", lambda: client.submit_job(
        entrypoint=submission.entrypoint, runtime_env=submission.runtime_env, metadata=submission.metadata))


def follow(client, address: str, job_id: str, out: TextIO = sys.stdout) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    deadline: float | None = None
    try:
        _call(address, "following the logs", lambda: asyncio.run(tail()), job_id)
        # The log stream closes when the job ends; the status can trail it by a moment.
        deadline = time.monotonic() + 30
    except SubmitError:
        raise
    except Exception as e:  # noqa: BLE001 - a dropped websocket (proxy, tunnel) must not lose the job
        print(f"raymoe: the log stream broke ({type(e).__name__}: {str(e)[:200]}); waiting for the job to end "
              f"(raymoe jobs logs {job_id} --address {address})", file=sys.stderr)
    while True:
        status = status_of(client, address, job_id)
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(0.5 if deadline is not None else 5)


def status_of(client, address: str, job_id: str) -> str:
    status = _call(address, "reading the job status", lambda: client.get_job_status(job_id), job_id)
    return getattr(status, "value", str(status))


def job_info(client, address: str, job_id: str):
    return _call(address, "reading the job", lambda: client.get_job_info(job_id), job_id)


def job_logs(client, address: str, job_id: str) -> str:
    return _call(address, "reading the logs", lambda: client.get_job_logs(job_id), job_id)


def stop(client, address: str, job_id: str) -> bool:
    return bool(_call(address, "stopping the job", lambda: client.stop_job(job_id), job_id))


def list_jobs(client, address: str) -> list:
    return _call(address, "listing jobs", client.list_jobs)
