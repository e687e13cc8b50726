"""The serving engine without Ray: KV cache, continuous batching, sampling, stop strings, loading."""

from __future__ import annotations


import time

import pytest
import torch

from raymoe.config import config_from_dict
from raymoe.model.transformer import KVCache, MoETransformer
from raymoe.serve.engine import Engine, RequestError, SamplingParams, load_model, sample_batch
from raymoe.train.data import ByteTokenizer

LAYOUTS = {
    "mha": {},
    "gqa-sliding": {"num_kv_heads": 2, "sliding_window": 8, "global_every": 2},
    "mla": {"attention": "mla", "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16},
    "mla-qlora": {"attention": "mla", "q_lora_rank": 24, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16},
    "mla-sliding": {"attention": "mla", "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                    "sliding_window": 8, "global_every": 2},
}


def tiny_model(**model):
    cfg = config_from_dict({"model": {"hidden_size": 64, "num_layers": 2, "max_seq_len": 64, "first_k_dense_layers": 1, **model},
                            "train": {"seq_len": 32}}).model
    m = MoETransformer(cfg)
    m.init_weights(0)
    return m.eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_decoding_of_ragged_rows_equals_the_full_causal_pass(layout):
    model = tiny_model(**LAYOUTS[layout])
    x = torch.randint(0, 260, (3, 20))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(model, max_batch=4, max_len=64)
        slots = torch.tensor([3, 0, 2])
        # Rows prefilled to different lengths, then decoded together: each attends only to its own past.
        lengths = [12, 7, 15]
        for r, n in enumerate(lengths):
            out = model(x[r : r + 1, :n], cache, slots[r : r + 1], torch.arange(n)[None]).logits
            torch.testing.assert_close(out[0], full[r, :n], atol=2e-5, rtol=0)
        pos = torch.tensor(lengths)
        for _ in range(4):
            out = model(x[torch.arange(3), pos][:, None], cache, slots, pos[:, None]).logits
            torch.testing.assert_close(out[:, 0], full[torch.arange(3), pos], atol=2e-5, rtol=0)
            pos = pos + 1


def test_mla_decode_steps_attend_in_latent_space_with_the_expanded_forms_numbers(monkeypatch):
    from raymoe.model.attention import MLAttention

    model = tiny_model(**LAYOUTS["mla-sliding"], num_layers=3)
    calls = []
    latent = MLAttention._attend_latent
    monkeypatch.setattr(MLAttention, "_attend_latent", lambda self, *a: calls.append(1) or latent(self, *a))
    x = torch.randint(0, 260, (2, 30))
    logits = {}
    with torch.no_grad():
        for absorb in (True, False):
            monkeypatch.setattr(MLAttention, "absorb", absorb)
            cache, slots = KVCache(model, max_batch=2, max_len=64), torch.tensor([1, 0])
            model(x[:, :10], cache, slots, torch.arange(10).expand(2, 10))  # prefill: expanded either way
            logits[absorb] = torch.stack([model(x[:, p : p + 1], cache, slots, torch.full((2, 1), p)).logits[:, 0]
                                          for p in range(10, 30)])  # past the sliding window of 8
    assert len(calls) == 20 * 3  # every decode step of every layer, none of the prefill
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=0)


def test_a_cached_forward_builds_each_windows_mask_once_for_all_layers(monkeypatch):
    import raymoe.model.attention as attention

    model = tiny_model(**LAYOUTS["mla-sliding"], num_layers=4)  # local, global, local, global
    built = []
    real = attention.cached_mask
    monkeypatch.setattr(attention, "cached_mask", lambda pos, n, window: built.append(window) or real(pos, n, window))
    cache, slots = KVCache(model, max_batch=2, max_len=32), torch.tensor([0, 1])
    with torch.no_grad():
        model(torch.randint(0, 260, (2, 10)), cache, slots, torch.arange(10).expand(2, 10))
        assert sorted(built, key=str) == [8, None]  # prefill: one mask per window, not per layer
        built.clear()
        model(torch.randint(0, 260, (2, 1)), cache, slots, torch.full((2, 1), 10))
        assert sorted(built, key=str) == [8, None]  # a decode step likewise


def test_mla_cache_stores_only_the_latent_and_the_rotary_key():
    mla, mha = tiny_model(**LAYOUTS["mla"]), tiny_model(num_heads=4)
    # Per token and layer: latent 32 + rotary key 8 floats, against k and v of 4 heads x 16 dims.
    assert KVCache(mla, 1, 8).bytes_per_token() == 2 * (32 + 8) * 4
    assert KVCache(mha, 1, 8).bytes_per_token() == 2 * (2 * 4 * 16) * 4


def test_greedy_generation_matches_the_uncached_reference():
    model, tok = tiny_model(**LAYOUTS["mla"]), ByteTokenizer()
    got = Engine(model, tok, max_batch=2).generate("def f", SamplingParams(max_tokens=24, temperature=0))
    ref = model.generate([int(t) for t in tok.encode("def f")], 24, temperature=0)
    assert got.text == tok.decode(ref) and got.finish_reason == "length" and got.completion_tokens == 24


def test_requests_join_and_leave_the_running_batch_between_decode_steps():
    model, tok = tiny_model(), ByteTokenizer()
    engine = Engine(model, tok, max_batch=3)
    reqs = [engine.add_request(f"p{i}", SamplingParams(max_tokens=4 + 3 * i, temperature=0.9, seed=i)) for i in range(5)]
    running_sizes = []
    while engine.has_work():
        engine.step()
        running_sizes.append(len(engine.running))
    assert [len(r.output_ids) for r in reqs] == [4, 7, 10, 13, 16]
    assert max(running_sizes) == 3  # never more than the cache rows
    # p0-p2 arrive together with prompts of one length: one prefill forward; p3 and p4 join later, one each.
    assert engine.stats["prefills"] == 3
    # Fewer decode steps than running everything one after another: sequences shared steps.
    assert engine.stats["decode_steps"] < sum(len(r.output_ids) - 1 for r in reqs)
    # Batching does not change what a seeded request samples.
    for i in (0, 3):  # prefilled in a batch of three, and alone
        solo = Engine(model, tok, max_batch=1).generate(f"p{i}", SamplingParams(max_tokens=4 + 3 * i, temperature=0.9, seed=i))
        assert solo.text == reqs[i].text


def test_waiting_prompts_of_several_lengths_are_prefilled_one_forward_per_length():
    model, tok = tiny_model(), ByteTokenizer()
    engine = Engine(model, tok, max_batch=8)
    prompts = ["ab", "cd", "efg", "hij", "klmn", "op"]
    reqs = [engine.add_request(p, SamplingParams(max_tokens=5, temperature=0)) for p in prompts]
    while engine.has_work():
        engine.step()
    assert engine.stats["prefills"] == 3  # lengths 2, 3 and 4
    for p, r in zip(prompts, reqs):
        assert r.text == Engine(model, tok, max_batch=1).generate(p, SamplingParams(max_tokens=5, temperature=0)).text, p


def test_seed_makes_sampling_reproducible_and_top_k_1_is_greedy():
    model, tok = tiny_model(), ByteTokenizer()
    a = Engine(model, tok).generate("x", SamplingParams(max_tokens=16, temperature=1.0, seed=7))
    b = Engine(model, tok).generate("x", SamplingParams(max_tokens=16, temperature=1.0, seed=7))
    greedy = Engine(model, tok).generate("x", SamplingParams(max_tokens=16, temperature=0))
    top1 = Engine(model, tok).generate("x", SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=3))
    assert a.text == b.text and top1.text == greedy.text


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(3000, 4)
    tokens = sample_batch(logits, [SamplingParams(top_p=0.7)] * 3000, torch.rand(3000, generator=torch.Generator().manual_seed(0)))
    assert set(tokens.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn
    assert (tokens == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalized over what stays


def test_one_batched_draw_follows_each_rows_own_temperature_top_k_and_top_p():
    """Rows with different sampling settings in one batch: each row's empirical distribution is
    its own filtered softmax (3 sigma bounds), greedy rows are the argmax."""
    g = torch.Generator().manual_seed(1)
    logits_V = torch.randn(6, generator=g) * 2
    settings = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=3),
                SamplingParams(temperature=2.0, top_p=0.6)]
    n = 4000
    params = [p for p in settings for _ in range(n)]
    tokens = sample_batch(logits_V.expand(len(params), 6), params, torch.rand(len(params), generator=g)).view(len(settings), n)
    assert (tokens[0] == logits_V.argmax()).all()
    for row, p in zip(tokens[1:], settings[1:]):
        probs = (logits_V / p.temperature).softmax(-1)
        if p.top_k:
            probs[probs.argsort(descending=True)[p.top_k:]] = 0
        if p.top_p < 1:
            order = probs.argsort(descending=True)
            drop = probs[order].cumsum(0) - probs[order] >= p.top_p
            probs[order[drop]] = 0
        probs = probs / probs.sum()
        freq = torch.bincount(row, minlength=6).double() / n
        assert ((freq - probs.double()).abs() <= 3 * (probs.double() * (1 - probs.double()) / n).sqrt() + 1e-9).all(), (p, freq, probs)


