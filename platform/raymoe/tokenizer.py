"""Tokenizers: raymoe's byte tokenizer, and Hugging Face tokenizers through the `tokenizers` library.

    tok = tokenizer_for(cfg)                  # what data.tokenizer / model.init_from say
    tok = HFTokenizer.from_dir("DIR")         # tokenizer.json (+ tokenizer_config.json)
    ids = tok.encode("def f():")              # as transformers' tokenizer(text).input_ids
    tok.decode(ids)

What is notable:
- `encode` gives what transformers 5's `tokenizer(text)["input_ids"]` gives: the ids with the
  tokenizer.json post-processor applied (which is where a BOS comes from; transformers 5 ignores
  tokenizer_config's add_bos_token when a tokenizer.json exists). Corpus documents instead get
  `encode_documents`: [BOS, if the post-processor adds one] + ids + [EOS], so that every document
  ends where the model learns to stop.
- EOS: serving stops at any id of `eos_ids`, which joins tokenizer_config's eos_token with
  config.json's and generation_config.json's eos_token_id (Qwen3 lists two).
- `name` carries a hash of the tokenizer's files: the corpus cache fingerprint includes it, so a
  changed tokenizer never reuses shards of another.
- Batches go through the Rust `encode_batch`, which runs on every core (TOKENIZERS_PARALLELISM).
- Chat data (train/sft.py) uses `encode_text` (ids, no special tokens added, special-token strings in
  the text matched), `special_tokens` (what a chat template sees as bos_token, eos_token, ...) and
  `chat_template()` (the tokenizer's own template, as transformers would load it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Sequence, Union

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
"""Files that travel with a model directory (import, export, MLflow)."""


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded or does not fit the model; the message says what to change."""


