"""Corpus -> tokenized parquet shards -> deterministic, resumable data-parallel batches.

    corpus = prepare_corpus(cfg.data, cfg.data_cache_dir, cfg.train.seq_len, log=print)
    it = BatchIterator(corpus.tokens("train"), batch_size=8, seq_len=128,
                       rank=rank, world_size=world_size, seed=0, position=saved["position"])
    inputs, targets = it.next_batch()

What is notable:
- Tokenization happens once. Shards live under `<cache_dir>/<fingerprint>/`, where the
  fingerprint hashes the source listing (path, size, mtime_ns of every file) and every setting
  that changes the tokens, so unchanged data is reused without reading it. The directory is built
  under a temporary name and renamed into place: a crash never leaves a cache that looks valid,
  and of two concurrent writers the loser of the rename simply uses the winner's shards.
- Batch order is a function of one number, `position` = windows consumed by ALL ranks together.
  Rank r of a step takes windows [position + r*B, position + (r+1)*B) of the seeded per-epoch
  permutation, so a job resumed at a different world size continues the same global sequence.
- Bad input (missing path, malformed .jsonl, wrong field, too little data) raises one `DataError`
  whose message says what to change.
- A .txt file is decoded as UTF-8. A few bytes that are not (a stray Latin-1 character) become
  U+FFFD, counted per file in the manifest, and every run that uses the shards warns with the
  count, reused or not; a file more than 1% of whose bytes are not UTF-8 is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sysconfig
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from raymoe.config import DataConfig
from raymoe.tokenizer import ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer  # noqa: F401 - re-exported

SPLITS = ("train", "val")
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Bumped whenever the shard layout or the document reading changes, so old caches are not reused.
_CACHE_FORMAT = 1
# Token ids are stored as uint16 while the vocabulary fits (bytes, Mixtral, OLMoE), else uint32.
_TOKEN_TYPES = {"uint16": (np.uint16, pa.uint16()), "uint32": (np.uint32, pa.uint32())}
# More than this share of a .txt file's bytes not being UTF-8 means it is binary or in another
# encoding, not UTF-8 text with a few stray bytes: refused rather than trained on as U+FFFDs.
MAX_UNDECODABLE_FRACTION = 0.01
# What surrogateescape decodes each undecodable byte to (valid UTF-8 never decodes to these).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_DOCS_PER_BATCH = 256  # documents per encode_batch call: enough to keep every core busy
# Directories of the stdlib that are not representative library code (or not stdlib at all).
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class DataError(ValueError):
    """The corpus or the data settings are unusable; the message says what to change."""


# ----------------------------------------------------------------------------- tokenizers


def get_tokenizer(name: Optional[str]) -> Tokenizer:
    """data.tokenizer -> a tokenizer (null = bytes; runs with model.init_from use tokenizer_for)."""
    try:
        return load_tokenizer(name or "byte")
    except TokenizerError as e:
        raise DataError(str(e)) from None


# ----------------------------------------------------------------------------- source listing


@dataclass(frozen=True)
class _SourceFile:
    rel: str  # path relative to the source root; names documents and enters the fingerprint
    path: str  # what open/fs.open_* take
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Source:
    description: str  # recorded in the manifest and used in messages
    files: tuple[_SourceFile, ...]
    fs: Optional[pafs.FileSystem]  # None = local files opened with plain `open`


def _suffix_ok(name: str) -> bool:
    return name.endswith(SUPPORTED_SUFFIXES)


def _no_files_error(source: str) -> DataError:
    return DataError(
        f"data.source={source!r} contains no .txt, .jsonl or .parquet files; "
        "point data.source at a file or directory of them"
    )


def _list_stdlib() -> _Source:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                files.append(_SourceFile(os.path.relpath(path, root), path, st.st_size, st.st_mtime_ns))
    files.sort(key=lambda f: f.rel)
    assert files, f"no .py files under the stdlib at {root}"
    return _Source(f"python-stdlib:{root}", tuple(files), None)


def _list_local(source: str) -> _Source:
    root = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(root):
        raise DataError(
            f"data.source={source!r} does not exist; point it at a .txt/.jsonl/.parquet file, "
            "a directory of them, or a URI (null = the Python stdlib)"
        )
    if os.path.isfile(root):
        if not _suffix_ok(root):
            raise DataError(f"data.source={source!r} is not a .txt, .jsonl or .parquet file; convert it or point at one")
        st = os.stat(root)
        return _Source(root, (_SourceFile(os.path.basename(root), root, st.st_size, st.st_mtime_ns),), None)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden directories (.git, .cache, ...) are tooling, not corpus.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if _suffix_ok(name) and not name.startswith("."):
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                files.append(_SourceFile(os.path.relpath(path, root), path, st.st_size, st.st_mtime_ns))
    if not files:
        raise _no_files_error(source)
    files.sort(key=lambda f: f.rel)
    return _Source(root, tuple(files), None)


def _list_uri(source: str) -> _Source:
    try:
        fs, root = pafs.FileSystem.from_uri(source)
    except (pa.ArrowException, ValueError, OSError) as e:
        raise DataError(f"data.source={source!r} cannot be opened as a URI ({e}); fix the URI or use a local path") from None
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.source={source!r} does not exist; point it at a .txt/.jsonl/.parquet file or a directory of them")
    if info.type == pafs.FileType.File:
        if not _suffix_ok(root):
            raise DataError(f"data.source={source!r} is not a .txt, .jsonl or .parquet file; convert it or point at one")
        infos = [info]
        base = os.path.dirname(root.rstrip("/"))
    else:
        infos = [
            i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File and _suffix_ok(i.base_name)
        ]
        base = root.rstrip("/")
    if not infos:
        raise _no_files_error(source)
    files = [
        _SourceFile(
            i.path[len(base):].lstrip("/") if base else i.path,
            i.path,
            int(i.size or 0),
            # Object stores may not report mtimes; size + path then stand for the content.
            int(i.mtime_ns or 0),
        )
        for i in infos
    ]
    files.sort(key=lambda f: f.rel)
    return _Source(source, tuple(files), fs)


def _list_source(source: Optional[str]) -> _Source:
    if source is None:
        return _list_stdlib()
    if "://" in source:
        return _list_uri(source)
    return _list_local(source)


def _fingerprint(src: _Source, cfg: DataConfig, tok: Tokenizer) -> str:
    blob = json.dumps(
        {
            "format": _CACHE_FORMAT,
            "source": src.description,
            "files": [(f.rel, f.size, f.mtime_ns) for f in src.files],
            "tokenizer": tok.name,
            "val_fraction": cfg.val_fraction,
            "max_bytes": cfg.max_bytes,
            "text_field": cfg.text_field,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


# ----------------------------------------------------------------------------- document reading


def _open_binary(src: _Source, f: _SourceFile):
    return open(f.path, "rb") if src.fs is None else src.fs.open_input_stream(f.path)


def _iter_lines(stream) -> Iterator[bytes]:
    # pyarrow input streams have no readline, so split fixed-size chunks ourselves.
    rest = b""
    while True:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _decode_text(f: _SourceFile, data: bytes, undecodable: dict[str, dict[str, int]]) -> str:
    """A .txt file's text. Bytes that are not UTF-8 become U+FFFD (errors="replace", the tokens
    earlier versions cached) and are counted into `undecodable`: path -> {"bytes", "size"}."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    bad = len(_ESCAPED_BYTE.findall(data.decode("utf-8", errors="surrogateescape")))
    if bad > MAX_UNDECODABLE_FRACTION * len(data):
        raise DataError(
            f"{f.path}: {bad} of its {len(data)} bytes ({bad / len(data):.1%}) are not valid UTF-8, more than "
            f"the {MAX_UNDECODABLE_FRACTION:.0%} tolerated: it is binary or in another encoding; convert it to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8) or move it out of data.source"
        )
    undecodable[f.path] = {"bytes": bad, "size": len(data)}
    return data.decode("utf-8", errors="replace")


