"""Instruction data for supervised fine-tuning: .jsonl examples -> tokens with a loss mask -> packed,
resumable data-parallel batches.

    corpus = prepare_sft(cfg.data, cache_dir, cfg.train.seq_len, tokenizer, log=print)
    it = SFTBatches(corpus.examples("train"), batch_size=8, seq_len=256, rank=rank,
                    world_size=world_size, seed=0, position=saved["position"])
    batch = it.next_batch()  # inputs, targets, loss_mask, positions, segments: [B, S] each

Each .jsonl line is one example: {"messages": [{"role": "system"|"user"|"assistant", "content": str},
...]} rendered with a chat template, or {"prompt": str, "completion": str} tokenized as
[BOS if the tokenizer adds one] + prompt + completion + [EOS]. Other keys of a record or a turn are
ignored. Only assistant / completion tokens carry loss.

What is notable:
- Chat templates render exactly as transformers' `apply_chat_template(tokenize=False)`: the same
  sandboxed Jinja environment (trim_blocks, lstrip_blocks, loopcontrols, its tojson, raise_exception,
  strftime_now) and the tokenizer's named special tokens (bos_token, eos_token, ...) as variables.
  `{% generation %}` blocks render as their body. The template is data.chat_template, else the
  tokenizer's own (chat_template.jinja beside it, else tokenizer_config.json's chat_template).
- Assistant turns are found from the template itself, not from markers it may lack: for assistant
  turn i, render(turns[:i], add_generation_prompt=True) must be a prefix of render(turns[:i+1]),
  and that a prefix of the whole chat. The text between the two carries loss: the reply and what
  the template closes it with; the header does not. A template for which these are not prefixes
  (one that rewrites earlier turns depending on what follows) is refused by name. The spans are
  encoded one by one (`encode_text`) and concatenated, so a BPE merge across a span boundary is
  not made; templates put special tokens or newlines there. Within a loss span, tokens after its
  last EOS id (e.g. the newline after "<|im_end|>") carry no loss: the model learns to stop, not
  what follows the stop.
- Cache as train/data.py's: parquet shards (columns `tokens`, `loss`) with manifest.json
  (`kind: "sft"`) under `<cache_dir>/<fingerprint>/`, built under a temporary name and renamed
  into place; every shard's sha256 is checked when read. The fingerprint covers the file listing,
  the tokenizer, the template text, seq_len (examples longer than seq_len + 1 are refused),
  val_fraction, max_bytes and skip_bad_examples.
- Bad examples (not JSON, wrong fields or types, unknown roles, no assistant turn, too long) stop
  preparation with "<file>:<line>: <what is wrong>; <what to change>", or with
  data.skip_bad_examples are counted per reason, logged in one line and kept in the manifest.
- Packing: examples (L tokens = L-1 input/target slots) are placed into rows of seq_len slots by
  first fit over the most recent open rows, in a seeded order, once; positions restart at 0 and
  `segments` numbers the examples of a row, so attention can stay within an example. No example
  straddles rows. Row order per epoch and `position` (rows consumed by ALL ranks) work as
  data.py's BatchIterator, so a resumed run continues the same global sequence at any world size.

Demo data (jobs/data/): finetune-demo.jsonl is 64 short chats that ask for a small Python function;
chat_template.jinja is the ChatML-like template it is written for (byte tokenizer: every rendered
example is at most 256 bytes, so it fits the demo model's seq_len 256).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raymoe.config import DataConfig
from raymoe.tokenizer import Tokenizer, TokenizerError
from raymoe.train.data import (
    SPLITS,
    _TOKEN_TYPES,
    DataError,
    _file_sha256,
    _is_val,
    _iter_lines,
    Corpus,
    EpochOrder,
    _list_source,
    build_once,
    _open_binary,
    _Source,
    get_tokenizer,
)

# Bumped whenever the shard layout, the rendering or the masking changes, so old caches are not reused.
_SFT_FORMAT = 1
ROLES = ("system", "user", "assistant")
_OPEN_ROWS = 64  # packing looks for room in this many of the newest rows; older ones are closed
_PACK_SALT = 0x7061636B  # "pack": the packing order's random stream differs from the epochs'
_SKIP_HINT = " (or set data.skip_bad_examples=true to skip and count such examples)"


# ----------------------------------------------------------------------------- chat templates


def _jinja_environment():
    """The environment transformers' `_compile_jinja_template` builds, without its assistant tracker."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # transformers marks assistant text with {% generation %}; here the block renders as its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' (and so ours) does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        # As transformers: `dict(...)` in a template, without the dict type's attributes.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # As transformers: namespaces refuse underscore attributes (a way out of the sandbox).
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


