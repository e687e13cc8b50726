"""tokenizer.py and the corpus pipeline with Hugging Face tokenizers, against transformers'
AutoTokenizer on tiny tokenizers trained offline (tests/tiny_hf.py).

    .venv/bin/python -m pytest tests/unit/test_tokenizer.py -q
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from raymoe.config import DataConfig, config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.serve.engine import Engine, SamplingParams
from raymoe.tokenizer import ByteTokenizer, HFTokenizer, TokenizerError, tokenizer_for
from raymoe.train.data import prepare_corpus
from tiny_hf import SAMPLE_TEXT, write_tokenizer

TEXTS = ["def add(a, b):\n    return a + b", "héllo wörld — ✓ 日本語", "price: 5€ (not in training text)", ""]


@pytest.mark.parametrize("add_bos", [True, False, None])
def test_encode_equals_transformers_autotokenizer(tmp_path, add_bos):
    from transformers import AutoTokenizer

    d = write_tokenizer(tmp_path / "tok", add_bos=add_bos)
    ours, theirs = HFTokenizer(d), AutoTokenizer.from_pretrained(d)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True)
    # transformers 5 follows tokenizer.json's post-processor (this one prepends <s>) whatever
    # add_bos_token says; so do we.
    assert ours.add_bos
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0)


def test_eos_ids_join_tokenizer_config_and_generation_config(tmp_path):
    d = write_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert HFTokenizer(d).eos_ids == {2, 7}


def test_documents_get_bos_and_eos_and_round_trip_unicode(tmp_path):
    tok = HFTokenizer(write_tokenizer(tmp_path / "tok"))
    docs = tok.encode_documents(TEXTS[:3])
    for text, ids in zip(TEXTS, docs):
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.dtype == np.uint16
        assert tok.decode(ids) == text


def test_streamed_deltas_never_cut_a_multibyte_character(tmp_path):
    """'€' is three byte-level tokens here: the engine holds the partial bytes back until the
    character is complete, so no delta carries a replacement character."""
    tok = HFTokenizer(write_tokenizer(tmp_path / "tok"))
    target = tok.encode("a€b日€")[1:]  # without the BOS
    assert len(target) >= 5
    cfg = config_from_dict({"model": {"vocab_size": 320, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                      "num_experts": 2, "top_k": 1, "expert_intermediate_size": 8}}).model
    engine = Engine(MoETransformer(cfg), tok, max_batch=1, max_len=32)
    req = engine.add_request([5, 6], SamplingParams(max_tokens=len(target), temperature=0))
    deltas = []
    for t in target:  # drive the engine's own acceptance with logits that choose the target ids
        logits = torch.full((320,), -1e9)
        logits[t] = 0
        _, delta, _ = engine._accept(req, *engine._sample([req], logits[None])[0])
        deltas.append(delta)
    assert "".join(deltas) == "a€b日€"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= 2  # the bytes of a '€' waited for each other


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    d = write_tokenizer(tmp_path / "tok")
    cfg = config_from_dict({"model": {"vocab_size": 260}, "data": {"tokenizer": d}})
    with pytest.raises(TokenizerError, match="has 300 tokens but model.vocab_size is 260"):
        tokenizer_for(cfg)
    assert isinstance(tokenizer_for(config_from_dict({})), ByteTokenizer)
    with pytest.raises(TokenizerError, match="no such file"):
        tokenizer_for(config_from_dict({"data": {"tokenizer": str(tmp_path / "nope")}}))


def test_corpus_with_a_bpe_tokenizer_has_its_own_fingerprint_and_bos_eos_documents(tmp_path):
    (tmp_path / "corpus").mkdir()
    with open(tmp_path / "corpus" / "docs.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"{i}: " + SAMPLE_TEXT[: 50 + i]}) + "\n")
    d = write_tokenizer(tmp_path / "tok")
    tok = HFTokenizer(d)
    cfg = DataConfig(source=str(tmp_path / "corpus"), tokenizer=d, val_fraction=0.1)
    bpe = prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=16, tokenizer=tok)
    byte = prepare_corpus(DataConfig(source=str(tmp_path / "corpus"), tokenizer="byte", val_fraction=0.1),
                          str(tmp_path / "cache"), seq_len=16)
    assert bpe.dir != byte.dir and bpe.manifest["tokenizer"] == tok.name
    train = bpe.tokens("train")
    assert train.dtype == np.uint16
    assert int((train == tok.bos_id).sum()) == int((train == tok.eos_id).sum()) == bpe.manifest["splits"]["train"]["num_docs"]
    assert bpe.num_tokens("train") < byte.num_tokens("train") * 0.7  # BPE merges: fewer tokens than bytes


def test_vocabularies_above_65536_are_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(f"w{i}" for i in range(69_990, 70_000)) * 5)
    (tmp_path / "corpus" / "b.txt").write_text("w5 w6 w7 " * 20)
    hf_tok = HFTokenizer(str(tmp_path / "tok"))
    corpus = prepare_corpus(DataConfig(source=str(tmp_path / "corpus"), val_fraction=0.5), str(tmp_path / "cache"),
                            seq_len=4, tokenizer=hf_tok)
    everything = np.concatenate([corpus.tokens("train"), corpus.tokens("val")])
    assert everything.dtype == np.uint32 and int(everything.max()) == 70_002
    assert os.path.exists(os.path.join(corpus.dir, "manifest.json"))


def test_generation_stops_at_any_eos_id_of_the_model(tmp_path):
    d = write_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = HFTokenizer(d)
    cfg = config_from_dict({"model": {"vocab_size": 320, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                      "num_experts": 2, "top_k": 1, "expert_intermediate_size": 8}}).model
    engine = Engine(MoETransformer(cfg), tok, max_batch=1, max_len=32)
    req = engine.add_request("def", SamplingParams(max_tokens=10, temperature=0))
    assert req.prompt_ids == tok.encode("def") and req.prompt_ids[0] == tok.bos_id
    logits = torch.full((320,), -1e9)
    logits[7] = 0  # the second EOS id, from generation_config.json
    assert engine._accept(req, *engine._sample([req], logits[None])[0]) == (req, "", True) and req.finish_reason == "stop"