def _read_documents(src: _Source, text_field: str, undecodable: dict[str, dict[str, int]]) -> Iterator[tuple[str, str]]:
    """Yield (document key, text) in listing order; the key is stable and names the document.
    Each .txt file holding bytes that are not UTF-8 is entered in `undecodable` (_decode_text)."""
    for f in src.files:
        if f.rel.endswith(".jsonl"):
            with _open_binary(src, f) as stream:
                for lineno, line in enumerate(_iter_lines(stream), start=1):
                    if not line.strip():
                        continue
                    where = f"{f.path}:{lineno}"
                    try:
                        record = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                        raise DataError(f"{where}: line is not valid JSON ({msg}); each .jsonl line must be one JSON object") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{where}: line is a JSON {type(record).__name__}, not an object; each .jsonl line must be an object with a {text_field!r} field")
                    if text_field not in record:
                        raise DataError(
                            f"{where}: record has no field {text_field!r} (it has: {', '.join(sorted(record)) or 'none'}); "
                            "set data.text_field to the field holding the text"
                        )
                    text = record[text_field]
                    if text is None:
                        continue
                    if not isinstance(text, str):
                        raise DataError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string; set data.text_field to a text field")
                    yield f"{f.rel}:{lineno}", text
        elif f.rel.endswith(".parquet"):
            handle = f.path if src.fs is None else src.fs.open_input_file(f.path)
            try:
                yield from _read_parquet_column(f, handle, text_field)
            finally:
                if not isinstance(handle, str):
                    handle.close()
        else:  # .txt and stdlib .py: the whole file is one document
            with _open_binary(src, f) as stream:
                yield f.rel, _decode_text(f, stream.read(), undecodable)


