"""train/data.py: corpus reading, tokenized shard cache, and resumable data-parallel batches."""

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymoe.config import DataConfig
from raymoe.train.data import (
    BatchIterator,
    ByteTokenizer,
    DataError,
    eval_batches,
    get_tokenizer,
    prepare_corpus,
)

TOK = ByteTokenizer()


def _docs(corpus, split):
    """The documents of a split, decoded, in stream order."""
    tokens = corpus.tokens(split)
    ends = np.flatnonzero(tokens == TOK.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [TOK.decode(tokens[s:e]) for s, e in zip(starts, ends)]


def _write_many_docs(root, n=200):
    root.mkdir(exist_ok=True)
    texts = [f"document number {i}: " + "xyz" * (i % 7 + 5) for i in range(n)]
    with open(root / "docs.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def _cache_files(d):
    return {name: os.stat(os.path.join(d, name)).st_mtime_ns for name in sorted(os.listdir(d))}


# ----------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trips_non_ascii_and_drops_specials():
    text = "héllo — 世界 🙂\n"
    ids = TOK.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    assert TOK.decode([TOK.bos_id, *ids.tolist(), TOK.eos_id, TOK.pad_id, 259]) == text
    assert TOK.decode(torch.tensor([104, 105])) == "hi"
    assert TOK.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte char decodes to the replacement char
    assert (TOK.vocab_size, TOK.bos_id, TOK.eos_id, TOK.pad_id) == (260, 256, 257, 258)
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(DataError, match="data.tokenizer='bpe'"):
        get_tokenizer("bpe")


# ----------------------------------------------------------------------------- reading


def test_reads_txt_jsonl_and_parquet_documents_from_a_directory(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("plain text file ü\nsecond line\n")
    (src / "sub" / "b.jsonl").write_text('{"body": "json one", "id": 1}\n\n{"body": "json two"}\n')
    pq.write_table(pa.table({"body": ["parquet one", None, "parquet two"]}), src / "c.parquet")
    (src / "ignored.csv").write_text("not,read\n")
    (src / ".hidden").mkdir()
    (src / ".hidden" / "x.txt").write_text("hidden, not read")

    corpus = prepare_corpus(DataConfig(source=str(src), text_field="body", val_fraction=0.3), str(tmp_path / "cache"), seq_len=4)

    docs = _docs(corpus, "train") + _docs(corpus, "val")
    assert sorted(docs) == sorted(["plain text file ü\nsecond line\n", "json one", "json two", "parquet one", "parquet two"])
    m = corpus.manifest
    assert m["num_files"] == 3 and m["tokenizer"] == "byte"
    assert m["splits"]["train"]["num_docs"] + m["splits"]["val"]["num_docs"] == 5
    assert m["splits"]["val"]["num_docs"] >= 1 and m["splits"]["train"]["num_docs"] >= 1
    assert corpus.num_tokens("train") + corpus.num_tokens("val") == sum(len(d.encode()) + 1 for d in docs)


def test_uri_source_gives_the_same_tokens_as_the_local_path(tmp_path):
    texts = _write_many_docs(tmp_path / "src", n=30)
    cfg_local = DataConfig(source=str(tmp_path / "src"), val_fraction=0.2)
    cfg_uri = DataConfig(source=f"file://{tmp_path / 'src'}", val_fraction=0.2)
    local = prepare_corpus(cfg_local, str(tmp_path / "cache"), seq_len=8)
    uri = prepare_corpus(cfg_uri, str(tmp_path / "cache"), seq_len=8)
    assert uri.manifest["token_sha256"] == local.manifest["token_sha256"]
    assert sorted(_docs(uri, "train") + _docs(uri, "val")) == sorted(texts)


def test_stdlib_default_source_is_capped_by_max_bytes(tmp_path):
    corpus = prepare_corpus(DataConfig(max_bytes=2_000_000), str(tmp_path), seq_len=128)
    m = corpus.manifest
    num_docs = m["splits"]["train"]["num_docs"] + m["splits"]["val"]["num_docs"]
    text_bytes = corpus.num_tokens("train") + corpus.num_tokens("val") - num_docs
    # The last file is cut at a character boundary, losing at most 3 bytes of a multi-byte char.
    assert 2_000_000 - 3 <= text_bytes <= 2_000_000
    assert m["source"].startswith("python-stdlib:")
    assert m["splits"]["val"]["num_docs"] >= 1
    assert "def " in TOK.decode(corpus.tokens("train")[:200_000])


# ----------------------------------------------------------------------------- errors


def _prepare(tmp_path, source, **kw):
    return prepare_corpus(DataConfig(source=str(source), **kw), str(tmp_path / "cache"), seq_len=4)


def test_missing_source_path_says_which_setting(tmp_path):
    with pytest.raises(DataError, match=r"data.source='.*nope' does not exist"):
        _prepare(tmp_path, tmp_path / "nope")


def test_directory_without_supported_files_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"contains no \.txt, \.jsonl or \.parquet files"):
        _prepare(tmp_path, tmp_path / "src")


def test_only_empty_files_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("")
    (tmp_path / "src" / "b.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"holds no text \(2 files"):
        _prepare(tmp_path, tmp_path / "src")


def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: line is not valid JSON"):
        _prepare(tmp_path, path)


def test_jsonl_record_without_the_field_names_field_and_setting(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "other field"}\n')
    with pytest.raises(DataError) as e:
        _prepare(tmp_path, path)
    msg = str(e.value)
    assert "docs.jsonl:2" in msg and "no field 'text'" in msg and "content" in msg and "data.text_field" in msg


def test_parquet_without_the_column_lists_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    with pytest.raises(DataError, match=r"t\.parquet: no column 'text' \(columns: body\); set data.text_field"):
        _prepare(tmp_path, path)


def test_too_few_tokens_for_a_sequence_or_a_batch_says_how_many(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("0123456789")
    with pytest.raises(DataError, match=r"has \d+ tokens but one sequence needs train.seq_len\+1=65"):
        prepare_corpus(DataConfig(source=str(path)), str(tmp_path / "cache"), seq_len=64)
    with pytest.raises(DataError, match=r"has 100 tokens = 9 sequences .* needs train.batch_size\*workers=4\*3=12 sequences \(133 tokens\)"):
        BatchIterator(np.zeros(100, np.uint16), batch_size=4, seq_len=11, rank=0, world_size=3, seed=0)


# ----------------------------------------------------------------------------- bytes that are not UTF-8

CLEAN = "".join(f"line {i}: plain text, caf\u00e9\n" for i in range(40)).encode()  # ~1 KB of valid UTF-8


def _corpus_dir(tmp_path, **files: bytes):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    return src


def test_clean_utf8_txt_gives_no_warning_and_an_empty_record(tmp_path):
    src = _corpus_dir(tmp_path, **{"a.txt": CLEAN, "b.txt": "another document, na\u00efve\n".encode() * 20})
    logs = []
    corpus = prepare_corpus(DataConfig(source=str(src)), str(tmp_path / "cache"), seq_len=8, log=logs.append)
    assert not [line for line in logs if line.startswith("warning")]
    assert corpus.manifest["undecodable_bytes"] == {}


def test_a_few_bytes_that_are_not_utf8_warn_with_the_count_and_file_on_every_run(tmp_path):
    latin = CLEAN[:500] + b"na\xefve r\xe9sum\xe9\n" + CLEAN[500:]  # three Latin-1 bytes
    src = _corpus_dir(tmp_path, **{"clean.txt": CLEAN, "latin.txt": latin})
    cfg = DataConfig(source=str(src))
    first_logs, second_logs = [], []
    first = prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=8, log=first_logs.append)
    second = prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=8, log=second_logs.append)

    path = str(src / "latin.txt")
    warning = (f"warning: {path}: 3 of {len(latin)} bytes are not valid UTF-8 and were read as U+FFFD; "
               "convert the file to UTF-8 to train on its exact text")
    assert [line for line in first_logs if line.startswith("warning")] == [warning]
    assert second.reused and [line for line in second_logs if line.startswith("warning")] == [warning]
    assert first.manifest["undecodable_bytes"] == {path: {"bytes": 3, "size": len(latin)}}
    # The tokens are those of errors="replace", as caches written before the count hold.
    assert sorted(_docs(first, "train") + _docs(first, "val")) == sorted([CLEAN.decode(), latin.decode("utf-8", "replace")])


def test_a_mostly_binary_txt_file_is_refused_naming_file_and_count(tmp_path):
    blob = bytes(range(128, 256)) * 8  # 1024 bytes, none of them valid UTF-8 on its own
    src = _corpus_dir(tmp_path, **{"clean.txt": CLEAN, "model.bin.txt": blob})
    with pytest.raises(DataError) as e:
        prepare_corpus(DataConfig(source=str(src)), str(tmp_path / "cache"), seq_len=8)
    assert str(e.value) == (
        f"{src / 'model.bin.txt'}: 1024 of its 1024 bytes (100.0%) are not valid UTF-8, more than the 1% tolerated: "
        "it is binary or in another encoding; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or move it out of data.source"
    )
    assert os.listdir(tmp_path / "cache") == []  # no half-written cache left behind


def test_more_than_one_percent_of_bytes_not_utf8_is_refused_and_one_percent_is_not(tmp_path):
    text = b"x" * 197 + b"\n"
    src = _corpus_dir(tmp_path, **{"a.txt": text + b"\xff\xfe", "b.txt": CLEAN})  # 2 of 200 bytes: tolerated
    corpus = prepare_corpus(DataConfig(source=str(src)), str(tmp_path / "cache"), seq_len=8)
    assert corpus.manifest["undecodable_bytes"] == {str(src / "a.txt"): {"bytes": 2, "size": 200}}
    (src / "a.txt").write_bytes(text + b"\xff\xfe\xfd")  # 3 of 201
    with pytest.raises(DataError, match=r"a\.txt: 3 of its 201 bytes \(1\.5%\) are not valid UTF-8, more than the 1% tolerated"):
        prepare_corpus(DataConfig(source=str(src)), str(tmp_path / "cache"), seq_len=8)


def test_a_cache_from_before_the_count_is_reused_and_gets_its_count_once(tmp_path):
    latin = CLEAN + b"caf\xe9\n"
    src = _corpus_dir(tmp_path, **{"clean.txt": CLEAN, "latin.txt": latin})
    cfg = DataConfig(source=str(src))
    built = prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=8)
    manifest_path = os.path.join(built.dir, "manifest.json")
    legacy = {k: v for k, v in built.manifest.items() if k != "undecodable_bytes"}  # as written before the count
    with open(manifest_path, "w") as f:
        json.dump(legacy, f)
    shards = {name: mtime for name, mtime in _cache_files(built.dir).items() if name.endswith(".parquet")}

    logs = []
    reused = prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=8, log=logs.append)
    assert reused.reused and reused.dir == built.dir  # same fingerprint: the old cache stays valid
    assert {n: m for n, m in _cache_files(built.dir).items() if n.endswith(".parquet")} == shards
    assert any(line.startswith("counting bytes that are not UTF-8") for line in logs)
    assert [line for line in logs if line.startswith("warning")] == [
        f"warning: {src / 'latin.txt'}: 1 of {len(latin)} bytes are not valid UTF-8 and were read as U+FFFD; "
        "convert the file to UTF-8 to train on its exact text"
    ]
    with open(manifest_path) as f:
        assert json.load(f) == {**legacy, "undecodable_bytes": {str(src / "latin.txt"): {"bytes": 1, "size": len(latin)}}}
    assert sorted(os.listdir(built.dir)) == sorted([*shards, "manifest.json"])

    # The next run warns from the manifest without counting again.
    logs.clear()
    prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=8, log=logs.append)
    assert not any(line.startswith("counting") for line in logs)
    assert sum(line.startswith("warning") for line in logs) == 1