def _forced_engine(text: str, **params):
    """The real engine, its logits overridden so that it spells `text` then EOS: the stop-string
    and finish logic is what is under test, not the model."""
    model, tok = tiny_model(num_experts=0), ByteTokenizer()
    targets = list(text.encode())
    engine = Engine(model, tok, max_batch=1)
    orig = engine._forward

    def forward(slots, tokens, start):
        logits = orig(slots, tokens, start)
        req = next(iter(engine.running.values()))
        nxt = targets[len(req.output_ids)] if len(req.output_ids) < len(targets) else tok.eos_id
        forced = torch.full_like(logits, -1e9)
        forced[:, nxt] = 0
        return forced

    engine._forward = forward
    return engine.generate("a", SamplingParams(temperature=0, **params))


def test_stop_string_ends_generation_before_it():
    out = _forced_engine("hello world. more", max_tokens=40, stop=(". ",))
    assert out.text == "hello world" and out.finish_reason == "stop"


def test_eos_ends_generation_with_stop_and_max_tokens_with_length():
    assert _forced_engine("hi", max_tokens=40).finish_reason == "stop"
    out = _forced_engine("abcdefgh", max_tokens=3)
    assert out.text == "abc" and out.finish_reason == "length"


def test_bad_requests_are_refused_with_a_clear_error():
    engine = Engine(tiny_model(), ByteTokenizer(), max_batch=1, max_len=16)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(RequestError, match="at most 15"):
        engine.add_request("x" * 16, SamplingParams())
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)


