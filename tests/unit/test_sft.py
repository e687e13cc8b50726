"""train/sft.py: chat rendering against transformers, loss masks, the SFT shard cache, packed and
padded batches, resumption, bad-example reporting, and the shipped demo instruction set.

    .venv/bin/python -m pytest tests/unit/test_sft.py -q
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from raymoe.config import DataConfig
from raymoe.tokenizer import ByteTokenizer, HFTokenizer
from raymoe.train.sft import (
    ChatTemplate,
    DataError,
    SFTBatches,
    open_sft,
    prepare_sft,
    sft_eval_batches,
)
from tiny_hf import SAMPLE_TEXT, write_tokenizer

TOK = ByteTokenizer()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, "jobs", "data", "finetune-demo.jsonl")
DEMO_TEMPLATE = os.path.join(REPO, "jobs", "data", "chat_template.jinja")
# ChatML with a BOS, a {% generation %} block (transformers' assistant tracker) and raise_exception.
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Square x."},
    {"role": "assistant", "content": "def square(x):\n    return x * x"},
    {"role": "user", "content": "Now cube it."},
    {"role": "assistant", "content": "def cube(x):\n    return x ** 3"},
]


def _demo_template() -> str:
    with open(DEMO_TEMPLATE) as f:
        return f.read()


def _hf_tokenizer(directory=None):
    """A byte-level BPE with <|im_start|>/<|im_end|> as special tokens, as a transformers
    PreTrainedTokenizerFast (eos = <|im_end|>) and, if `directory`, saved there for HFTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    theirs = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    theirs.chat_template = CHATML
    if directory is not None:
        theirs.save_pretrained(directory)
    return theirs


def _write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _cfg(source, **kw) -> DataConfig:
    return DataConfig(**{"format": "sft", "source": str(source), "tokenizer": "byte", "val_fraction": 0.2, **kw})


