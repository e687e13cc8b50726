"""Sharded training checkpoints that reload at any world size or expert degree.

A checkpoint directory holds
    dense.safetensors                  rank 0: every replicated tensor (routers' selection biases
                                       included) and its AdamW moments (`opt/<name>/exp_avg`, ...)
    dense/                             parallel.dense=fsdp instead: the FSDP-sharded dense tensors
                                       and their moments through torch.distributed.checkpoint, one
                                       __<rank>_0.distcp per rank plus .metadata (dense.safetensors
                                       then holds only the buffers)
    experts-<lo>-<hi>.safetensors      one per expert shard, written by the replica with data index
                                       0: global experts [lo, hi) of every layer, with their moments
    *.json                             small records such as the expert-load history (optional)
    manifest.json                      step, data position, model hash, MLflow run id, the expert
                                       range of each shard file and the sha256 of every file

Loading at another layout reads, per rank, exactly the expert rows it now owns from whichever
shard files hold them (safetensors reads slices lazily), and exactly its FSDP rows of the dense
tensors (torch.distributed.checkpoint reshards; each rank reads on its own, no collective).
Experts keep their own row-range files rather than going through torch.distributed.checkpoint:
serving, `raymoe export` and the Hugging Face export read one expert range of one tensor without
a process group, and the manifest names which files a rank needs, so a rank checks the sha256 of
those files only. The manifest is written last, by rank 0
after gathering every rank's checksums: a directory without one was never completed. A file whose
sha256 differs from the manifest is refused; `load_latest_good` then falls back to the previous
checkpoint, and every rank agrees on which one: the ranks gather each other's refusals (one
all_gather_object), so the message names every bad file, the rank that read it and the reason.

A fine-tuning run with LoRA saves only what trains (`only`: the adapters, the routers if they
train, and the buffers such as the selection biases); the frozen base comes from model.init_from,
whose fingerprint the manifest records (state.extra["base"]) and a resume checks.

Each rank calls save/load; both are collective when torch.distributed is initialized.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from raymoe.parallel.apply import ParallelPlan, assign_

MANIFEST = "manifest.json"
DENSE_DCP = "dense"  # torch.distributed.checkpoint folder of FSDP-sharded dense tensors
FORMAT_VERSION = 2
_MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and why."""


