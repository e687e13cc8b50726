"""Model directories, and every place model weights come from: the one owner of that format.

    src = open_source("path/or/runs:/<id>/model")     # HF dir, model dir, checkpoint or MLflow URI
    w = src.tensor("layers.3.ffn.experts.w13", experts=range(0, 32))  # one tensor, these experts only
    import_hf("DeepSeek-V2-Lite/", "models/v2-lite")                   # `raymoe import`
    export_hf("models/v2-lite", "out/")                                # `raymoe export`

A model directory (what `raymoe import` writes, what training logs to MLflow under `model/`, what
`raymoe serve` and `model.init_from` read) holds
    config.yaml                       the run config the model belongs to; its model: section is the architecture
    model.safetensors                 every tensor under raymoe's names, or, above max_shard_bytes,
    model-00001-of-0000N.safetensors  shards with a model.safetensors.index.json, as Hugging Face shards
    tokenizer.json, ...               the tokenizer files, when the model does not use bytes
    chat_template.jinja               the chat template, when the tokenizer or the fine-tuning data had one
    source.json                       where it came from: the Hugging Face directory, architecture and config.json

What is notable:
- Tensor by tensor, both ways: import and export hold one raymoe tensor (plus at most one shard
  being filled) at a time, never the model; under expert parallelism each rank reads only the rows
  (or, from a Hugging Face directory, only the per-expert tensors) of the experts it owns.
- A directory is written under a temporary name and renamed into place when complete: an import
  that fails half way leaves nothing that looks like a model, and an existing directory is refused.
- The safetensors writing is the library's `save_file`, one shard at a time; the index file is the
  Hugging Face layout (`metadata.total_size`, `weight_map`), so the same code writes both formats.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from raymoe.config import ModelConfig, RunConfig, config_from_dict, to_plain
from raymoe.model import hf
from raymoe.tokenizer import TOKENIZER_FILES, has_tokenizer

CONFIG = "config.yaml"
SOURCE = "source.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CHAT_TEMPLATE = "chat_template.jinja"
"""The chat template the model answers in: the tokenizer's, or the one its fine-tuning rendered
with (data.chat_template), which wins, so serving on another machine needs no path from training."""
DEFAULT_SHARD_BYTES = 4 << 30

MODEL_SOURCES = (
    "a Hugging Face model directory (config.json + safetensors), a raymoe model directory (config.yaml + "
    "model.safetensors, from `raymoe import` or logged by training), a training checkpoint directory (with "
    "manifest.json) or a training run's directory (<output_dir>/runs/<name>: its newest checkpoint), or an "
    "MLflow URI: runs:/<run id>/model or models:/<name>/<version>"
)
_EXPERT = re.compile(r"^layers\.\d+\.ffn\.experts\.(w13|w2|lora_[AB][123])$")


class ModelSourceError(ValueError):
    """MODEL is not something raymoe can read; the message says what it must be."""


def is_expert_tensor(name: str) -> bool:
    """Stacked routed-expert weights ([E, ...]): what expert parallelism shards by rows."""
    return bool(_EXPERT.match(name))


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Safetensors shards of at most `max_shard_bytes` (a bigger tensor gets a shard of its own),
    named and indexed as Hugging Face does; `close()` returns the files written."""

    def __init__(self, directory: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.dir, self.max = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = t.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        save_file(self.pending, os.path.join(self.dir, f".part-{len(self.parts):05d}"), metadata={"format": "pt"})
        self.parts.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.parts:
            self._flush()
        n = len(self.parts)
        if n == 1:
            os.replace(os.path.join(self.dir, ".part-00000"), os.path.join(self.dir, SINGLE))
            return [SINGLE]
        weight_map, files = {}, []
        for i, names in enumerate(self.parts):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.dir, f".part-{i:05d}"), os.path.join(self.dir, fname))
            weight_map.update({k: fname for k in names})
            files.append(fname)
        with open(os.path.join(self.dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=1)
        return files + [INDEX]


class _Staging:
    """A sibling temporary directory renamed to `final` on success, removed on failure."""

    def __init__(self, final: str):
        self.final = os.path.abspath(final)
        if os.path.exists(self.final) and (not os.path.isdir(self.final) or os.listdir(self.final)):
            raise ModelSourceError(f"{final} already exists and is not empty; choose a new output directory "
                                   "(nothing there was changed)")
        parent = os.path.dirname(self.final)
        os.makedirs(parent, exist_ok=True)
        if not os.access(parent, os.W_OK):
            raise ModelSourceError(f"{parent} is not writable; choose another output directory")
        self.dir = os.path.join(parent, f".{os.path.basename(self.final)}.tmp-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> str:
        os.makedirs(self.dir)
        return self.dir

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        if os.path.isdir(self.final):
            os.rmdir(self.final)  # empty, checked at the start
        os.rename(self.dir, self.final)


def copy_tokenizer(src_dir: str | None, out_dir: str) -> list[str]:
    copied = []
    if not src_dir:
        return copied
    for name in TOKENIZER_FILES:
        p = os.path.join(src_dir, name)
        if os.path.exists(p):
            shutil.copy2(p, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def write_model_dir(out_dir: str, cfg: RunConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
                    tokenizer_dir: str | None = None, source: dict | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, staged: bool = True) -> list[str]:
    """Write a raymoe model directory from (name, tensor) pairs, consumed one at a time."""
    def write(d: str) -> list[str]:
        writer = ShardWriter(d, max_shard_bytes)
        for name, t in tensors:
            writer.add(name, t)
        files = writer.close()
        with open(os.path.join(d, CONFIG), "w") as f:
            f.write(cfg.to_yaml())
        files.append(CONFIG)
        files += copy_tokenizer(tokenizer_dir, d)
        template = _fine_tuning_template(cfg)
        if template is not None:  # after the tokenizer's files: what the model learned wins
            with open(os.path.join(d, CHAT_TEMPLATE), "w", encoding="utf-8") as f:
                f.write(template)
            if CHAT_TEMPLATE not in files:
                files.append(CHAT_TEMPLATE)
        if source is not None:
            with open(os.path.join(d, SOURCE), "w") as f:
                json.dump(source, f, indent=1)
            files.append(SOURCE)
        return files

    if not staged:
        os.makedirs(out_dir, exist_ok=True)
        return write(out_dir)
    with _Staging(out_dir) as d:
        return write(d)


def save_model(model: torch.nn.Module, cfg: RunConfig, out_dir: str, **kwargs) -> list[str]:
    """A whole in-memory model (benchmarks, tests, small exports) as a model directory."""
    from raymoe.parallel.checkpoint import _unique

    return write_model_dir(out_dir, cfg, _unique(model.state_dict()).items(), **kwargs)


def _fine_tuning_template(cfg: RunConfig) -> str | None:
    """The text of data.chat_template, when the run set one and it can be read here."""
    if cfg.data.chat_template is None:
        return None
    try:
        with open(os.path.expanduser(cfg.data.chat_template), encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        print(f"raymoe: warning: data.chat_template={cfg.data.chat_template!r} cannot be read ({e.strerror}); "
              f"the model directory is written without it", flush=True)
        return None


def read_chat_template(model_dir: str) -> tuple[str, str] | None:
    """(path, text) of the chat template a model directory carries, or None."""
    path = os.path.join(model_dir, CHAT_TEMPLATE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return path, f.read()


# ----------------------------------------------------------------------------- reading


@dataclass
class ModelSource:
    """Where a model's tensors come from, readable one tensor (or one expert range) at a time."""

    path: str
    """Local directory."""
    kind: str
    """'hf', 'model' or 'checkpoint'."""
    cfg: RunConfig
    notes: list[str] = field(default_factory=list)
    """What the reader skipped or assumed (e.g. DeepSeek-V3's MTP layer)."""
    hf_architecture: str | None = None
    """The Hugging Face architecture the weights came from, where known."""
    hf_config: dict | None = None
    """Their original config.json, where known (export keeps its token ids and other keys)."""
    hf_keys: dict[str, str] = field(default_factory=dict)
    """Of a Hugging Face directory: raymoe tensor name -> the (first) HF key it is read from, for messages."""
    _reader: Callable[[str, range | None], torch.Tensor] | None = None
    _names: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return list(self._names)

    def tensor(self, name: str, experts: range | None = None) -> torch.Tensor:
        if experts is not None and not is_expert_tensor(name):
            experts = None
        return self._reader(name, experts)

    @property
    def tokenizer_dir(self) -> str | None:
        """Where this model's tokenizer files are (None: bytes, or not known here)."""
        return tokenizer_dir_of(self.cfg, self.path)

    def tokenizer(self):
        from raymoe.tokenizer import tokenizer_for

        return tokenizer_for(self.cfg, model_dir=self.path)

    def fingerprint(self) -> str:
        """Identifies these weights, for a LoRA run to check its frozen base did not change: a
        checkpoint's manifest checksums (every byte); for a model or Hugging Face directory, each
        safetensors file's size, header (names, shapes, dtypes, offsets) and last MiB. The latter
        catches another or a re-written model, not a flipped bit: hashing every byte of a
        DeepSeek-V3 would read 1.3 TB at every start."""
        import hashlib

        h = hashlib.sha256()
        if self.kind == "checkpoint":
            from raymoe.parallel.checkpoint import read_manifest

            files = read_manifest(self.path)["files"]
            h.update(json.dumps({k: v["sha256"] for k, v in sorted(files.items())}).encode())
            return h.hexdigest()[:24]
        for name in sorted(n for n in os.listdir(self.path) if n.endswith(".safetensors")):
            fpath = os.path.join(self.path, name)
            size = os.path.getsize(fpath)
            with open(fpath, "rb") as f:
                head = f.read(8)
                header = f.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
                f.seek(max(0, size - (1 << 20)))
                tail = f.read()
            h.update(f"{name}:{size}:".encode() + header + tail)
        return h.hexdigest()[:24]


def tokenizer_dir_of(cfg: RunConfig, model_dir: str | None = None) -> str | None:
    """Where a model's Hugging Face tokenizer files are (None: bytes). In order: none for
    data.tokenizer 'byte'; the files beside the weights (model_dir), which travelled with them;
    data.tokenizer's path; the tokenizer of model.init_from, followed through checkpoints and MLflow."""
    spec = cfg.data.tokenizer
    if spec == "byte":
        return None
    if has_tokenizer(model_dir):
        return model_dir
    if spec:
        return spec if os.path.isdir(spec) else os.path.dirname(spec)
    init = cfg.model.init_from
    if not init:
        return None
    if has_tokenizer(init):
        return init
    from raymoe.tracking import tracking_uri

    return open_source(init, tracking_uri(cfg)).tokenizer_dir


def _slice_reader(path: str, weight_map: dict[str, str]) -> Callable[[str, range | None], torch.Tensor]:
    def read(name: str, experts: range | None) -> torch.Tensor:
        if name not in weight_map:
            raise ModelSourceError(f"{path}: the model has no tensor {name}")
        with safe_open(os.path.join(path, weight_map[name]), framework="pt") as f:
            if experts is None:
                return f.get_tensor(name)
            return f.get_slice(name)[experts.start:experts.stop]
    return read


def _weight_map(path: str) -> dict[str, str]:
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    with safe_open(os.path.join(path, SINGLE), framework="pt") as f:
        return {k: SINGLE for k in f.keys()}


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def hf_run_config(model: ModelConfig, name: str) -> RunConfig:
    """The run config of an imported model: its architecture, every other section at defaults."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"
    return config_from_dict({"name": clean, "model": to_plain(model)}, source=f"import of {name}")


def latest_checkpoint(run_dir: str) -> str | None:
    """The complete checkpoint of a training run directory (<output_dir>/runs/<name>) with the highest step."""
    from raymoe.parallel.checkpoint import MANIFEST

    best, best_step = None, -1
    for name in os.listdir(run_dir):
        manifest = os.path.join(run_dir, name, MANIFEST)
        if name.startswith("checkpoint_") and os.path.exists(manifest):
            try:
                with open(manifest) as f:
                    step = int(json.load(f)["state"]["step"])
            except (OSError, ValueError, KeyError):
                continue
            if step > best_step:
                best, best_step = os.path.join(run_dir, name), step
    return best


def _open_local(path: str) -> ModelSource:
    from raymoe.parallel.checkpoint import (MANIFEST, CheckpointError, checkpoint_tensor, checkpoint_tensor_names,
                                            read_manifest, with_fused_gate_up)

    if os.path.isfile(os.path.join(path, "MLmodel")):  # an MLflow model (mlflow_model.py): the model directory in it
        from raymoe.mlflow_model import find_model_dir

        path = find_model_dir(path)
    if not os.path.exists(os.path.join(path, MANIFEST)) and (latest := latest_checkpoint(path)):
        path = latest  # a training run's directory: its newest complete checkpoint
    if os.path.exists(os.path.join(path, MANIFEST)):
        record = os.path.join(path, "run_config.json")
        if not os.path.exists(record):
            raise CheckpointError(f"{path}: checkpoint has no run_config.json (written since raymoe 0.1); serve the model logged to MLflow instead")
        with open(record) as f:
            cfg = config_from_dict(json.load(f), source=record)
        manifest = read_manifest(path)
        verified: set[str] = set()  # each file's sha256 is checked once, before its first read
        origin = _origin_of(cfg)
        try:
            names = checkpoint_tensor_names(path, manifest)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError on a damaged header
            raise CheckpointError(f"{path}: unreadable checkpoint ({str(e)[:200]})") from None
        names, read = with_fused_gate_up(names, lambda n, e: checkpoint_tensor(path, manifest, n, e, verified))
        if cfg.lora.enabled:
            return _merged_lora_source(path, cfg, manifest, read, set(names), origin)
        return ModelSource(path, "checkpoint", cfg, _reader=read, _names=names, **origin)
    if os.path.exists(os.path.join(path, CONFIG)) and (os.path.exists(os.path.join(path, SINGLE)) or os.path.exists(os.path.join(path, INDEX))):
        with open(os.path.join(path, CONFIG)) as f:
            cfg = config_from_dict(yaml.safe_load(f), source=os.path.join(path, CONFIG))
        wm = _weight_map(path)
        source = _read_json(os.path.join(path, SOURCE)) or {}
        origin = {"hf_architecture": source.get("architecture"), "hf_config": source.get("config")}
        if origin["hf_architecture"] is None:
            origin = _origin_of(cfg)
        names, read = with_fused_gate_up(list(wm), _slice_reader(path, wm))
        return ModelSource(path, "model", cfg, _reader=read, _names=names, **origin)
    if os.path.exists(os.path.join(path, "config.json")):
        ckpt = hf.HFCheckpoint(path)
        src = hf.HFSource(ckpt)
        cfg = hf_run_config(src.cfg, os.path.basename(os.path.normpath(path)))
        return ModelSource(path, "hf", cfg, notes=src.notes, hf_architecture=ckpt.architecture, hf_config=ckpt.config,
                           hf_keys={n: m.hf[0] for n, m in src.maps.items() if m.hf}, _reader=src.tensor,
                           _names=src.names())
    raise ModelSourceError(f"{path}: not a model; MODEL must be {MODEL_SOURCES}")


def _merged_lora_source(path: str, cfg: RunConfig, manifest: dict, read, saved: set[str], origin: dict) -> ModelSource:
    """A LoRA checkpoint as the merged model: each base tensor of model.init_from, replaced where
    the run trained it (routers) and plus its adapter's delta where it has one. Its config is the
    run's without lora: what it reads is a plain model (serving, export and MLflow take it as such)."""
    import dataclasses

    from raymoe.config import LoraConfig
    from raymoe.model.lora import adapter_delta, adapters_of
    from raymoe.tracking import tracking_uri

    base = open_source(cfg.model.init_from, tracking_uri(cfg))
    expected = manifest["state"].get("extra", {}).get("base", {}).get("fingerprint")
    if expected and base.fingerprint() != expected:
        raise ModelSourceError(f"{path}: its adapters were trained on a base with fingerprint {expected}, but "
                               f"{cfg.model.init_from} now has {base.fingerprint()}; the base model changed since training")
    scale = cfg.lora.scale

    def tensor(name: str, experts: range | None) -> torch.Tensor:
        t = read(name, experts) if name in saved else base.tensor(name, experts)
        adapters = adapters_of(name)
        if adapters and adapters[0][0][0] in saved:
            pairs, kind = adapters
            delta = adapter_delta([(read(a, experts), read(b, experts)) for a, b in pairs], kind, scale)
            t = (t.float() + delta).to(t.dtype)
        return t

    merged_cfg = dataclasses.replace(cfg, lora=LoraConfig())
    return ModelSource(path, "checkpoint", merged_cfg, notes=[f"LoRA adapters (rank {cfg.lora.rank}) merged into {cfg.model.init_from}"],
                       _reader=tensor, _names=base.names(), **origin)


def _origin_of(cfg: RunConfig) -> dict:
    """A trained model's Hugging Face origin: that of the model it started from, if any."""
    init = cfg.model.init_from
    if not init or not os.path.isdir(init):
        return {}
    if os.path.exists(os.path.join(init, "config.json")):
        with open(os.path.join(init, "config.json")) as f:
            config = json.load(f)
        return {"hf_architecture": hf.architecture_of(config, init), "hf_config": config}
    source = _read_json(os.path.join(init, SOURCE)) or {}
    return {"hf_architecture": source.get("architecture"), "hf_config": source.get("config")}


_DOWNLOADS: dict[tuple[str, str | None], str] = {}


def resolve_local(source: str, tracking_uri: str | None = None) -> str:
    """A local directory for `source`: itself, or an MLflow URI downloaded once per process."""
    if not source.startswith(("runs:/", "models:/")):
        path = os.path.abspath(os.path.expanduser(source))
        if not os.path.isdir(path):
            raise ModelSourceError(f"{source}: no such directory; MODEL must be {MODEL_SOURCES}")
        return path
    key = (source, tracking_uri)
    if key not in _DOWNLOADS:
        import mlflow

        from raymoe.tracking import process_tracking_uri

        # One progress bar per worker per download clutters a training run's log; our lines say it.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            with process_tracking_uri(tracking_uri):
                _DOWNLOADS[key] = mlflow.artifacts.download_artifacts(artifact_uri=source,
                                                                      dst_path=tempfile.mkdtemp(prefix="raymoe-model-"))
        except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; say what to fix
            hint = ""
            if source.startswith("models:/") and "not found" in str(e):
                hint = " (`make demo` registers raymoe-demo; `raymoe import DIR --register NAME` registers an import)"
            raise ModelSourceError(f"cannot fetch {source} from MLflow ({type(e).__name__}: {str(e)[:200]}); "
                                   f"check the URI and MLFLOW_TRACKING_URI{hint}") from None
    return _DOWNLOADS[key]


def open_source(source: str, tracking_uri: str | None = None) -> ModelSource:
    """Any of MODEL_SOURCES, opened for reading tensor by tensor."""
    return _open_local(resolve_local(source, tracking_uri))


def source_model_section(source: str, tracking_uri: str | None = None) -> dict:
    """The model: section (every key, plain values) of a source: what `model.init_from` fixes."""
    from raymoe.config import ConfigError

    try:
        src = open_source(source, tracking_uri)
    except (ModelSourceError, hf.HFError, ValueError) as e:
        raise ConfigError(f"model.init_from={source}: {e}") from None
    section = to_plain(src.cfg.model)
    section.pop("init_from", None)
    return section


# ----------------------------------------------------------------------------- into a model


def load_weights(model: torch.nn.Module, src: ModelSource, experts: range | None = None) -> None:
    """Copy `src` into `model` tensor by tensor (routed experts: the rows of `experts` only, what an
    expert-parallel rank holds). Names are checked before anything is copied; a tensor of the wrong
    shape stops the load naming it, with the model partly loaded (callers discard it)."""
    from raymoe.parallel.checkpoint import CheckpointError

    from raymoe.model.lora import is_adapter
    from raymoe.parallel.apply import assign_

    own = {k: v for k, v in model.state_dict().items() if not is_adapter(k)}  # adapters are not base weights
    tied = "lm_head.weight" if getattr(model.cfg, "tie_embeddings", False) else None
    have = set(src.names())
    missing = [k for k in own if k not in have and k != tied]
    extra = [k for k in have if k not in own]
    if missing or extra:
        raise CheckpointError(f"{src.path}: does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, target in own.items():
        if name == tied:
            continue
        t = src.tensor(name, experts if is_expert_tensor(name) else None)
        if tuple(t.shape) != tuple(target.shape):
            raise CheckpointError(f"{src.path}: {name} has shape {tuple(t.shape)}, the model needs {tuple(target.shape)}")
        with torch.no_grad():
            assign_(target, t)


def open_model(source: str, *, tracking_uri: str | None = None, device: str = "cpu"):
    """(RunConfig, MoETransformer in eval mode, tokenizer, source) for serving and sampling."""
    from raymoe.model.transformer import MoETransformer

    src = open_source(source, tracking_uri)
    model = MoETransformer(src.cfg.model)
    load_weights(model, src)
    model.to(device).eval()
    return src.cfg, model, src.tokenizer(), src


# ----------------------------------------------------------------------------- import / export


def _dtype(name: str | None) -> torch.dtype | None:
    table = {None: None, "auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ModelSourceError(f"--dtype {name!r} must be one of auto, bf16, fp16, fp32")
    return table[name]


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # The routers' selection biases stay fp32 (transformers keeps them so too): their rounding flips choices.
    if dtype is None or not t.is_floating_point() or name.endswith("expert_bias"):
        return t
    return t.to(dtype)


def expected_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape for this architecture, from a model built on the meta device (no memory)."""
    from raymoe.model.transformer import MoETransformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MoETransformer(model).state_dict().items()}


def import_hf(hf_dir: str, out_dir: str, *, dtype: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              log=print) -> ModelSource:
    """`raymoe import`: a Hugging Face directory -> a raymoe model directory, tensor by tensor."""
    src = open_source(hf_dir)
    if src.kind != "hf":
        raise ModelSourceError(f"{hf_dir}: not a Hugging Face model directory (it is a raymoe {src.kind}); "
                               "raymoe import reads config.json + safetensors")
    for note in src.notes:
        log(f"note: {note}")
    cast = _dtype(dtype)
    names = src.names()
    shapes = expected_shapes(src.cfg.model)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for i, name in enumerate(names):
            t = src.tensor(name)
            if tuple(t.shape) != shapes[name]:
                raise hf.HFError(f"{hf_dir}: {name} (from {src.hf_keys.get(name, name)}) has shape {tuple(t.shape)}, but config.json "
                                 f"implies {shapes[name]}; the weights and config.json do not belong together")
            yield name, _cast(name, t, cast)
            if (i + 1) % 200 == 0 or i + 1 == len(names):
                log(f"  {i + 1}/{len(names)} tensors")

    source = {"kind": "huggingface", "path": os.path.abspath(hf_dir), "architecture": src.hf_architecture,
              "config": src.hf_config, "notes": src.notes}
    write_model_dir(out_dir, src.cfg, tensors(), tokenizer_dir=hf_dir if has_tokenizer(hf_dir) else None,
                    source=source, max_shard_bytes=max_shard_bytes)
    return open_source(out_dir)


def export_hf(source: str, out_dir: str, *, architecture: str | None = None, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, tracking_uri: str | None = None, log=print) -> str:
    """`raymoe export`: any model source -> a Hugging Face directory that from_pretrained loads.
    Returns the architecture written."""
    src = open_source(source, tracking_uri)
    arch = architecture or src.hf_architecture
    config = hf.hf_config_from_model(src.cfg.model, arch, base=src.hf_config)
    arch = config["architectures"][0]
    maps = hf.tensor_maps(src.cfg.model, arch, interleaved=arch in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"))
    cast = _dtype(dtype)
    seen_dtype: list[torch.dtype] = []

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for i, m in enumerate(maps):
            t = _cast(m.name, src.tensor(m.name), cast)
            if not m.name.endswith("expert_bias"):
                seen_dtype.append(t.dtype)
            yield from hf.to_hf_tensors(m, t, src.cfg.model, arch)
            if (i + 1) % 200 == 0 or i + 1 == len(maps):
                log(f"  {i + 1}/{len(maps)} tensors")

    with _Staging(out_dir) as d:
        writer = ShardWriter(d, max_shard_bytes)
        for name, t in tensors():
            writer.add(name, t)
        writer.close()
        names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
        config["dtype"] = names.get(max(set(seen_dtype), key=seen_dtype.count), "float32") if seen_dtype else "float32"
        config.pop("torch_dtype", None)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        copy_tokenizer(src.tokenizer_dir, d)
    return arch


def export_model_dir(source: str, out_dir: str, *, dtype: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     tracking_uri: str | None = None, log=print) -> ModelSource:
    """`raymoe export --format raymoe`: any model source -> a raymoe model directory (a LoRA
    checkpoint: its base with the adapters merged), tensor by tensor."""
    src = open_source(source, tracking_uri)
    cast = _dtype(dtype)
    names = src.names()

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for i, name in enumerate(names):
            yield name, _cast(name, src.tensor(name), cast)
            if (i + 1) % 200 == 0 or i + 1 == len(names):
                log(f"  {i + 1}/{len(names)} tensors")

    origin = {"kind": f"raymoe {src.kind}", "path": src.path, "architecture": src.hf_architecture,
              "config": src.hf_config, "notes": src.notes}
    write_model_dir(out_dir, src.cfg, tensors(), tokenizer_dir=src.tokenizer_dir, source=origin,
                    max_shard_bytes=max_shard_bytes)
    return open_source(out_dir)