class ChatTemplate:
    """A compiled chat template and the special-token variables it is rendered with."""

    def __init__(self, text: str, name: str, special_tokens: dict[str, str]):
        import jinja2

        self.text, self.name = text, name
        self.special_tokens = dict(special_tokens)
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        try:
            self._template = _jinja_environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"chat template {name}: line {e.lineno}: {e.message}; fix the template or set "
                            "data.chat_template to another .jinja file") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """What transformers' apply_chat_template(messages, tokenize=False, add_generation_prompt=...) gives."""
        return self._template.render(messages=list(messages), tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)


def load_chat_template(cfg: DataConfig, tok: Tokenizer) -> Optional[ChatTemplate]:
    """data.chat_template if set, else the tokenizer's own template, else None."""
    if cfg.chat_template is not None:
        path = os.path.expanduser(cfg.chat_template)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise DataError(f"data.chat_template={cfg.chat_template!r} cannot be read ({e.strerror}); "
                            "point it at a Jinja chat template file") from None
        return ChatTemplate(text, path, tok.special_tokens)
    try:
        text = tok.chat_template()
    except TokenizerError as e:
        raise DataError(str(e)) from None
    return None if text is None else ChatTemplate(text, f"of tokenizer {getattr(tok, 'dir', tok.name)}", tok.special_tokens)


# ----------------------------------------------------------------------------- examples


class _BadExample(Exception):
    """One example is unusable: `reason` is its skip-count key, `message` says what to change."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _parse_record(line: bytes) -> dict:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise _BadExample("invalid_json", f"line is not valid JSON ({msg}); each .jsonl line must be one JSON object") from None
    if not isinstance(record, dict):
        raise _BadExample("not_an_object", f"line is a JSON {type(record).__name__}, not an object; each line must be "
                                           "an object with 'messages', or 'prompt' and 'completion'")
    has_chat, has_pair = "messages" in record, ("prompt" in record or "completion" in record)
    if has_chat == has_pair:
        what = "both 'messages' and 'prompt'/'completion'" if has_chat else \
            f"neither 'messages' nor 'prompt'/'completion' (it has: {', '.join(sorted(record)) or 'none'})"
        raise _BadExample("unknown_format", f"record has {what}; give each line exactly one of the two forms")
    return record


def _check_turns(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise _BadExample("wrong_type", f"'messages' is a {type(messages).__name__}, not a list of turns; "
                                        "make it a list of {\"role\": ..., \"content\": ...} objects")
    turns = []
    for k, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise _BadExample("wrong_type", f"turn {k} is a {type(turn).__name__}, not an object; "
                                            "make it {\"role\": ..., \"content\": ...}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise _BadExample("unknown_role", f"turn {k} has role {role!r}; roles must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _BadExample("wrong_type", f"turn {k} ({role}) has content of type {type(content).__name__}, "
                                            "not a string; make 'content' a string")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise _BadExample("no_assistant_turn", "the example has no assistant turn, so nothing to learn; "
                                               "add the assistant's reply or drop the example")
    return turns


def _as_ids(ids) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def _encode_pieces(pieces: list[tuple[str, bool]], tok: Tokenizer, stop_at_eos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Text pieces (text, carries loss) -> (ids, loss). stop_at_eos: a loss piece's loss ends at its
    last EOS id (what a chat template writes after the stop is not the model's to generate)."""
    eos_ids = np.array(sorted(tok.eos_ids), dtype=np.int64)
    ids, loss = [], []
    for text, carries in pieces:
        piece = _as_ids(tok.encode_text(text))
        mask = np.full(piece.size, carries)
        if carries and stop_at_eos:
            stops = np.flatnonzero(np.isin(piece, eos_ids))
            if stops.size:
                mask[stops[-1] + 1:] = False
        ids.append(piece)
        loss.append(mask)
    return np.concatenate(ids), np.concatenate(loss)