def test_engine_counts_tokens_per_expert_per_layer():
    model = tiny_model(num_experts=4, top_k=2)
    engine = Engine(model, ByteTokenizer(), max_batch=2)
    engine.generate("abc", SamplingParams(max_tokens=5, temperature=0))
    # 3 prompt tokens + 4 decoded inputs, 2 experts each, one MoE layer.
    assert engine.load.shape == (1, 4) and int(engine.load.sum()) == (3 + 4) * 2


def test_load_model_reads_a_model_directory_and_refuses_anything_else(tmp_path):
    from raymoe.model_dir import save_model

    model = tiny_model()
    cfg = config_from_dict({"name": "tiny", "model": model.cfg.__dict__ | {"balance": {}}, "train": {"seq_len": 32}})
    d = tmp_path / "model"
    save_model(model, cfg, str(d))
    loaded_cfg, loaded = load_model(str(d))
    assert loaded_cfg.name == "tiny"
    x = torch.randint(0, 260, (1, 10))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    with pytest.raises(RequestError, match="not a model"):
        load_model(str(tmp_path))


def test_micro_batched_decoding_gives_the_same_tokens_and_builds_no_autograd_graph():
    model, tok = tiny_model(**LAYOUTS["mla"]), ByteTokenizer()
    modes = []  # per forward, in whatever thread ran it: grad mode is thread-local
    model.embed.register_forward_hook(lambda m, a, out: modes.append((torch.is_inference_mode_enabled(), out.requires_grad)))
    texts = {}
    for micro in (1, 2, 3):
        engine = Engine(model, tok, max_batch=5, micro_batches=micro)
        reqs = [engine.add_request(f"q{i}", SamplingParams(max_tokens=12, temperature=0)) for i in range(5)]
        while engine.has_work():
            engine.step()
        texts[micro] = [r.text for r in reqs]
    assert texts[1] == texts[2] == texts[3]
    assert len(modes) > 30 and all(inference and not grad for inference, grad in modes)