def _examples(lengths, seed=0):
    """Synthetic (tokens, loss) examples; token 0 of example i is i, so batches name their examples."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        tokens = np.concatenate([[i], rng.integers(0, 250, n - 1)]).astype(np.uint16)
        loss = rng.random(n) < 0.5
        out.append((tokens, loss))
    return out


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("template", ["shipped", "chatml"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_transformers_apply_chat_template(template, add_generation_prompt):
    theirs = _hf_tokenizer()
    text = _demo_template() if template == "shipped" else CHATML
    theirs.chat_template = text
    chat = CHAT[:-1] if add_generation_prompt else CHAT  # a generation prompt follows a user turn
    ours = ChatTemplate(text, "t", theirs.special_tokens_map)
    expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render(chat, add_generation_prompt) == expected
    assert expected.startswith("<s><|im_start|>system\n" if template == "chatml" else "<|system|>\nYou write Python.\n")


def test_hf_tokenizer_chat_matches_transformers_ids_and_assistant_mask(tmp_path):
    """Our tokens equal apply_chat_template's ids, and our loss mask its assistant mask from the
    {% generation %} block (reply + <|im_end|>): the prefix-render masking finds the same tokens."""
    theirs = _hf_tokenizer(tmp_path / "tok")
    ours = HFTokenizer(str(tmp_path / "tok"))
    assert ours.chat_template() == CHATML and ours.special_tokens == theirs.special_tokens_map
    src = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:3]}])
    corpus = prepare_sft(_cfg(src, tokenizer=str(tmp_path / "tok")), str(tmp_path / "cache"), 128, ours)
    examples = corpus.examples("train") + corpus.examples("val")
    tokens, loss = next((t, m) for t, m in examples if len(t) == max(len(t) for t, _ in examples))
    out = theirs.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert tokens.tolist() == out["input_ids"]
    assert loss.astype(int).tolist() == out["assistant_masks"]
    assert corpus.manifest["template"].startswith("of tokenizer")


def test_template_named_default_in_tokenizer_config_is_what_transformers_uses(tmp_path):
    from transformers import AutoTokenizer

    d = write_tokenizer(tmp_path / "tok")
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "default", "template": CHATML}, {"name": "other", "template": "x"}]
    config_path.write_text(json.dumps(config))
    ours, theirs = HFTokenizer(d), AutoTokenizer.from_pretrained(d)
    template = ChatTemplate(ours.chat_template(), "t", ours.special_tokens)
    assert template.render(CHAT) == theirs.apply_chat_template(CHAT, tokenize=False)


# ----------------------------------------------------------------------------- loss masks


def test_prompt_completion_loss_is_on_completion_and_eos(tmp_path):
    src = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 2+2?\nA: ", "completion": "4"},
                                              {"prompt": "Say hi: ", "completion": "hi"}])
    corpus = prepare_sft(_cfg(src), str(tmp_path / "cache"), 64, TOK)
    got = {TOK.decode(t): (t, m) for t, m in corpus.examples("train") + corpus.examples("val")}
    tokens, loss = got["Q: 2+2?\nA: 4"]
    assert tokens.tolist() == list(b"Q: 2+2?\nA: 4") + [TOK.eos_id]
    assert loss.tolist() == [False] * len("Q: 2+2?\nA: ") + [True, True]  # "4" and EOS


def test_chat_loss_is_on_each_reply_and_its_eos_not_on_headers(tmp_path):
    src = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    corpus = prepare_sft(_cfg(src, chat_template=DEMO_TEMPLATE), str(tmp_path / "cache"), 256, TOK)
    examples = corpus.examples("train") + corpus.examples("val")
    tokens, loss = max(examples, key=lambda e: len(e[0]))
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    # Hand count: the bytes of each reply plus its <eos>; the "\n" after <eos> and "<|assistant|>\n" carry none.
    assert loss.sum() == sum(len(r.encode()) + 1 for r in replies)
    rendered = ChatTemplate(_demo_template(), "t", TOK.special_tokens).render(CHAT)
    assert tokens.tolist() == TOK.encode_text(rendered).tolist()
    assert TOK.decode(tokens[loss]) == "".join(replies)
    assert (tokens[loss] == TOK.eos_id).sum() == 2
    starts = np.flatnonzero(np.diff(loss.astype(int)) == 1) + 1
    assert [TOK.decode(tokens[s - 14:s]) for s in starts] == ["<|assistant|>\n"] * 2


# ----------------------------------------------------------------------------- batches


def test_packed_rows_restart_positions_and_hold_every_example_once():
    lengths = [5, 17, 3, 33, 9, 2, 30, 12, 8, 20, 4, 16, 25, 7, 11, 6]
    examples = _examples(lengths)
    seq_len = 32
    it = SFTBatches(examples, batch_size=1, seq_len=seq_len, rank=0, world_size=1, seed=3)
    assert it.num_rows < len(examples)  # packing did pack
    seen = []
    for _ in range(it.num_rows):  # one epoch, one row a step
        b = it.next_batch()
        seg, pos = b.segments[0], b.positions[0]
        for k in range(int(seg.max()) + 1):
            where = torch.nonzero(seg == k).flatten()
            assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))  # contiguous in the row
            assert pos[where].tolist() == list(range(len(where)))  # positions restart per example
            i = int(b.inputs[0, where[0]])
            tokens, loss = examples[i]
            # The whole example, in one row: inputs and targets are its tokens shifted by one.
            assert b.inputs[0, where].tolist() == tokens[:-1].tolist()
            assert b.targets[0, where].tolist() == tokens[1:].tolist()
            assert b.loss_mask[0, where].tolist() == loss[1:].tolist()
            seen.append(i)
        pad = seg == -1
        assert not b.loss_mask[0, pad].any() and (pos[pad] == 0).all()
    assert sorted(seen) == list(range(len(examples)))
    used = sum(n - 1 for n in lengths)
    assert it.padding_fraction == pytest.approx(1 - used / (it.num_rows * seq_len))
    assert it.loss_fraction == pytest.approx(sum(m[1:].sum() for _, m in examples) / (it.num_rows * seq_len))


def test_padding_mode_puts_one_example_a_row_and_reports_padding():
    examples = _examples([3, 5])  # 2 + 4 of 2 * 8 slots used
    it = SFTBatches(examples, batch_size=2, seq_len=8, rank=0, world_size=1, seed=0, packing=False, pad_id=258)
    assert it.num_rows == 2 and it.padding_fraction == pytest.approx(10 / 16)
    b = it.next_batch()
    assert sorted((b.segments >= 0).sum(1).tolist()) == [2, 4]
    assert (b.segments <= 0).all()  # one example per row
    pad = b.segments == -1
    assert (b.inputs[pad] == 258).all() and (b.targets[pad] == 258).all() and not b.loss_mask[pad].any()
    packed = SFTBatches(examples, batch_size=1, seq_len=8, rank=0, world_size=1, seed=0)
    assert packed.num_rows == 1 and packed.padding_fraction == pytest.approx(2 / 8)


def test_resume_at_world_size_one_continues_the_rows_of_world_size_two():
    examples = _examples([int(n) for n in np.random.default_rng(1).integers(2, 40, 60)])
    kw = dict(seq_len=48, seed=7)
    ranks = [SFTBatches(examples, batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    num_rows = ranks[0].num_rows
    for _ in range(num_rows // 4 - 1):  # close to the end of an epoch, so the next steps cross it
        for it in ranks:
            it.next_batch()
    position = ranks[0].position
    assert position == ranks[1].position == 4 * (num_rows // 4 - 1)
    single = SFTBatches(examples, batch_size=4, rank=0, world_size=1, position=position, **kw)
    for _ in range(3):
        two = [it.next_batch() for it in ranks]
        one = single.next_batch()
        for name in ("inputs", "targets", "loss_mask", "positions", "segments"):
            assert torch.equal(getattr(one, name), torch.cat([getattr(b, name) for b in two])), name
    assert single.state()["epoch"] == 1


def test_eval_batches_are_fixed_and_striped_over_ranks():
    examples = _examples([10, 20, 5, 30, 12, 7])
    a = sft_eval_batches(examples, 2, 32, 3, rank=0, world_size=2)
    again = sft_eval_batches(examples, 2, 32, 3, rank=0, world_size=2)
    other = sft_eval_batches(examples, 2, 32, 3, rank=1, world_size=2)
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, again))
    assert not torch.equal(a[0].inputs, other[0].inputs)


def test_too_few_rows_for_one_step_names_what_to_change():
    with pytest.raises(DataError, match=r"train.batch_size\*workers=4\*2=8 rows.*data.packing=false"):
        SFTBatches(_examples([5] * 10), batch_size=4, seq_len=64, rank=0, world_size=2, seed=0)


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_checked_and_keyed_by_seq_len(tmp_path):
    src = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i} ", "completion": f"c{i}"} for i in range(20)])
    cfg = _cfg(src)
    first = prepare_sft(cfg, str(tmp_path / "cache"), 64, TOK)
    again = prepare_sft(cfg, str(tmp_path / "cache"), 64, TOK)
    assert not first.reused and again.reused and again.dir == first.dir
    m = first.manifest
    assert m["kind"] == "sft" and m["tokenizer"] == "byte" and m["skipped"] == {}
    assert m["splits"]["train"]["num_examples"] + m["splits"]["val"]["num_examples"] == 20
    assert m["splits"]["val"]["num_examples"] >= 1
    opened = open_sft(first.dir)
    for s in ("train", "val"):
        assert [t.tolist() for t, _ in opened.examples(s)] == [t.tolist() for t, _ in first.examples(s)]
    assert prepare_sft(cfg, str(tmp_path / "cache"), 32, TOK).dir != first.dir
    shard = os.path.join(first.dir, m["splits"]["train"]["shards"][0]["file"])
    with open(shard, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(DataError, match="corrupted"):
        opened.examples("train")


# ----------------------------------------------------------------------------- bad data

GOOD = {"prompt": "a ", "completion": "b"}
BAD = {
    "invalid_json": ("{not json", "not valid JSON"),
    "not_an_object": ("[1, 2]", "not an object"),
    "unknown_format": ({"text": "hello"}, "neither 'messages' nor"),
    "wrong_type": ({"prompt": 1, "completion": "x"}, "'prompt' is a int"),
    "unknown_role": ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     "role 'tool'"),
    "no_assistant_turn": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    "too_long": ({"prompt": "x" * 100, "completion": "y"}, "102 tokens, more than train.seq_len\\+1=65"),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_example_names_file_and_line(tmp_path, reason):
    line, what = BAD[reason]
    src = _write_jsonl(tmp_path / "d.jsonl", [GOOD, "", GOOD, line, GOOD])
    with pytest.raises(DataError, match=f"d.jsonl:4: .*{what}.*data.skip_bad_examples"):
        prepare_sft(_cfg(src, chat_template=DEMO_TEMPLATE), str(tmp_path / "cache"), 64, TOK)


def test_non_string_content_is_a_wrong_type(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": 5},
                                                            {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match=r"d.jsonl:1: turn 0 \(user\) has content of type int"):
        prepare_sft(_cfg(src, chat_template=DEMO_TEMPLATE), str(tmp_path / "cache"), 64, TOK)


def test_skip_mode_counts_every_bad_example_per_reason(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, GOOD] + [line for line, _ in BAD.values()])
    logs = []
    corpus = prepare_sft(_cfg(src, chat_template=DEMO_TEMPLATE, skip_bad_examples=True), str(tmp_path / "cache"), 64,
                         TOK, log=logs.append)
    assert corpus.manifest["skipped"] == {reason: 1 for reason in BAD}
    assert sum(corpus.num_examples(s) for s in ("train", "val")) == 3
    assert any(msg.startswith("skipped 7 bad examples (invalid_json: 1,") for msg in logs)


def test_no_usable_example_is_an_error_even_when_skipping(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", ["{", "[]"])
    with pytest.raises(DataError, match="holds 0 usable example.*2 skipped"):
        prepare_sft(_cfg(src, skip_bad_examples=True), str(tmp_path / "cache"), 64, TOK)


def test_chat_without_a_template_says_to_set_data_chat_template(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match="d.jsonl:1: .*set data.chat_template"):
        prepare_sft(_cfg(src), str(tmp_path / "cache"), 256, TOK)


def test_template_that_rewrites_earlier_turns_is_refused_by_name(tmp_path):
    last_only = tmp_path / "last.jinja"
    last_only.write_text("{{ messages[-1]['content'] }}")
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match="last.jinja is not prefix-stable"):
        prepare_sft(_cfg(src, chat_template=str(last_only)), str(tmp_path / "cache"), 256, TOK)


def test_template_raise_exception_is_a_bad_example(tmp_path):
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}{% endif %}"
                      + _demo_template())
    src = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(DataError, match="d.jsonl:1: chat template .*strict.jinja failed.*start with a user turn"):
        prepare_sft(_cfg(src, chat_template=str(strict)), str(tmp_path / "cache"), 256, TOK)


# ----------------------------------------------------------------------------- shipped demo


def test_shipped_demo_set_prepares_cleanly_at_seq_len_256(tmp_path):
    cfg = DataConfig(format="sft", source=DEMO, chat_template=DEMO_TEMPLATE, tokenizer="byte")
    corpus = prepare_sft(cfg, str(tmp_path / "cache"), 256, TOK)
    m = corpus.manifest
    assert m["skipped"] == {}
    assert corpus.num_examples("train") + corpus.num_examples("val") == 64
    examples = corpus.examples("train")
    assert all(len(t) <= 257 and t[loss][-1] == TOK.eos_id for t, loss in examples)
    it = SFTBatches(examples, batch_size=4, seq_len=256, rank=0, world_size=1, seed=0)
    assert 0 < it.loss_fraction < 1 - it.padding_fraction