def _chat_pieces(turns: list[dict], template: ChatTemplate, where: str) -> list[tuple[str, bool]]:
    """The rendered chat cut into alternating (no-loss, loss) text pieces; see the module docstring."""
    import jinja2

    try:
        full = template.render(turns)
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] == "assistant":
                spans.append((i, template.render(turns[:i], add_generation_prompt=True), template.render(turns[: i + 1])))
    except jinja2.TemplateError as e:
        raise _BadExample("template_error", f"chat template {template.name} failed on this example "
                                            f"({type(e).__name__}: {e}); fix the example or the template") from None
    pieces, done = [], 0
    for i, prompt, reply in spans:
        if not (reply.startswith(prompt) and full.startswith(reply) and len(prompt) >= done):
            raise DataError(
                f"{where}: chat template {template.name} is not prefix-stable: rendering turns[:{i}] with the generation "
                f"prompt and then turns[:{i + 1}] does not extend the rendering of the whole chat, so assistant "
                f"turn {i} cannot be located; use a template that renders earlier turns the same whatever follows "
                "(set data.chat_template)"
            )
        pieces += [(full[done:len(prompt)], False), (full[len(prompt):len(reply)], True)]
        done = len(reply)
    pieces.append((full[done:], False))
    return pieces


def _encode_example(record: dict, tok: Tokenizer, template: Optional[ChatTemplate], seq_len: int,
                    where: str) -> tuple[np.ndarray, np.ndarray]:
    if "messages" in record:
        turns = _check_turns(record["messages"])
        if template is None:
            raise DataError(f"{where}: a 'messages' example needs a chat template, but data.chat_template is not set "
                            f"and the tokenizer ({tok.name}) has none; set data.chat_template to a .jinja file")
        ids, loss = _encode_pieces(_chat_pieces(turns, template, where), tok, stop_at_eos=True)
    else:
        for key in ("prompt", "completion"):
            if key not in record:
                raise _BadExample("unknown_format", f"record has no {key!r}; a prompt/completion example needs both strings")
            if not isinstance(record[key], str):
                raise _BadExample("wrong_type", f"{key!r} is a {type(record[key]).__name__}, not a string; make it a string")
        if tok.eos_id is None:
            raise DataError(f"the tokenizer ({tok.name}) has no eos_token, which ends every completion; "
                            "set eos_token in its tokenizer_config.json")
        head = [tok.bos_id] if tok.add_bos else []
        ids, loss = _encode_pieces([(record["prompt"], False), (record["completion"], True)], tok, stop_at_eos=False)
        ids = np.concatenate([_as_ids(head), ids, [tok.eos_id]])
        loss = np.concatenate([np.zeros(len(head), bool), loss, [True]])
    if ids.size > seq_len + 1:
        raise _BadExample("too_long", f"the example is {ids.size} tokens, more than train.seq_len+1={seq_len + 1} "
                                      "(one training sequence); shorten it or raise train.seq_len")
    if not loss[1:].any():  # the first token is never a target
        raise _BadExample("no_loss_tokens", "no token of the example carries loss, so nothing to learn; "
                                            "give it a non-empty completion / assistant reply")
    return ids, loss


# ----------------------------------------------------------------------------- shards