def test_batched_greedy_and_per_request_sampling_mix_in_one_step():
    """Greedy rows take one argmax over the batch; sampled rows keep their own seeded generators,
    so each request's tokens do not depend on what else shares its batch."""
    model, tok = tiny_model(**LAYOUTS["mla"]), ByteTokenizer()
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, seed=7)
    alone = Engine(model, tok, max_batch=4).generate("abc", sampled).text
    greedy_alone = Engine(model, tok, max_batch=4).generate("xyz", SamplingParams(max_tokens=10, temperature=0)).text
    engine = Engine(model, tok, max_batch=4)
    reqs = [engine.add_request("xyz", SamplingParams(max_tokens=10, temperature=0)), engine.add_request("abc", sampled),
            engine.add_request("xyz", SamplingParams(max_tokens=10, temperature=0))]
    while engine.has_work():
        engine.step()
    assert [r.text for r in reqs] == [greedy_alone, alone, greedy_alone]


def test_threaded_engine_reports_every_finished_request_once_aborted_ones_too():
    """on_finish feeds the serving metrics: each request once, with its finish reason and timings."""
    import asyncio

    from raymoe.serve.engine import ThreadedEngine

    finished = []
    threaded = ThreadedEngine(Engine(tiny_model(), ByteTokenizer(), max_batch=4), on_finish=finished.append)

    async def run():
        done = await asyncio.gather(*(threaded.complete(p, SamplingParams(max_tokens=6, temperature=0)) for p in ("ab", "cd")))
        stream = threaded.stream("ef", SamplingParams(max_tokens=40, temperature=0))
        await stream.__anext__()
        await stream.aclose()  # the client goes away mid-stream
        return done

    done = asyncio.run(run())
    deadline = time.time() + 10
    while len(finished) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert [c.completion_tokens for c in done] == [6, 6]
    assert sorted(r.finish_reason for r in finished) == ["abort", "length", "length"]
    for r in finished:
        assert r.first_token_at >= r.arrival
    assert sorted(len(r.output_ids) for r in finished if r.finish_reason == "length") == [6, 6]