# ----------------------------------------------------------------------------- cache


def test_second_prepare_reuses_shards_without_rewriting_them(tmp_path):
    _write_many_docs(tmp_path / "src")
    cfg = DataConfig(source=str(tmp_path / "src"), shard_tokens=1000)
    logs = []
    first = prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=16, log=logs.append)
    before = _cache_files(first.dir)
    second = prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=16, log=logs.append)

    assert (first.reused, second.reused) == (False, True)
    assert second.dir == first.dir and second.manifest == first.manifest
    assert _cache_files(second.dir) == before
    assert {"manifest.json", "train-00000.parquet", "train-00001.parquet", "val-00000.parquet"} <= set(before)
    assert logs[0].startswith("tokenized 200 docs") and logs[1].startswith("reusing")
    assert np.array_equal(first.tokens("train"), second.tokens("train"))
    # Nothing but the finished fingerprint directory is left in the cache.
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first.dir)]


def test_changed_file_or_setting_gets_a_new_fingerprint(tmp_path):
    _write_many_docs(tmp_path / "src")
    cfg = DataConfig(source=str(tmp_path / "src"))
    first = prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=16)
    with open(tmp_path / "src" / "docs.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    changed = prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=16)
    other_split = prepare_corpus(DataConfig(source=str(tmp_path / "src"), val_fraction=0.1), str(tmp_path / "cache"), seq_len=16)

    assert not changed.reused and changed.dir != first.dir
    assert changed.manifest["splits"]["train"]["num_docs"] + changed.manifest["splits"]["val"]["num_docs"] == 201
    assert not other_split.reused and len({first.dir, changed.dir, other_split.dir}) == 3


def test_corrupted_shard_is_detected_and_names_the_file(tmp_path):
    _write_many_docs(tmp_path / "src")
    corpus = prepare_corpus(DataConfig(source=str(tmp_path / "src")), str(tmp_path / "cache"), seq_len=16)
    shard = os.path.join(corpus.dir, "train-00000.parquet")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(shard, "wb") as f:
        f.write(data)
    with pytest.raises(DataError, match=r"train-00000\.parquet: shard is corrupted .* delete .* to re-tokenize"):
        corpus.tokens("train")


def test_concurrent_writers_end_with_one_cache_dir(tmp_path):
    _write_many_docs(tmp_path / "src")
    cfg = DataConfig(source=str(tmp_path / "src"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_corpus(cfg, str(tmp_path / "cache"), seq_len=16))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len({r.dir for r in results}) == 1
    assert len({r.manifest["token_sha256"] for r in results}) == 1
    assert os.listdir(tmp_path / "cache") == [os.path.basename(results[0].dir)]


# ----------------------------------------------------------------------------- splits


def test_val_and_train_documents_are_disjoint_and_deterministic(tmp_path):
    texts = _write_many_docs(tmp_path / "src", n=400)
    cfg = DataConfig(source=str(tmp_path / "src"), val_fraction=0.1)
    a = prepare_corpus(cfg, str(tmp_path / "cache_a"), seq_len=16)
    b = prepare_corpus(cfg, str(tmp_path / "cache_b"), seq_len=16)
    train, val = _docs(a, "train"), _docs(a, "val")

    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(texts)
    assert 15 <= len(val) <= 70  # ~10% of 400
    assert b.manifest["splits"] == a.manifest["splits"]


def test_single_document_is_split_by_tokens(tmp_path):
    text = "".join(f"line {i}\n" for i in range(200))
    (tmp_path / "one.txt").write_text(text)
    corpus = prepare_corpus(DataConfig(source=str(tmp_path / "one.txt"), val_fraction=0.25), str(tmp_path / "cache"), seq_len=8)
    train, val = corpus.tokens("train"), corpus.tokens("val")
    assert np.array_equal(np.concatenate([train, val]), np.append(TOK.encode(text), TOK.eos_id))
    assert len(val) == round(0.25 * (len(text) + 1))


# ----------------------------------------------------------------------------- batches

SEQ = 4


def _window_ids(inputs):
    # With tokens = arange, a window's first token / SEQ is its index.
    return (inputs[:, 0] // SEQ).tolist()


def _stream(num_windows):
    return np.arange(num_windows * SEQ + 1, dtype=np.uint16)


def test_targets_are_inputs_shifted_by_one_at_window_offsets():
    it = BatchIterator(_stream(50), batch_size=6, seq_len=SEQ, rank=0, world_size=1, seed=3)
    for _ in range(20):  # several epochs
        inputs, targets = it.next_batch()
        assert inputs.dtype == targets.dtype == torch.long and inputs.shape == (6, SEQ)
        assert torch.equal(targets[:, :-1], inputs[:, 1:]) and torch.equal(targets, inputs + 1)
        assert bool((inputs[:, 0] % SEQ == 0).all())


def test_each_epoch_visits_every_window_once_in_a_seeded_order():
    it = BatchIterator(_stream(24), batch_size=4, seq_len=SEQ, rank=0, world_size=2, seed=7)
    seen = []
    for _ in range(3):
        seen += _window_ids(it.next_batch()[0])
        it.rank, it.position = 1, it.position - 8
        seen += _window_ids(it.next_batch()[0])
        it.rank = 0
    assert sorted(seen) == list(range(24))
    assert it.state() == {"position": 24, "epoch": 1}
    assert seen == np.random.default_rng([7, 0]).permutation(24).tolist()


def test_same_seed_gives_same_batches_and_other_seed_differs():
    make = lambda seed: BatchIterator(_stream(100), batch_size=4, seq_len=SEQ, rank=1, world_size=2, seed=seed)
    a, b, c = make(0), make(0), make(1)
    batches_a = [a.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(x, b.next_batch()[0]) for x in batches_a)
    assert not all(torch.equal(x, c.next_batch()[0]) for x in batches_a)


def test_rank_slices_partition_the_global_batch():
    tokens = _stream(40)
    for position in (0, 12, 37):  # 37 straddles the epoch boundary
        whole = BatchIterator(tokens, batch_size=6, seq_len=SEQ, rank=0, world_size=1, seed=5, position=position).next_batch()
        parts = [BatchIterator(tokens, batch_size=3, seq_len=SEQ, rank=r, world_size=2, seed=5, position=position).next_batch() for r in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_resume_from_state_reproduces_the_next_batches():
    tokens = _stream(30)
    it = BatchIterator(tokens, batch_size=4, seq_len=SEQ, rank=1, world_size=2, seed=9)
    for _ in range(5):
        it.next_batch()
    state = it.state()
    assert state == {"position": 40, "epoch": 1}
    resumed = BatchIterator(tokens, batch_size=4, seq_len=SEQ, rank=1, world_size=2, seed=9, position=state["position"])
    for _ in range(6):
        assert torch.equal(it.next_batch()[0], resumed.next_batch()[0])


def test_resume_at_a_different_world_size_continues_the_global_window_sequence():
    tokens, seed = _stream(21), 11

    def run_steps(world_size, batch_size, position, steps):
        ranks = [BatchIterator(tokens, batch_size=batch_size, seq_len=SEQ, rank=r, world_size=world_size, seed=seed, position=position) for r in range(world_size)]
        windows = []
        for _ in range(steps):
            for it in ranks:  # ranks' batches in rank order make up one global batch
                windows += _window_ids(it.next_batch()[0])
        assert len({it.state()["position"] for it in ranks}) == 1
        return windows, ranks[0].state()["position"]

    first, position = run_steps(world_size=4, batch_size=2, position=0, steps=3)
    second, position = run_steps(world_size=2, batch_size=3, position=position, steps=4)
    reference, _ = run_steps(world_size=1, batch_size=1, position=0, steps=len(first) + len(second))
    assert position == 24 + 24
    assert first + second == reference


def test_eval_batches_are_fixed_in_order_and_rank_striped():
    tokens = _stream(10)
    whole = eval_batches(tokens, batch_size=4, seq_len=SEQ, num_batches=3, rank=0, world_size=1)
    assert [_window_ids(b[0]) for b in whole] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]  # wraps around
    assert all(torch.equal(b[1], b[0] + 1) for b in whole)
    rank0 = eval_batches(tokens, batch_size=2, seq_len=SEQ, num_batches=3, rank=0, world_size=2)
    rank1 = eval_batches(tokens, batch_size=2, seq_len=SEQ, num_batches=3, rank=1, world_size=2)
    for w, r0, r1 in zip(whole, rank0, rank1):
        assert torch.equal(torch.cat([r0[0], r1[0]]), w[0])
    again = eval_batches(tokens, batch_size=4, seq_len=SEQ, num_batches=3, rank=0, world_size=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, again))
    with pytest.raises(DataError, match=r"validation split has 3 tokens"):
        eval_batches(np.zeros(3, np.uint16), batch_size=1, seq_len=SEQ, num_batches=1, rank=0, world_size=1)