def _read_parquet_column(f: _SourceFile, handle, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        pfile = pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{f.path}: not a readable parquet file ({e}); fix or remove it") from None
    schema = pfile.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{f.path}: no column {text_field!r} (columns: {', '.join(schema.names)}); set data.text_field to the column holding the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{f.path}: column {text_field!r} has type {kind}, not string; set data.text_field to a text column")
    row = 0
    for batch in pfile.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{f.rel}:{row}", text
            row += 1


def _capped_documents(
    src: _Source, text_field: str, max_bytes: Optional[int], undecodable: dict[str, dict[str, int]]
) -> Iterator[tuple[str, str]]:
    """Non-empty documents, stopping (deterministically) once max_bytes of UTF-8 have been read."""
    total = 0
    for key, text in _read_documents(src, text_field, undecodable):
        if not text:
            continue
        size = len(text.encode("utf-8")) if max_bytes is not None else 0
        if max_bytes is not None and total + size >= max_bytes:
            # Cut the last document at a character boundary so its tail decodes cleanly.
            text = text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
            if text:
                yield key, text
            return
        total += size
        yield key, text


def _is_val(key: str, val_fraction: float) -> bool:
    # A hash of the document's name, not its position, so adding files moves few documents.
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h / 2.0**64 < val_fraction


# ----------------------------------------------------------------------------- shards


class _SplitWriter:
    """Buffers documents of one split and writes them as parquet shards of ~shard_tokens tokens."""

    def __init__(self, split: str, out_dir: str, shard_tokens: int, token_type: str = "uint16"):
        self.split, self.out_dir, self.shard_tokens = split, out_dir, shard_tokens
        self.dtype, self.arrow_type = _TOKEN_TYPES[token_type]
        self.schema = pa.schema([("tokens", pa.list_(self.arrow_type))])
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.num_docs = 0
        self.num_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.stream_hash = hashlib.sha256()

    def add(self, tokens: np.ndarray) -> None:
        assert tokens.dtype == self.dtype and tokens.size > 0
        self.buffer.append(tokens)
        self.buffered += tokens.size
        self.num_docs += 1
        self.num_tokens += tokens.size
        self.stream_hash.update(tokens.astype(np.dtype(self.dtype).newbyteorder("<"), copy=False).tobytes())
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        lengths = np.fromiter((t.size for t in self.buffer), dtype=np.int32, count=len(self.buffer))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = pa.array(np.concatenate(self.buffer), type=self.arrow_type)
        table = pa.Table.from_arrays([pa.ListArray.from_arrays(pa.array(offsets), values)], schema=self.schema)
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        path = os.path.join(self.out_dir, name)
        pq.write_table(table, path)
        self.shards.append({"file": name, "sha256": _file_sha256(path), "num_tokens": int(offsets[-1])})
        self.buffer, self.buffered = [], 0

    def summary(self) -> dict[str, Any]:
        return {
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "shards": self.shards,
            "token_sha256": self.stream_hash.hexdigest(),
        }


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _batched(docs: Iterator[tuple[str, str]], n: int) -> Iterator[list[tuple[str, str]]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenize_into(out_dir: str, src: _Source, cfg: DataConfig, tok: Tokenizer, log: Callable[[str], None]) -> dict[str, Any]:
    token_type = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    writers = {s: _SplitWriter(s, out_dir, cfg.shard_tokens, token_type) for s in SPLITS}
    dtype = _TOKEN_TYPES[token_type][0]
    # The newest document is held back one step so that, at the end, it can go to whichever split
    # would otherwise be empty (both splits need at least one document).
    held: Optional[tuple[str, np.ndarray]] = None
    num_docs = num_tokens = 0
    undecodable: dict[str, dict[str, int]] = {}
    t0 = last_note = time.perf_counter()
    for batch in _batched(_capped_documents(src, cfg.text_field, cfg.max_bytes, undecodable), _DOCS_PER_BATCH):
        for (key, _), tokens in zip(batch, tok.encode_documents([text for _, text in batch])):
            tokens = tokens.astype(dtype, copy=False)
            if held is not None:
                writers["val" if _is_val(held[0], cfg.val_fraction) else "train"].add(held[1])
            held = (key, tokens)
            num_docs += 1
            num_tokens += tokens.size
        if time.perf_counter() - last_note > 10:  # long corpora: say it is moving
            last_note = time.perf_counter()
            log(f"tokenizing: {num_docs} docs, {num_tokens / 1e6:.1f}M tokens so far "
                f"({num_tokens / (last_note - t0) / 1e3:.0f}K tokens/s)")
    if held is None:
        raise DataError(
            f"data.source={src.description!r} holds no text ({len(src.files)} files, all empty or without documents); "
            "point data.source at a non-empty corpus"
        )
    key, tokens = held
    if num_docs == 1:
        # One document cannot be split by document: hold out its last val_fraction of tokens.
        num_val = min(max(1, round(tokens.size * cfg.val_fraction)), tokens.size - 1)
        if num_val < 1:
            raise DataError(f"data.source={src.description!r} holds a single token; add text to the corpus")
        writers["train"].add(tokens[:-num_val])
        writers["val"].add(tokens[-num_val:])
    elif writers["val"].num_docs == 0:
        writers["val"].add(tokens)
    elif writers["train"].num_docs == 0:
        writers["train"].add(tokens)
    else:
        writers["val" if _is_val(key, cfg.val_fraction) else "train"].add(tokens)
    for w in writers.values():
        w.flush()
    combined = hashlib.sha256("".join(writers[s].stream_hash.hexdigest() for s in SPLITS).encode()).hexdigest()
    return {
        "format": _CACHE_FORMAT,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "token_type": token_type,
        "source": src.description,
        "num_files": len(src.files),
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "max_bytes": cfg.max_bytes,
        "splits": {s: writers[s].summary() for s in SPLITS},
        "token_sha256": combined,
        "undecodable_bytes": undecodable,
    }


@dataclass(frozen=True)
class Corpus:
    """A tokenized corpus on disk: one directory of parquet shards plus manifest.json."""

    dir: str
    manifest: dict[str, Any]
    reused: bool
    """True when the shards came from an earlier (or concurrent) call rather than this one."""

    def num_tokens(self, split: str) -> int:
        return int(self._split(split)["num_tokens"])

    def tokens(self, split: str) -> np.ndarray:
        """The concatenated token stream of a split (uint16 or uint32), every shard checked against its sha256."""
        parts = []
        for shard in self._split(split)["shards"]:
            column = self.read_shard(shard).column("tokens").combine_chunks()
            parts.append(column.flatten().to_numpy(zero_copy_only=False))
        dtype = _TOKEN_TYPES[self.manifest.get("token_type", "uint16")][0]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    def read_shard(self, shard: dict[str, Any]) -> pa.Table:
        """One shard of the manifest as a table, after checking its sha256."""
        path = os.path.join(self.dir, shard["file"])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"{path}: shard is missing; delete {self.dir} to re-tokenize") from None
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise DataError(f"{path}: shard is corrupted (sha256 differs from manifest.json); delete {self.dir} to re-tokenize")
        return pq.read_table(io.BytesIO(data))

    def _split(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        return self.manifest["splits"][split]


def _load_manifest(final_dir: str) -> dict[str, Any]:
    path = os.path.join(final_dir, "manifest.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable cache manifest ({e}); delete {final_dir} to re-tokenize") from None


def build_once(cache_dir: str, final_dir: str, build: Callable[[str], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """`build(tmp_dir)` writes shards and returns their manifest; the directory is renamed to
    final_dir once complete, so a crash never leaves a cache that looks valid. Returns (manifest,
    reused): of two concurrent builders, the loser of the rename uses the winner's identical shards."""
    os.makedirs(cache_dir, exist_ok=True)
    tmp_dir = os.path.join(cache_dir, f".tmp-{os.path.basename(final_dir)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp_dir)
    try:
        manifest = build(tmp_dir)
        manifest["fingerprint"] = os.path.basename(final_dir)
        with open(os.path.join(tmp_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not os.path.isdir(final_dir):
                raise
            shutil.rmtree(tmp_dir, ignore_errors=True)
            return _load_manifest(final_dir), True
        return manifest, False
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def open_corpus(corpus_dir: str) -> Corpus:
    """A corpus that `prepare_corpus` already wrote (what training workers open)."""
    return Corpus(dir=corpus_dir, manifest=_load_manifest(corpus_dir), reused=True)


def prepare_corpus(
    cfg: DataConfig, cache_dir: str, seq_len: int, log: Optional[Callable[[str], None]] = None,
    tokenizer: Optional[Tokenizer] = None,
) -> Corpus:
    """Tokenize cfg.source into shards under cache_dir/<fingerprint>/, or reuse them if present.

    `tokenizer`: what the run uses (tokenizer_for(run config)); default: data.tokenizer itself.
    Checks that each split holds at least one window of seq_len + 1 tokens.
    """
    log = log or (lambda msg: None)
    tok = tokenizer or get_tokenizer(cfg.tokenizer)
    src = _list_source(cfg.source)
    final_dir = os.path.join(os.path.abspath(cache_dir), _fingerprint(src, cfg, tok))
    reused = os.path.isdir(final_dir)
    if reused:
        manifest = _load_manifest(final_dir)
        log(f"reusing tokenized corpus {final_dir} ({_summary(manifest)})")
        if "undecodable_bytes" not in manifest:
            manifest = _record_undecodable(final_dir, manifest, src, cfg, log)
    else:
        t0 = time.perf_counter()
        manifest, reused = build_once(cache_dir, final_dir, lambda d: _tokenize_into(d, src, cfg, tok, log))
        log(f"tokenized {_summary(manifest)} in {time.perf_counter() - t0:.1f}s -> {final_dir}")
    # From the manifest, so a run that reuses the shards warns as the one that wrote them did.
    for path, n in manifest["undecodable_bytes"].items():
        log(f"warning: {path}: {n['bytes']} of {n['size']} bytes are not valid UTF-8 and were read as U+FFFD; "
            "convert the file to UTF-8 to train on its exact text")
    for split in SPLITS:
        n = manifest["splits"][split]["num_tokens"]
        if n < seq_len + 1:
            raise DataError(
                f"the {split} split of data.source={src.description!r} has {n} tokens but one sequence needs "
                f"train.seq_len+1={seq_len + 1}; add data, raise data.max_bytes, "
                f"{'raise data.val_fraction, ' if split == 'val' else ''}or lower train.seq_len"
            )
    return Corpus(dir=final_dir, manifest=manifest, reused=reused)


def _record_undecodable(final_dir: str, manifest: dict[str, Any], src: _Source, cfg: DataConfig,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """A cache written before undecodable bytes were counted: count them now, reading the corpus
    once more (refusing a file as a build would), and add them to its manifest so later runs do not.
    Its fingerprint and shards stay as they are: the tokens are the same."""
    undecodable: dict[str, dict[str, int]] = {}
    if any(not f.rel.endswith((".jsonl", ".parquet")) for f in src.files):
        log(f"counting bytes that are not UTF-8 in the .txt files of {final_dir} (once: its manifest predates the count)")
        for _ in _capped_documents(src, cfg.text_field, cfg.max_bytes, undecodable):
            pass
    manifest = {**manifest, "undecodable_bytes": undecodable}
    tmp = os.path.join(final_dir, f".manifest-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(final_dir, "manifest.json"))  # atomic: a reader sees the old or the new one
    except OSError:  # a read-only cache: the next run counts again
        if os.path.exists(tmp):
            os.remove(tmp)
    return manifest


def _summary(manifest: dict[str, Any]) -> str:
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    total = tr["num_tokens"] + va["num_tokens"]
    return f"{tr['num_docs'] + va['num_docs']} docs, {total / 1e6:.2f}M tokens (val {va['num_docs']} docs, {va['num_tokens']} tokens)"


# ----------------------------------------------------------------------------- batches


def _num_windows(num_tokens: int, seq_len: int) -> int:
    # Windows of seq_len+1 tokens start every seq_len tokens: the last token of one window is the
    # first of the next, so every token except the very first is a target exactly once.
    return max(0, (num_tokens - 1) // seq_len)


def _gather_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


class EpochOrder:
    """The global order of n items (windows, packed rows): a seeded permutation per epoch. `position`
    counts items consumed by all ranks; rank r of a step takes [position + r*B, position + (r+1)*B),
    so a run resumed at another world size continues the same global sequence."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # A batch straddles at most two epochs; keep only those.
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, position: int, rank: int, batch_size: int) -> np.ndarray:
        global_idx = position + rank * batch_size + np.arange(batch_size)
        epochs, within = np.divmod(global_idx, self.n)
        return np.array([self._permutation(int(e))[i] for e, i in zip(epochs, within)], dtype=np.int64)


class BatchIterator:
    """Seeded, resumable batches of one rank; `position` counts windows consumed by all ranks."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        rank: int,
        world_size: int,
        seed: int,
        position: int = 0,
    ):
        assert 0 <= rank < world_size, f"rank={rank} outside world_size={world_size}"
        assert batch_size > 0 and seq_len > 0 and position >= 0
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.position = position
        self.num_windows = _num_windows(len(tokens), seq_len)
        need = batch_size * world_size
        if self.num_windows < need:
            raise DataError(
                f"the training split has {len(tokens)} tokens = {self.num_windows} sequences of train.seq_len={seq_len}, "
                f"but one step needs train.batch_size*workers={batch_size}*{world_size}={need} sequences "
                f"({need * seq_len + 1} tokens); add data, raise data.max_bytes, or lower train.batch_size/train.seq_len"
            )
        self._order = EpochOrder(self.num_windows, seed)

    def window_indices(self) -> np.ndarray:
        """Which windows (token offset / seq_len) this rank's next batch holds."""
        return self._order.indices(self.position, self.rank, self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 [batch_size, seq_len]; targets are inputs shifted by one."""
        batch = _gather_windows(self.tokens, self.window_indices() * self.seq_len, self.seq_len)
        self.position += self.batch_size * self.world_size
        return batch

    def state(self) -> dict[str, int]:
        return {"position": self.position, "epoch": self.position // self.num_windows}


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int, rank: int, world_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches at every call: the first windows in order, striped over ranks.

    Batch i of rank r holds windows (i*world_size + r)*batch_size + j; a split shorter than that
    wraps around, so a small validation set is reused rather than refused.
    """
    assert 0 <= rank < world_size
    num_windows = _num_windows(len(tokens), seq_len)
    if num_windows == 0:
        raise DataError(
            f"the validation split has {len(tokens)} tokens but one sequence needs train.seq_len+1={seq_len + 1}; "
            "raise data.val_fraction, add data, or lower train.seq_len"
        )
    out = []
    for i in range(num_batches):
        idx = (i * world_size + rank) * batch_size + np.arange(batch_size)
        out.append(_gather_windows(tokens, (idx % num_windows) * seq_len, seq_len))
    return out


# ----------------------------------------------------------------------------- either kind


def prepare_run_data(cfg, log: Optional[Callable[[str], None]] = None):
    """What the driver tokenizes for a run (RunConfig): its pre-training corpus or, for
    data.format=sft, its instruction examples (train/sft.py). Returns an object with `.dir`."""
    from raymoe.tokenizer import tokenizer_for

    tokenizer = tokenizer_for(cfg)
    if cfg.data.format == "sft":
        from raymoe.train.sft import prepare_sft

        return prepare_sft(cfg.data, cfg.data_cache_dir, cfg.train.seq_len, tokenizer, log=log)
    return prepare_corpus(cfg.data, cfg.data_cache_dir, cfg.train.seq_len, log=log, tokenizer=tokenizer)