class ByteTokenizer:
    """Ids 0..255 are UTF-8 bytes; 256..259 are <bos>, <eos>, <pad>, <unk>. Nothing to train."""

    name = "byte"
    vocab_size = 260
    bos_id = 256
    eos_id = 257
    pad_id = 258
    unk_id = 259
    eos_ids = frozenset({257})
    add_bos = False
    special_tokens = {"bos_token": "<bos>", "eos_token": "<eos>"}
    """What a chat template gets as bos_token / eos_token; encode_text maps these strings back to 256 / 257."""
    _SPECIAL_RE = re.compile("(<bos>|<eos>)")

    def encode(self, text: str) -> np.ndarray:
        # One C-level pass over the bytes: a python list of ints would be ~50x slower on big files.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_text(self, text: str) -> np.ndarray:
        """UTF-8 bytes, except that the literal strings "<bos>" and "<eos>" become ids 256 and 257."""
        pieces = self._SPECIAL_RE.split(text)  # odd indices are the special tokens
        ids = [np.array([self.bos_id if p == "<bos>" else self.eos_id], np.uint16) if i % 2 else self.encode(p)
               for i, p in enumerate(pieces)]
        return np.concatenate(ids) if ids else np.zeros(0, np.uint16)

    def chat_template(self) -> str | None:
        return None  # bytes come with no template: data.chat_template names one

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each document's ids followed by EOS (the byte corpora never had a BOS)."""
        eos = np.array([self.eos_id], dtype=np.uint16)
        return [np.concatenate([self.encode(t), eos]) for t in texts]

    def decode(self, ids) -> str:
        import torch

        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names chat templates see the special tokens under.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_id(tok, value) -> int | None:
    """An id from tokenizer_config's `bos_token`-style value: a string or {"content": ...}."""
    if value is None:
        return None
    content = value.get("content") if isinstance(value, dict) else value
    return tok.token_to_id(content) if isinstance(content, str) else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class HFTokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json) with its special-token settings."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.dir = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._tok = Tokenizer.from_file(file)
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no tokenizer.json; data.tokenizer must name a directory holding a Hugging Face "
                                 "tokenizer.json, the file itself, or 'byte'") from None
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exceptions
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({str(e)[:200]})") from None
        config = self._json("tokenizer_config.json")
        digest = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            p = os.path.join(self.dir, name) if name != "tokenizer.json" else file
            if os.path.exists(p):
                with open(p, "rb") as f:
                    digest.update(f.read())
        self.name = f"hf-{digest.hexdigest()[:16]}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = _token_id(self._tok, config.get("bos_token"))
        self.pad_id = _token_id(self._tok, config.get("pad_token"))
        eos = _token_id(self._tok, config.get("eos_token"))
        eos_ids = {eos} if eos is not None else set()
        for extra in ("config.json", "generation_config.json"):
            eos_ids.update(_ids(self._json(extra).get("eos_token_id")))
        self.eos_ids = frozenset(i for i in eos_ids if i is not None)
        self.eos_id = eos if eos is not None else (min(self.eos_ids) if self.eos_ids else None)
        # transformers 5 ignores add_bos_token / add_eos_token when a tokenizer.json exists and
        # applies its post-processor as written; so do we.
        probe = self._tok.encode("a", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        # The named special tokens as strings, as transformers' special_tokens_map gives them to chat templates.
        legacy = self._json("special_tokens_map.json")
        self.special_tokens = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = config.get(key, legacy.get(key))
            content = value.get("content") if isinstance(value, dict) else value
            if isinstance(content, str):
                self.special_tokens[key] = content

    def _json(self, name: str) -> dict:
        p = os.path.join(self.dir, name)
        if not os.path.exists(p):
            return {}
        try:
            with open(p) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{p}: unreadable ({e})") from None
        return data if isinstance(data, dict) else {}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_text(self, text: str) -> list[int]:
        """The ids of `text` alone: no BOS/EOS added; special tokens written in the text are matched."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def chat_template(self) -> str | None:
        """The default chat template, where transformers 5 finds it: chat_template.jinja beside
        tokenizer.json (which wins), else tokenizer_config.json's chat_template (a string, or a list
        of {name, template} of which "default" is used). None when there is none."""
        path = os.path.join(self.dir, "chat_template.jinja")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
        value = self._json("tokenizer_config.json").get("chat_template")
        if isinstance(value, list):
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            if "default" not in named:
                raise TokenizerError(f"{self.dir}/tokenizer_config.json: chat_template lists {sorted(map(str, named))} "
                                     "but no 'default'; set data.chat_template to a .jinja file")
            value = named["default"]
        if value is not None and not isinstance(value, str):
            raise TokenizerError(f"{self.dir}/tokenizer_config.json: chat_template is a {type(value).__name__}, not a "
                                 "string; fix it or set data.chat_template to a .jinja file")
        return value

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        """[BOS (if the model uses one)] + ids + [EOS] per document, in one parallel batch."""
        if self.eos_id is None:
            raise TokenizerError(f"{self.dir}: the tokenizer has no eos_token; set one in tokenizer_config.json")
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        head = [self.bos_id] if self.add_bos else []
        return [np.array(head + e.ids + [self.eos_id], dtype=dtype)
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        import torch

        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def has_tokenizer(directory: str | None) -> bool:
    return bool(directory) and os.path.exists(os.path.join(directory, "tokenizer.json"))


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte', or a Hugging Face tokenizer directory / tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise TokenizerError(f"data.tokenizer={spec!r}: no such file or directory; use 'byte' or a Hugging Face "
                             "tokenizer directory (holding tokenizer.json)")
    return HFTokenizer(path)


def tokenizer_for(cfg, model_dir: str | None = None) -> Tokenizer:
    """The tokenizer of a run or a model: data.tokenizer if it names one; else the tokenizer of the
    model directory being served (model_dir) or of model.init_from; else bytes. Checked to fit the
    model's vocabulary."""
    from raymoe.model_dir import tokenizer_dir_of

    spec = cfg.data.tokenizer
    if spec is not None and spec != "byte" and not has_tokenizer(model_dir):
        tok = load_tokenizer(spec)  # an explicit path: a missing one is an error, not bytes
    else:
        where = tokenizer_dir_of(cfg, model_dir)
        tok = HFTokenizer(where) if where else ByteTokenizer()
    if tok.vocab_size > cfg.model.vocab_size:
        raise TokenizerError(f"the tokenizer ({tok.name}) has {tok.vocab_size} tokens but model.vocab_size is "
                             f"{cfg.model.vocab_size}; use the model's own tokenizer or a larger vocabulary")
    return tok