class _ExampleWriter:
    """Buffers the examples of one split and writes them as parquet shards of ~shard_tokens tokens."""

    def __init__(self, split: str, out_dir: str, shard_tokens: int, token_type: str):
        self.split, self.out_dir, self.shard_tokens = split, out_dir, shard_tokens
        self.dtype, self.arrow_type = _TOKEN_TYPES[token_type]
        self.schema = pa.schema([("tokens", pa.list_(self.arrow_type)), ("loss", pa.list_(pa.bool_()))])
        self.buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.num_examples = self.num_tokens = self.num_loss_tokens = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray, loss: np.ndarray) -> None:
        self.buffer.append((tokens.astype(self.dtype), loss))
        self.buffered += tokens.size
        self.num_examples += 1
        self.num_tokens += tokens.size
        self.num_loss_tokens += int(loss[1:].sum())  # targets that carry loss
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        offsets = pa.array(np.concatenate([[0], np.cumsum([t.size for t, _ in self.buffer])]).astype(np.int32))
        tokens = pa.array(np.concatenate([t for t, _ in self.buffer]), type=self.arrow_type)
        loss = pa.array(np.concatenate([m for _, m in self.buffer]), type=pa.bool_())
        table = pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, tokens), pa.ListArray.from_arrays(offsets, loss)],
                                     schema=self.schema)
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        path = os.path.join(self.out_dir, name)
        pq.write_table(table, path)
        self.shards.append({"file": name, "sha256": _file_sha256(path), "num_examples": len(self.buffer),
                            "num_tokens": self.buffered})
        self.buffer, self.buffered = [], 0

    def summary(self) -> dict[str, Any]:
        return {"num_examples": self.num_examples, "num_tokens": self.num_tokens,
                "num_loss_tokens": self.num_loss_tokens, "shards": self.shards}


def _read_examples(src: _Source, cfg: DataConfig, tok: Tokenizer, template: Optional[ChatTemplate], seq_len: int,
                   skipped: Counter, first_skipped: dict[str, str]):
    """Yield (key, tokens, loss) per usable example in listing order, up to data.max_bytes of lines."""
    total = 0
    for f in src.files:
        with _open_binary(src, f) as stream:
            for lineno, line in enumerate(_iter_lines(stream), start=1):
                if not line.strip():
                    continue
                total += len(line) + 1
                if cfg.max_bytes is not None and total > cfg.max_bytes:
                    return  # whole examples only: the one crossing the cap is not read
                where = f"{f.path}:{lineno}"
                try:
                    ids, loss = _encode_example(_parse_record(line), tok, template, seq_len, where)
                except _BadExample as e:
                    if not cfg.skip_bad_examples:
                        raise DataError(f"{where}: {e.message}{_SKIP_HINT}") from None
                    skipped[e.reason] += 1
                    first_skipped.setdefault(e.reason, f"{where}: {e.message}")
                    continue
                yield f"{f.rel}:{lineno}", ids, loss


def _build_into(out_dir: str, src: _Source, cfg: DataConfig, tok: Tokenizer, template: Optional[ChatTemplate],
                seq_len: int, log: Callable[[str], None]) -> dict[str, Any]:
    token_type = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    writers = {s: _ExampleWriter(s, out_dir, cfg.shard_tokens, token_type) for s in SPLITS}
    skipped: Counter = Counter()
    first_skipped: dict[str, str] = {}
    # The newest example is held back one step so that, at the end, it can go to whichever split
    # would otherwise be empty (both splits need at least one example).
    held = None
    num_examples = 0
    for key, ids, loss in _read_examples(src, cfg, tok, template, seq_len, skipped, first_skipped):
        if held is not None:
            writers["val" if _is_val(held[0], cfg.val_fraction) else "train"].add(*held[1:])
        held = (key, ids, loss)
        num_examples += 1
    if skipped:
        log(f"skipped {sum(skipped.values())} bad examples ("
            + ", ".join(f"{r}: {n}" for r, n in sorted(skipped.items())) + "); first: "
            + "; ".join(first_skipped[r] for r in sorted(first_skipped)))
    if num_examples < 2:
        raise DataError(
            f"data.source={src.description!r} holds {num_examples} usable example(s)"
            + (f" ({sum(skipped.values())} skipped as bad)" if skipped else "")
            + "; sft needs at least two (one for validation): add examples or fix the skipped ones"
        )
    key, ids, loss = held
    if writers["val"].num_examples == 0:
        writers["val"].add(ids, loss)
    elif writers["train"].num_examples == 0:
        writers["train"].add(ids, loss)
    else:
        writers["val" if _is_val(key, cfg.val_fraction) else "train"].add(ids, loss)
    for w in writers.values():
        w.flush()
    return {
        "kind": "sft",
        "format": _SFT_FORMAT,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "token_type": token_type,
        "template": None if template is None else template.name,
        "template_sha256": None if template is None else template.sha256,
        "source": src.description,
        "num_files": len(src.files),
        "seq_len": seq_len,
        "val_fraction": cfg.val_fraction,
        "max_bytes": cfg.max_bytes,
        "skipped": dict(sorted(skipped.items())),
        "first_skipped": first_skipped,
        "splits": {s: writers[s].summary() for s in SPLITS},
    }