def test_logprobs_of_prompt_and_completion_are_the_models_own_log_softmax():
    """What /v1/completions' logprobs and echo report (lm-evaluation-harness scores with them):
    each prompt token after the first and each generated token, with the top alternatives, equal to
    a full uncached forward's log_softmax; a request without logprobs in the same batch gets none."""
    model, tok = tiny_model(**LAYOUTS["mla"]), ByteTokenizer()
    engine = Engine(model, tok, max_batch=4)
    scored = engine.add_request("hello world", SamplingParams(max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=True))
    sampled = engine.add_request("hello world", SamplingParams(max_tokens=5, temperature=1.0, seed=3, logprobs=2))
    plain = engine.add_request("hello world", SamplingParams(max_tokens=5, temperature=0))
    while engine.has_work():
        engine.step()
    assert plain.logprobs == [] and plain.prompt_logprobs == [] and sampled.prompt_logprobs == []
    for req, k in ((scored, 3), (sampled, 2)):
        full = req.prompt_ids + req.output_ids
        with torch.no_grad():
            ref = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
        P = len(req.prompt_ids)
        rows = list(range(P - 1)) if req.params.prompt_logprobs else []
        entries = req.prompt_logprobs + req.logprobs
        positions = rows + [P - 1 + t for t in range(len(req.output_ids))]
        assert len(entries) == len(positions) == (P - 1 if rows else 0) + 5
        for (lp, top), j in zip(entries, positions):
            assert lp == pytest.approx(ref[j, full[j + 1]].item(), abs=1e-4)
            want = ref[j].topk(k)
            assert [t for t, _ in top] == want.indices.tolist()
            assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)
    # Greedy: every generated token is the most likely one.
    assert all(lp == pytest.approx(top[0][1]) for lp, top in scored.logprobs)
    assert plain.output_ids == scored.output_ids


@pytest.mark.slow
def test_compiled_decode_generates_what_the_eager_engine_generates():
    """compile_decode on the grouped expert path (one row: the opaque grouped_mm op) and the
    every-expert path (four rows), with prompts of unequal lengths in one batch."""
    eager = tiny_model(**LAYOUTS["mla"], num_experts=8, top_k=2)
    compiled = tiny_model(**LAYOUTS["mla"], num_experts=8, top_k=2)
    compiled.compile_decode()
    tok, params = ByteTokenizer(), SamplingParams(max_tokens=12, temperature=0)
    for prompts in (["def f"], ["def f", "import os", "x", "class A:\n"]):
        outs = []
        for model in (eager, compiled):
            engine = Engine(model, tok, max_batch=len(prompts))
            reqs = [engine.add_request(p, params) for p in prompts]
            while engine.has_work():
                engine.step()
            outs.append([r.output_ids for r in reqs])
        assert outs[0] == outs[1] and all(len(ids) == 12 for ids in outs[0])
    assert all(b.decode_fn is not None for b in compiled.layers)

    # What a Router replica runs before it is ready: every batch size class once, then clean counters.
    engine, lines = Engine(compiled, tok, max_batch=4), []
    engine.warm_up(log=lines.append)
    assert [line.split(" of ")[1].split(" row")[0] for line in lines] == ["1", "2", "4"]
    assert engine.stats == {"decode_steps": 0, "prefills": 0, "tokens": 0} and int(engine.load.sum()) == 0
    assert not engine.has_work() and engine.generate("def f", params).completion_tokens == 12


