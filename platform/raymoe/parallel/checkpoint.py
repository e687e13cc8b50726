"""Training checkpoints: weights as safetensors, optimizer state, and a manifest that commits them.

A checkpoint directory holds
    model.safetensors      every model tensor (routers' selection biases included), no pickle
    optimizer.pt           AdamW state and RNG states (loaded with weights_only=True)
    *.json                 small records such as the expert-load history (optional)
    manifest.json          step, data position, config hash, MLflow run id, sha256 of each file

The manifest is written last: a directory without one is an unfinished write and is refused, as is
one whose files do not match their recorded sha256 (truncated or corrupted on the way to storage).

    save_checkpoint(dir, model, optimizer, state)   # state: TrainerState
    ckpt = load_checkpoint(dir, expect_model_hash=cfg.model_hash())
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and why."""


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    data_position: int = 0
    model_hash: str = ""
    mlflow_run_id: str | None = None
    restarts: int = 0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedCheckpoint:
    state: TrainerState
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    records: dict[str, Any] = field(default_factory=dict)
    """The optional JSON records, by file name."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases (tied embeddings): safetensors refuses two names for one storage."""
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    records: dict[str, Any] | None = None,
) -> None:
    os.makedirs(path, exist_ok=True)
    for name, obj in (records or {}).items():
        assert name.endswith(".json") and name != MANIFEST, name
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f)
    save_file(_unique_tensors(model.state_dict()), os.path.join(path, "model.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, os.path.join(path, "optimizer.pt"))
    names = ["model.safetensors", "optimizer.pt", *(records or {})]
    files = {name: _sha256(os.path.join(path, name)) for name in names}
    manifest = {"format": FORMAT_VERSION, "state": dataclasses.asdict(state), "files": files}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict[str, Any]:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint was never completed")
    try:
        with open(mpath) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable ({e})") from None


def verify_checkpoint(path: str) -> dict[str, Any]:
    """Check every file against the manifest's sha256; returns the manifest."""
    manifest = read_manifest(path)
    for name, digest in manifest["files"].items():
        fpath = os.path.join(path, name)
        if not os.path.exists(fpath):
            raise CheckpointError(f"{fpath}: missing from the checkpoint")
        if _sha256(fpath) != digest:
            raise CheckpointError(f"{fpath}: sha256 does not match {MANIFEST} (truncated or corrupted)")
    return manifest


def load_checkpoint(path: str, expect_model_hash: str | None = None, map_location: str = "cpu") -> LoadedCheckpoint:
    manifest = verify_checkpoint(path)
    state = TrainerState(**manifest["state"])
    if expect_model_hash and state.model_hash and state.model_hash != expect_model_hash:
        raise CheckpointError(
            f"{path}: saved for a different model architecture (model hash {state.model_hash}, "
            f"config has {expect_model_hash}); use the same model: section or a new run name"
        )
    weights = load_file(os.path.join(path, "model.safetensors"), device=map_location)
    blob = torch.load(os.path.join(path, "optimizer.pt"), map_location=map_location, weights_only=True)
    records = {}
    for name in manifest["files"]:
        if name.endswith(".json"):
            with open(os.path.join(path, name)) as f:
                records[name] = json.load(f)
    return LoadedCheckpoint(state=state, model=weights, optimizer=blob["optimizer"], rng=blob["rng"], records=records)


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a saved state dict; tied aliases dropped at save time are restored by the tie itself."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"checkpoint does not match the model: {str(e).splitlines()[-1].strip()}") from None
    tied = {"lm_head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