# ----------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class SFTCorpus(Corpus):
    """Tokenized SFT examples on disk: parquet shards (tokens, loss per example) plus manifest.json."""

    def num_examples(self, split: str) -> int:
        return int(self._split(split)["num_examples"])

    def examples(self, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, loss) per example of a split, in file order; every shard checked against its sha256."""
        dtype = _TOKEN_TYPES[self.manifest["token_type"]][0]
        out = []
        for shard in self._split(split)["shards"]:
            table = self.read_shard(shard)
            tokens, loss = (table.column(c).combine_chunks() for c in ("tokens", "loss"))
            offsets = tokens.offsets.to_numpy()
            cuts = offsets[1:-1] - offsets[0]
            values = tokens.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            masks = loss.flatten().to_numpy(zero_copy_only=False).astype(bool, copy=False)
            out += list(zip(np.split(values, cuts), np.split(masks, cuts)))
        return out


def _load_manifest(corpus_dir: str) -> dict[str, Any]:
    path = os.path.join(corpus_dir, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable cache manifest ({e}); delete {corpus_dir} to re-tokenize") from None
    if manifest.get("kind") != "sft":
        raise DataError(f"{path}: not an SFT cache (a pre-training corpus?); point at the directory prepare_sft returned")
    return manifest


def open_sft(corpus_dir: str) -> SFTCorpus:
    """SFT examples that `prepare_sft` already wrote (what training workers open)."""
    return SFTCorpus(dir=corpus_dir, manifest=_load_manifest(corpus_dir), reused=True)


def _list_jsonl(cfg: DataConfig) -> _Source:
    if cfg.source is None:
        raise DataError("data.format=sft needs data.source: a .jsonl file, a directory of them, or a URI")
    src = _list_source(cfg.source)
    others = [f.path for f in src.files if not f.rel.endswith(".jsonl")]
    if others:
        raise DataError(f"data.source={cfg.source!r} holds {others[0]}, but data.format=sft reads .jsonl files only; "
                        "convert it or move it out of data.source")
    return src


def _fingerprint(src: _Source, cfg: DataConfig, tok: Tokenizer, template: Optional[ChatTemplate], seq_len: int) -> str:
    blob = json.dumps(
        {
            "kind": "sft",
            "format": _SFT_FORMAT,
            "source": src.description,
            "files": [(f.rel, f.size, f.mtime_ns) for f in src.files],
            "tokenizer": tok.name,
            "template_sha256": None if template is None else template.sha256,
            "seq_len": seq_len,
            "val_fraction": cfg.val_fraction,
            "max_bytes": cfg.max_bytes,
            # A strict run must see the bad examples a skipping run left out, so they do not share a cache.
            "skip_bad_examples": cfg.skip_bad_examples,
        },
        sort_keys=True,
    ).encode()
    return "sft-" + hashlib.sha256(blob).hexdigest()[:20]


def prepare_sft(cfg: DataConfig, cache_dir: str, seq_len: int, tokenizer: Optional[Tokenizer] = None,
                log: Optional[Callable[[str], None]] = None) -> SFTCorpus:
    """Tokenize and mask the .jsonl examples of cfg.source into shards under cache_dir/<fingerprint>/,
    or reuse them if present. `tokenizer`: what the run uses (default: data.tokenizer itself)."""
    log = log or (lambda msg: None)
    tok = tokenizer or get_tokenizer(cfg.tokenizer)
    src = _list_jsonl(cfg)
    template = load_chat_template(cfg, tok)
    final_dir = os.path.join(os.path.abspath(cache_dir), _fingerprint(src, cfg, tok, template, seq_len))
    if os.path.isdir(final_dir):
        manifest = _load_manifest(final_dir)
        log(f"reusing SFT examples {final_dir} ({_summary(manifest)})")
        return SFTCorpus(dir=final_dir, manifest=manifest, reused=True)
    t0 = time.perf_counter()
    manifest, reused = build_once(cache_dir, final_dir, lambda d: _build_into(d, src, cfg, tok, template, seq_len, log))
    log(f"tokenized SFT examples: {_summary(manifest)} in {time.perf_counter() - t0:.1f}s -> {final_dir}")
    return SFTCorpus(dir=final_dir, manifest=manifest, reused=reused)


def _summary(manifest: dict[str, Any]) -> str:
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    skipped = sum(manifest["skipped"].values())
    return (f"{tr['num_examples'] + va['num_examples']} examples, {tr['num_tokens'] + va['num_tokens']} tokens, "
            f"{tr['num_loss_tokens'] + va['num_loss_tokens']} with loss (val {va['num_examples']} examples)"
            + (f", {skipped} skipped" if skipped else ""))


# ----------------------------------------------------------------------------- batches


@dataclass
class SFTBatch:
    """One rank's batch; every tensor is [B, S]."""

    inputs: torch.Tensor  # long
    targets: torch.Tensor  # long: inputs shifted by one within each example; pad_id on padding
    loss_mask: torch.Tensor  # bool: targets[b, s] is a completion / assistant token of the same example
    positions: torch.Tensor  # long: position within its example, from 0 for every example; 0 on padding
    segments: torch.Tensor  # long: index of the example within its row (0, 1, ...); -1 on padding

    def to(self, device, non_blocking: bool = False) -> "SFTBatch":
        return SFTBatch(*(t.to(device, non_blocking=non_blocking) for t in
                          (self.inputs, self.targets, self.loss_mask, self.positions, self.segments)))