class BaseModelChanged(CheckpointError):
    """A LoRA checkpoint's frozen base (model.init_from) is not the one its adapters were trained on."""


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    data_position: int = 0
    model_hash: str = ""
    mlflow_run_id: str | None = None
    restarts: int = 0
    world_size: int = 1
    expert_degree: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _unique(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases (tied embeddings): safetensors refuses two names for one storage."""
    seen, out = set(), {}
    for k, v in sd.items():
        local = v.to_local() if _is_dtensor(v) else v
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh")


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (all-gathered), or the tensor itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def _shaped_like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` on p's device and dtype, as a DTensor sharded like p when p is one (no communication)."""
    full = full.to(p.device, p.dtype)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return full


def _adam_step(optimizer: torch.optim.Optimizer) -> float:
    for st in optimizer.state.values():
        if "step" in st:
            return float(st["step"])
    return 0.0


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: ParallelPlan,
    state: TrainerState,
    records: dict[str, Any] | None = None,
    only: set[str] | None = None,
) -> None:
    """Every rank calls this with its own (or a shared) directory; rank 0 writes the manifest.
    `only`: the state-dict names to save (None = all)."""
    mesh = plan.mesh
    os.makedirs(path, exist_ok=True)
    written: dict[str, dict[str, Any]] = {}
    expert_names = {n for n, _ in plan.experts}

    sd = _unique({k: v for k, v in model.state_dict().items() if k not in expert_names and (only is None or k in only)})
    if plan.fsdp:
        # FSDP shards (and their moments) through torch.distributed.checkpoint: each rank writes
        # its own shards, nobody gathers; the loader reshards to any layout.
        sharded = {k: v for k, v in sd.items() if _is_dtensor(v)}
        for name, p in plan.dense:
            if p in optimizer.state and name in sharded:
                sharded.update({f"opt/{name}/{m}": optimizer.state[p][m] for m in _MOMENTS})
        import torch.distributed.checkpoint as dcp

        dcp.save(sharded, checkpoint_id=os.path.join(path, DENSE_DCP))
        mine = [f for f in os.listdir(os.path.join(path, DENSE_DCP)) if f.startswith(f"__{mesh.rank}_")]
        written.update({f"{DENSE_DCP}/{f}": {} for f in mine + ([".metadata"] if mesh.rank == 0 else [])})
        sd = {k: v for k, v in sd.items() if k not in sharded}  # buffers: whole on every rank
    if mesh.rank == 0:
        tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        for name, p in plan.dense:
            if p in optimizer.state and name in sd:
                tensors.update({f"opt/{name}/{m}": optimizer.state[p][m].detach().contiguous().cpu() for m in _MOMENTS})
        save_file(tensors, os.path.join(path, "dense.safetensors"))
        written["dense.safetensors"] = {}
        for name, obj in (records or {}).items():
            assert name.endswith(".json") and name != MANIFEST, name
            with open(os.path.join(path, name), "w") as f:
                json.dump(obj, f)
            written[name] = {}
    # Experts FSDP-sharded over their replicas are gathered there (each replica group at once),
    # one tensor at a time; the replica with data index 0 writes them.
    if plan.experts and (mesh.data_index == 0 or plan.expert_fsdp):
        local = mesh.local_experts()
        fname = f"experts-{local.start:05d}-{local.stop:05d}.safetensors"
        writer = mesh.data_index == 0
        tensors = {}
        for name, p in plan.experts:
            if only is not None and name not in only:
                continue
            whole = _whole(p)
            if writer:
                tensors[name] = whole.detach().contiguous().cpu()
            for m in _MOMENTS:
                if p in optimizer.state:
                    whole = _whole(optimizer.state[p][m])
                    if writer:
                        tensors[f"opt/{name}/{m}"] = whole.detach().contiguous().cpu()
        if writer:
            save_file(tensors, os.path.join(path, fname))
            written[fname] = {"experts": [local.start, local.stop]}
    for fname, info in written.items():
        info["sha256"] = _sha256(os.path.join(path, fname))
        info["bytes"] = os.path.getsize(os.path.join(path, fname))  # what unfinished() compares, without hashing

    gathered = [None] * mesh.world_size if _dist() else [written]
    if _dist():
        dist.all_gather_object(gathered, written)
    if mesh.rank == 0:
        files = {k: v for part in gathered for k, v in part.items()}
        manifest = {
            "format": FORMAT_VERSION,
            "state": dataclasses.asdict(state),
            "adam_step": _adam_step(optimizer),
            "rng": torch.get_rng_state().tolist(),
            "files": files,
        }
        tmp = os.path.join(path, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, os.path.join(path, MANIFEST))
    if _dist():
        dist.barrier()  # nobody reports (or deletes) a directory before the manifest exists


def _parse_manifest(path: str) -> dict[str, Any]:
    """The manifest of the checkpoint at `path` as written; raises OSError or ValueError."""
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def read_manifest(path: str) -> dict[str, Any]:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint was never completed")
    try:
        manifest = _parse_manifest(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath}: unreadable ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: checkpoint format {manifest.get('format')} is not {FORMAT_VERSION}")
    return manifest


def _verify(path: str, manifest: dict[str, Any], names) -> None:
    for name in names:
        fpath = os.path.join(path, name)
        if not os.path.exists(fpath):
            raise CheckpointError(f"{fpath}: missing from the checkpoint")
        if _sha256(fpath) != manifest["files"][name]["sha256"]:
            raise CheckpointError(f"{fpath}: sha256 does not match {MANIFEST} (truncated or corrupted)")


def unfinished(path: str) -> str | None:
    """Why the checkpoint at `path` was never completely written, or None: a file its manifest
    names is missing or shorter than when it was saved. That is what a rank lost while its files
    were still being copied to storage leaves behind (the manifest is rank 0's and can arrive
    first). Sizes only, no hashing: damage that keeps the size is load_checkpoint's to find.
    Manifests from before sizes were recorded are judged by missing files alone; a manifest that
    does not parse was itself cut short (read_manifest refuses other bad manifests)."""
    try:
        manifest = _parse_manifest(path)
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, info in manifest.get("files", {}).items():
        fpath = os.path.join(path, name)
        if not os.path.exists(fpath):
            return f"{name} is missing"
        if "bytes" in info and os.path.getsize(fpath) < info["bytes"]:
            return f"{name} has {os.path.getsize(fpath):,} of its {info['bytes']:,} bytes"
    return None