@pytest.mark.parametrize("experts", ["cpu-paths", "grouped"])
def test_static_decode_steps_generate_what_the_dynamic_ones_do(experts, monkeypatch):
    """Engine(cuda_graphs=True) on a CPU model runs the very steps a GPU captures, eagerly: rows
    padded to a batch bucket into the scratch cache row, keys read up to a length bucket. Requests
    join and leave, greedy and seeded sampling mix, rows cross from the 64-key bucket into the
    last; tokens, log-probabilities and expert loads must be the dynamic engine's. 'grouped'
    forces the grouped GEMM that CUDA runs instead of the CPU's dense and padded paths."""
    from raymoe.model.moe import MoE
    from raymoe.serve.graphs import DecodeGraphs

    if experts == "grouped":
        monkeypatch.setattr(MoE, "padded", False)
        monkeypatch.setattr(MoE, "dense_max_tokens", 0)
    model, tok = tiny_model(**LAYOUTS["mla-sliding"], num_layers=3, max_seq_len=128, num_experts=8, top_k=2), ByteTokenizer()
    prompts = ["def f(x):", "import os", "a", "class A:\n    pass", "while True:", "b = 1"]
    params = [SamplingParams(max_tokens=60, temperature=0, logprobs=2), SamplingParams(max_tokens=25, temperature=0.9, seed=3),
              SamplingParams(max_tokens=9, temperature=0), SamplingParams(max_tokens=70, temperature=0.7, top_p=0.9, seed=5),
              SamplingParams(max_tokens=33, temperature=0), SamplingParams(max_tokens=12, temperature=1.0, top_k=5, seed=8)]
    runs = {}
    for graphs in (False, True):
        engine = Engine(model, tok, max_batch=5, max_len=100, cuda_graphs=graphs)
        reqs, steps = [], 0
        while len(reqs) < len(prompts) or engine.has_work():
            if steps % 7 == 0 and len(reqs) < len(prompts):  # arrivals between decode steps
                reqs.append(engine.add_request(prompts[len(reqs)], params[len(reqs)]))
            engine.step()
            steps += 1
        runs[graphs] = engine, reqs
    (dynamic, want), (static, got) = runs[False], runs[True]
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert [len(got[i].output_ids) for i in (0, 2, 4)] == [60, 9, 33] and got[0].length > 64  # greedy rows run to max_tokens
    for a, b in zip(got[0].logprobs, want[0].logprobs):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and [i for i, _ in a[1]] == [i for i, _ in b[1]]
    # Padding rows were routed but load nothing: the loads are the real tokens' alone.
    assert torch.equal(static.load, dynamic.load) and int(static.load.sum()) > 0
    assert static.cache.max_batch == 6 and all(r.slot < 5 for r in got)
    assert static.graphs.batch_buckets == [1, 2, 4, 5] and static.graphs.key_buckets == [64, 100]
    assert static.graphs.bucket_of(3, 70) == (4, 100) and static.graphs.bucket_of(5, 64) == (5, 64)
    assert static.graphs.graphs == {} and static.graphs.capture_s == 0  # nothing captured on a CPU

    with pytest.raises(ValueError, match="scratch row"):
        DecodeGraphs(model, KVCache(model, 4, 32), max_batch=4)
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(model, KVCache(model, 5, 32), max_batch=4, capture=True)
    with pytest.raises(ValueError, match="micro_batches=1"):
        Engine(model, tok, max_batch=4, micro_batches=2, cuda_graphs=True)
    capped = tiny_model(num_experts=4, top_k=2, capacity_factor=1.25)
    with pytest.raises(ValueError, match="dropless routing"):
        Engine(capped, tok, max_batch=4, cuda_graphs=True)


def test_a_decode_step_on_the_cuda_expert_path_reads_nothing_back_inside_the_model(monkeypatch):
    """On CUDA every read of a tensor's value by the host is a sync that stalls the launch queue.
    With the grouped GEMM CUDA runs (not the CPU's padded path, which reads its capacity), the
    model's forward in an engine decode step reads no value: the key count comes from the
    engine's own numbers, not positions.max(). Counted here as the ATen ops .item() and int(tensor)
    dispatch to; sampling's one copy of the tokens is outside the model."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from raymoe.model.moe import MoE

    monkeypatch.setattr(MoE, "padded", False)
    monkeypatch.setattr(MoE, "dense_max_tokens", 0)

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.count += func in (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)
            return func(*args, **(kwargs or {}))

    model = tiny_model(**LAYOUTS["mla"], num_experts=8, top_k=2)
    engine = Engine(model, ByteTokenizer(), max_batch=4)
    for p in ("def f", "import os", "x"):
        engine.add_request(p, SamplingParams(max_tokens=6, temperature=0))
    engine.step()  # prefills
    forward = model.forward

    def counted(*args, **kwargs):
        with Reads():
            return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    engine.step()
    assert engine.stats["decode_steps"] == 1 and Reads.count == 0