def _pack_rows(num_slots: np.ndarray, seq_len: int, order: np.ndarray, packing: bool) -> list[list[int]]:
    """Rows of example indices. An example of L tokens takes L-1 slots (its input/target pairs).
    Packing: each example, in `order`, goes into the first of the newest _OPEN_ROWS rows with room,
    else starts a row. One pass, so a million examples pack in seconds."""
    assert (num_slots >= 1).all() and (num_slots <= seq_len).all()
    if not packing:
        return [[int(i)] for i in order]
    rows: list[list[int]] = []
    open_rows: list[int] = []  # indices into rows, oldest first
    free: list[int] = []  # free slots of each open row
    for i in order:
        n = int(num_slots[i])
        k = next((k for k, f in enumerate(free) if f >= n), None)
        if k is None:
            rows.append([])
            open_rows.append(len(rows) - 1)
            free.append(seq_len)
            k = len(free) - 1
        rows[open_rows[k]].append(int(i))
        free[k] -= n
        if free[k] == 0:
            del open_rows[k], free[k]
        elif len(free) > _OPEN_ROWS:
            del open_rows[0], free[0]
    return rows


def _rows_batch(examples, rows: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> SFTBatch:
    b = len(rows)
    inputs = np.full((b, seq_len), pad_id, np.int64)
    targets = np.full((b, seq_len), pad_id, np.int64)
    loss_mask = np.zeros((b, seq_len), bool)
    positions = np.zeros((b, seq_len), np.int64)
    segments = np.full((b, seq_len), -1, np.int64)
    for r, row in enumerate(rows):
        s = 0
        for seg, i in enumerate(row):
            tokens, loss = examples[i]
            n = len(tokens) - 1
            inputs[r, s:s + n] = tokens[:-1]
            targets[r, s:s + n] = tokens[1:]
            loss_mask[r, s:s + n] = loss[1:]
            positions[r, s:s + n] = np.arange(n)
            segments[r, s:s + n] = seg
            s += n
    return SFTBatch(*(torch.from_numpy(a) for a in (inputs, targets, loss_mask, positions, segments)))


def _slot_counts(examples, seq_len: int) -> np.ndarray:
    """Input/target slots per example (L-1 of L tokens), checked to fit a row."""
    slots = np.fromiter((len(t) - 1 for t, _ in examples), dtype=np.int64, count=len(examples))
    if slots.size and slots.max() > seq_len:
        raise DataError(f"an example is {slots.max() + 1} tokens but train.seq_len={seq_len} holds at most "
                        f"{seq_len + 1}; prepare the examples with this train.seq_len")
    return slots


class SFTBatches:
    """Seeded, resumable batches of packed (or padded) example rows; `position` counts rows consumed by all ranks."""

    def __init__(self, examples: Sequence[tuple[np.ndarray, np.ndarray]], *, batch_size: int, seq_len: int, rank: int,
                 world_size: int, seed: int, position: int = 0, packing: bool = True, pad_id: int = 0):
        assert 0 <= rank < world_size, f"rank={rank} outside world_size={world_size}"
        assert batch_size > 0 and seq_len > 0 and position >= 0
        self.examples = examples
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.position, self.pad_id = seed, position, pad_id
        slots = _slot_counts(examples, seq_len)
        # Rows are fixed here, whatever the world size, so `position` names the same rows on resume.
        order = np.random.default_rng([_PACK_SALT, seed]).permutation(len(examples))
        self.rows = _pack_rows(slots, seq_len, order, packing)
        self.num_rows = len(self.rows)
        need = batch_size * world_size
        if self.num_rows < need:
            raise DataError(
                f"the training split ({len(examples)} examples) makes {self.num_rows} rows of train.seq_len={seq_len}"
                f"{' packed' if packing else ''}, but one step needs train.batch_size*workers={batch_size}*{world_size}="
                f"{need} rows; add examples or lower train.batch_size"
                + (" (or set data.packing=false: one example a row)" if packing else "")
            )
        num_slots = self.num_rows * seq_len
        self.padding_fraction = 1.0 - float(slots.sum()) / num_slots
        self.loss_fraction = sum(int(loss[1:].sum()) for _, loss in examples) / num_slots
        self._order = EpochOrder(self.num_rows, seed)

    def row_indices(self) -> np.ndarray:
        """Which rows this rank's next batch holds."""
        return self._order.indices(self.position, self.rank, self.batch_size)

    def next_batch(self) -> SFTBatch:
        batch = _rows_batch(self.examples, [self.rows[i] for i in self.row_indices()], self.seq_len, self.pad_id)
        self.position += self.batch_size * self.world_size
        return batch

    def state(self) -> dict[str, int]:
        return {"position": self.position, "epoch": self.position // self.num_rows}


def sft_eval_batches(examples: Sequence[tuple[np.ndarray, np.ndarray]], batch_size: int, seq_len: int,
                     num_batches: int, rank: int, world_size: int, packing: bool = True,
                     pad_id: int = 0) -> list[SFTBatch]:
    """The same validation batches at every call: rows packed in file order, striped over ranks.

    Batch i of rank r holds rows (i*world_size + r)*batch_size + j; a split with fewer rows wraps
    around, so a small validation set is reused rather than refused.
    """
    assert 0 <= rank < world_size
    slots = _slot_counts(examples, seq_len)
    if slots.size == 0:
        raise DataError("the validation split holds no examples; raise data.val_fraction or add examples")
    rows = _pack_rows(slots, seq_len, np.arange(len(examples)), packing)
    out = []
    for i in range(num_batches):
        idx = ((i * world_size + rank) * batch_size + np.arange(batch_size)) % len(rows)
        out.append(_rows_batch(examples, [rows[j] for j in idx], seq_len, pad_id))
    return out