def manifest_step(path: str) -> int:
    """The training step the checkpoint at `path` was saved at, or -1 when its manifest cannot say."""
    try:
        return int(_parse_manifest(path)["state"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def verify_checkpoint(path: str) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest."""
    manifest = read_manifest(path)
    _verify(path, manifest, manifest["files"])
    return manifest


def _shards_for(manifest: dict[str, Any], lo: int, hi: int) -> list[tuple[str, int, int]]:
    """Shard files overlapping global experts [lo, hi): (file, first, end) sorted by first."""
    out = []
    for name, info in manifest["files"].items():
        if "experts" in info:
            a, b = info["experts"]
            if a < hi and b > lo:
                out.append((name, a, b))
    out.sort(key=lambda t: t[1])
    covered = sum(min(b, hi) - max(a, lo) for _, a, b in out)
    if covered != hi - lo:
        raise CheckpointError(f"checkpoint holds {covered} of experts [{lo}, {hi}); its expert shard files are incomplete")
    return out


def _read_expert_rows(path: str, shards, key: str, lo: int, hi: int) -> torch.Tensor:
    parts = []
    for fname, a, b in shards:
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            sl = f.get_slice(key)
            parts.append(sl[max(a, lo) - a : min(b, hi) - a])
    return torch.cat(parts)


_SPLIT_GATE = re.compile(r"^(.*\.experts\.)w1(/.*)?$")  # a gate stack (or its AdamW moment) saved apart from its up stack


def with_fused_gate_up(names: list[str], read: Callable[[str, range | None], torch.Tensor]):
    """(names, read) of stored tensors, where a routed-expert stack written before raymoe fused
    gate and up (`...experts.w1` and `...experts.w3`, [E, D, F] each; in checkpoints also their
    `opt/<name>/<moment>`) reads as the one `...experts.w13` [E, D, 2F]: the two side by side.
    Model directories and checkpoints both read through it; every other name passes through."""
    have = set(names)
    legacy = {}  # fused name -> (gate name, up name)
    for n in names:
        m = _SPLIT_GATE.match(n)
        if m and f"{m[1]}w3{m[2] or ''}" in have:
            legacy[f"{m[1]}w13{m[2] or ''}"] = (n, f"{m[1]}w3{m[2] or ''}")
    if not legacy:
        return names, read
    gates = {gate: fused for fused, (gate, _) in legacy.items()}
    ups = {up for _, up in legacy.values()}

    def read_fused(name: str, experts: range | None) -> torch.Tensor:
        if name in legacy:
            return torch.cat([read(half, experts) for half in legacy[name]], dim=-1)
        return read(name, experts)

    return [gates.get(n, n) for n in names if n not in ups], read_fused


def files_needed(manifest: dict[str, Any], plan: ParallelPlan) -> list[str]:
    names = ["dense.safetensors", *(n for n in manifest["files"] if n.endswith(".json"))]
    if plan.experts:
        local = plan.mesh.local_experts()
        names += [f for f, _, _ in _shards_for(manifest, local.start, local.stop)]
    return names


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: ParallelPlan,
    expect_model_hash: str | None = None,
    only: set[str] | None = None,
    expect_base: str | None = None,
) -> tuple[TrainerState, dict[str, Any]]:
    """Load this rank's part into the (parallelized) model and optimizer. Returns (state, records).
    `only`: the names a partial (LoRA) checkpoint holds; `expect_base`: the fingerprint its
    frozen base must have."""
    manifest = read_manifest(path)
    state = TrainerState(**manifest["state"])
    if expect_model_hash and state.model_hash and state.model_hash != expect_model_hash:
        raise CheckpointError(
            f"{path}: saved for a different model architecture or LoRA setup (model hash {state.model_hash}, "
            f"config has {expect_model_hash}); use the same model: and lora: sections or a new run name"
        )
    saved_base = state.extra.get("base", {}).get("fingerprint")
    if expect_base and saved_base != expect_base:
        raise BaseModelChanged(
            f"{path}: its adapters were trained on base {state.extra.get('base', {}).get('init_from')} with fingerprint "
            f"{saved_base}, but model.init_from now has {expect_base}; point model.init_from at the same base "
            "(pin MLflow URIs to a version, e.g. models:/NAME/3) or start a new run name"
        )
    plan_experts = [(n, p) for n, p in plan.experts if only is None or n in only]
    _verify(path, manifest, files_needed(manifest, plan))
    sharded = _dcp_targets(path, manifest, model, plan)  # FSDP-saved dense tensors, shapes checked

    fused = bool(optimizer.defaults.get("fused"))
    step = torch.tensor(manifest["adam_step"], dtype=torch.float32)
    with safe_open(os.path.join(path, "dense.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        weights = {k: f.get_tensor(k) for k in keys if not k.startswith("opt/")}
        moments = {k: f.get_tensor(k) for k in keys if k.startswith("opt/")}
    expert_rows: dict[str, torch.Tensor] = {}
    if plan_experts:
        local = plan.mesh.local_experts()
        shards = _shards_for(manifest, local.start, local.stop)
        names, read_rows = with_fused_gate_up(sorted(_keys(path, shards[0][0])),
                                              lambda key, _: _read_expert_rows(path, shards, key, local.start, local.stop))
        saved_keys = set(names)
        for name, p in plan_experts:
            if name not in saved_keys:
                raise CheckpointError(f"{path}: checkpoint does not match the model: it has no {name}")
            for key in [name, *(f"opt/{name}/{m}" for m in _MOMENTS if f"opt/{name}/{m}" in saved_keys)]:
                rows = read_rows(key, None)
                if rows.shape != p.shape:
                    raise CheckpointError(f"{path}: checkpoint does not match the model: {key} has shape "
                                          f"{tuple(rows.shape)}, the model needs {tuple(p.shape)}")
                expert_rows[key] = rows
    # Every shape is checked before anything is copied: a refused checkpoint leaves the model as it was.
    frozen = set() if only is None else set(model.state_dict()) - only
    load_model_weights(model, weights, allow_missing={n for n, _ in plan.experts} | frozen | set(sharded))
    if sharded:
        _dcp_load(path, sharded)
        moments.update({k: v for k, v in sharded.items() if k.startswith("opt/")})
    for name, p in plan.dense:
        if f"opt/{name}/exp_avg" in moments:
            optimizer.state[p] = {
                "step": step.to(p.device, copy=True) if fused else step.clone(),  # one tensor per parameter: the step is updated in place
                **{m: _shaped_like(p, moments[f"opt/{name}/{m}"]) for m in _MOMENTS},
            }
    for name, p in plan_experts:
        with torch.no_grad():
            assign_(p, expert_rows[name].to(p.device))
        if f"opt/{name}/exp_avg" in expert_rows:
            optimizer.state[p] = {
                "step": step.to(p.device, copy=True) if fused else step.clone(),  # one tensor per parameter: the step is updated in place
                **{m: _shaped_like(p, expert_rows[f"opt/{name}/{m}"]) for m in _MOMENTS},
            }
    torch.set_rng_state(torch.tensor(manifest["rng"], dtype=torch.uint8))
    records = {}
    for name in manifest["files"]:
        if name.endswith(".json"):
            with open(os.path.join(path, name)) as f:
                records[name] = json.load(f)
    return state, records


def _dcp_metadata(path: str, manifest: dict[str, Any]):
    """The torch.distributed.checkpoint metadata of the FSDP-saved dense tensors, or None."""
    meta = f"{DENSE_DCP}/.metadata"
    if meta not in manifest["files"]:
        return None
    _verify(path, manifest, [meta])
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(os.path.join(path, DENSE_DCP)).read_metadata()


def _dcp_files(md, name: str, rows: tuple[int, int] | None) -> set[str]:
    """The .distcp files holding the chunks of `name` that overlap dim-0 rows [lo, hi) (all if None)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    out = set()
    for i, chunk in enumerate(md.state_dict_metadata[name].chunks):
        lo, n = (int(chunk.offsets[0]), int(chunk.sizes[0])) if len(chunk.sizes) else (0, 1)
        if rows is None or (lo < rows[1] and lo + n > rows[0]):
            out.add(f"{DENSE_DCP}/{md.storage_data[MetadataIndex(name, chunk.offsets, i)].relative_path}")
    return out


def _rows_of(t: torch.Tensor) -> tuple[int, int] | None:
    """Dim-0 rows of the whole tensor this rank's part of a DTensor holds; None for a plain tensor."""
    if not _is_dtensor(t) or t.dim() == 0:
        return None
    (chunk,) = t.__create_chunk_list__()
    return int(chunk.offsets[0]), int(chunk.offsets[0]) + int(chunk.sizes[0])


def _dcp_targets(path: str, manifest: dict[str, Any], model: torch.nn.Module, plan: ParallelPlan) -> dict[str, torch.Tensor]:
    """Where each FSDP-saved dense tensor goes in this model (its parameter, or a new tensor shaped
    like it for an AdamW moment), after checking shapes and the sha256 of exactly the files this
    rank will read (its rows, at whatever layout it now has)."""
    md = _dcp_metadata(path, manifest)
    if md is None:
        return {}
    own = model.state_dict()
    params = dict(plan.dense)
    targets, files = {}, set()
    for key, info in md.state_dict_metadata.items():
        name = key.split("/")[1] if key.startswith("opt/") else key
        if name not in own:
            raise CheckpointError(f"{path}: checkpoint does not match the model: unexpected {name}")
        if tuple(info.size) != tuple(own[name].shape):
            raise CheckpointError(f"{path}: checkpoint does not match the model: {key} has shape {tuple(info.size)}, "
                                  f"the model needs {tuple(own[name].shape)}")
        if key.startswith("opt/"):
            if name not in params or not params[name].requires_grad:
                continue
            target = torch.empty_like(params[name], dtype=info.properties.dtype)
        else:
            target = own[name]
        targets[key] = target
        files |= _dcp_files(md, key, _rows_of(target))
    _verify(path, manifest, sorted(files))
    return targets


def _dcp_load(path: str, targets: dict[str, torch.Tensor]) -> None:
    """Read into `targets` in place, each rank on its own (no collective: a rank that refused the
    checkpoint before this point cannot leave the others waiting)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(targets, checkpoint_id=os.path.join(path, DENSE_DCP), no_dist=True)


def _keys(path: str, fname: str) -> set[str]:
    with safe_open(os.path.join(path, fname), framework="pt") as f:
        return set(f.keys())


def full_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The whole single-device state dict (every expert of every layer), for serving and export."""
    manifest = verify_checkpoint(path)
    verified = set(manifest["files"])  # all checked just now
    return {name: checkpoint_tensor(path, manifest, name, verified=verified) for name in checkpoint_tensor_names(path, manifest)}


def checkpoint_tensor(path: str, manifest: dict[str, Any], name: str, experts: range | None = None,
                      verified: set[str] | None = None) -> torch.Tensor:
    """One model tensor of a checkpoint; for a routed-expert tensor, the rows of `experts` only (all
    of them if None), read from whichever shards hold them. Each file is checked against the
    manifest's sha256 before its first read (`verified` remembers which were)."""
    verified = set() if verified is None else verified

    def check(names) -> None:
        todo = [n for n in names if n not in verified]
        _verify(path, manifest, todo)
        verified.update(todo)

    check(["dense.safetensors"])
    with safe_open(os.path.join(path, "dense.safetensors"), framework="pt") as f:
        if name in f.keys():
            return f.get_tensor(name)
    md = _dcp_metadata(path, manifest)
    if md is not None and name in md.state_dict_metadata:
        info = md.state_dict_metadata[name]
        check(sorted(_dcp_files(md, name, None)))
        out = torch.empty(tuple(info.size), dtype=info.properties.dtype)
        _dcp_load(path, {name: out})
        return out
    shards = sorted(((n, *i["experts"]) for n, i in manifest["files"].items() if "experts" in i), key=lambda t: t[1])
    if not shards:
        raise CheckpointError(f"{path}: the checkpoint has no tensor {name}")
    lo, hi = (experts.start, experts.stop) if experts is not None else (shards[0][1], shards[-1][2])
    needed = _shards_for(manifest, lo, hi)
    check([n for n, _, _ in needed])
    if name not in _keys(path, needed[0][0]):
        raise CheckpointError(f"{path}: the checkpoint has no tensor {name}")
    return _read_expert_rows(path, needed, name, lo, hi)


def checkpoint_tensor_names(path: str, manifest: dict[str, Any]) -> list[str]:
    """Every model tensor's name (from the file headers; nothing is read or verified)."""
    with safe_open(os.path.join(path, "dense.safetensors"), framework="pt") as f:
        names = [k for k in f.keys() if not k.startswith("opt/")]
    if f"{DENSE_DCP}/.metadata" in manifest["files"]:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(os.path.join(path, DENSE_DCP)).read_metadata()
        names += [k for k in md.state_dict_metadata if not k.startswith("opt/")]
    shards = [n for n, i in manifest["files"].items() if "experts" in i]
    if shards:
        names += [k for k in sorted(_keys(path, shards[0])) if not k.startswith("opt/")]
    return names


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], allow_missing: set[str] = frozenset()) -> None:
    """Load a state dict of whole tensors (into FSDP shards too: each rank keeps its part); tied
    aliases dropped at save time are restored by the tie itself. Checked before anything is copied."""
    own = model.state_dict()
    for k, v in weights.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(f"checkpoint does not match the model: {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}")
    tied = {"lm_head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) else set()
    missing = [k for k in own if k not in weights and k not in tied and k not in allow_missing]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in weights.items():
            assign_(own[k], v)


def load_latest_good(
    candidates: list[str], model, optimizer, plan: ParallelPlan, expect_model_hash: str | None, log=print,
    only: set[str] | None = None, expect_base: str | None = None,
) -> tuple[str, TrainerState, dict[str, Any]] | None:
    """Try checkpoints newest first; the first that every rank loads cleanly wins. A changed base
    model is not a damaged file: it ends the search at once (an older checkpoint would not fit either).

    Every rank's refusal is gathered (one all_gather_object per candidate), so what rank 0 logs
    and what every rank raises name each bad file, the rank that read it and why."""
    refused: list[str] = []
    for path in candidates:
        err = None
        try:
            result = load_checkpoint(path, model, optimizer, plan, expect_model_hash, only, expect_base)
        except (CheckpointError, OSError) as e:  # OSError: a file the manifest names that cannot be opened
            result = None
            err = ("BaseModelChanged" if isinstance(e, BaseModelChanged) else None, str(e))
        failures = _gather_failures(err)
        changed = [msg for _, (kind, msg) in failures if kind == "BaseModelChanged"]
        if changed:
            raise BaseModelChanged(changed[0])
        if not failures:
            return (path, *result)
        reasons = _by_rank(failures)
        refused.append(reasons)
        log(f"checkpoint {path} refused: {reasons}; trying the previous one")
    if candidates:
        # Some rank may hold a partial load of a refused checkpoint; never train on from that.
        raise CheckpointError(f"none of the {len(candidates)} checkpoints could be loaded: {'; '.join(refused)}; "
                              "fix or remove them, or start a new run name")
    return None


def _gather_failures(err: tuple[str | None, str] | None) -> list[tuple[int, tuple[str | None, str]]]:
    """(rank, (kind, message)) of every rank that refused, rank order; [] when all loaded."""
    if not _dist():
        return [] if err is None else [(0, err)]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, err)
    return [(rank, e) for rank, e in enumerate(gathered) if e is not None]


def _by_rank(failures: list[tuple[int, tuple[str | None, str]]]) -> str:
    """'rank 1: <file>: <why>; ranks 0, 1: <file>: <why>': one entry per distinct message (a file
    every rank reads fails the same way on each); no rank numbers in a single process."""
    ranks: dict[str, list[int]] = {}
    for rank, (_, msg) in failures:
        ranks.setdefault(msg, []).append(rank)
    if not _dist():
        return "; ".join(ranks)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {msg}" for msg, r in ranks.items())
