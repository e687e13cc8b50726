"""parallel/checkpoint.py: a tiny real MoE model and AdamW survive a save/load round trip bit for
bit (routers' selection biases, tied embeddings and Adam moments included), the sharded files
reassemble into one single-device state dict, and every kind of damaged or mismatched checkpoint
is refused with a CheckpointError that names the file and the reason; `load_latest_good` then
falls back to an older checkpoint.

Single process, no torch.distributed: the mesh is 1 rank with expert degree 1, so the checkpoint
is dense.safetensors plus one expert shard holding experts [0, num_experts).

    .venv/bin/python -m pytest tests/unit/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.parallel.apply import parallelize
from raymoe.parallel.checkpoint import (
    MANIFEST,
    BaseModelChanged,
    CheckpointError,
    TrainerState,
    full_state_dict,
    load_checkpoint,
    load_latest_good,
    load_model_weights,
    read_manifest,
    save_checkpoint,
    verify_checkpoint,
)
from raymoe.parallel.mesh import build_mesh
from raymoe.train.loop import build_optimizer

V = 260
E = 4
_TINY = {
    "vocab_size": V,
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "max_seq_len": 128,
    "num_experts": E,
    "top_k": 2,
    "expert_intermediate_size": 8,
    "dense_intermediate_size": 16,
    "num_shared_experts": 1,
}
DENSE = "dense.safetensors"
EXPERTS = f"experts-{0:05d}-{E:05d}.safetensors"

HISTORY = [{"step": 10, "load": [[1, 2, 3, 4], [4, 3, 2, 1]]}, {"step": 20, "load": [[2, 2, 2, 2], [0, 1, 2, 5]]}]


def _cfg(**model):
    return config_from_dict({"model": {**_TINY, **model}, "train": {"lr": 1e-2}})


class _Run:
    """A model parallelized over a one-rank mesh, with the loop's AdamW."""

    def __init__(self, seed: int = 0, **model):
        cfg = _cfg(**model)
        self.model = MoETransformer(cfg.model)
        self.model.init_weights(seed=seed)
        self.plan = parallelize(self.model, build_mesh(1, 0, 1, cfg.model.num_experts))
        self.opt = build_optimizer(self.plan.dense + self.plan.experts, cfg.train, torch.device("cpu"))
        self.hash = cfg.model_hash()

    def step(self, seed: int = 0) -> None:
        tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(seed))
        out = self.model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), tokens[:, 1:].reshape(-1)) + out.aux_loss
        self.opt.zero_grad()
        loss.backward()
        self.plan.sync_gradients()
        self.opt.step()

    def load(self, path: str, expect_model_hash: str | None = None):
        return load_checkpoint(path, self.model, self.opt, self.plan, expect_model_hash)


def _trained(**model) -> _Run:
    """Routers carry distinct non-zero biases, and AdamW has taken one step."""
    torch.manual_seed(0)
    run = _Run(**model)
    with torch.no_grad():
        for i, moe in enumerate(run.model.moe_layers()):
            moe.router.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.125, -1.0]) * (i + 1))
    run.step()
    return run


def _state(**kw) -> TrainerState:
    return TrainerState(**{"step": 7, "data_position": 1234, "model_hash": _cfg().model_hash(), **kw})


def _saved(tmp_path, name: str = "ckpt", **model):
    run = _trained(**model)
    path = str(tmp_path / name)
    save_checkpoint(path, run.model, run.opt, run.plan, _state(model_hash=run.hash), records={"expert_load.json": HISTORY})
    return path, run


def _restore(path: str, **model):
    fresh = _Run(seed=123, **model)
    state, records = fresh.load(path, expect_model_hash=fresh.hash)
    return fresh, state, records


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _flip_byte(fpath: str) -> None:
    data = bytearray(open(fpath, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(fpath, "wb").write(bytes(data))


# ----------------------------------------------------------------------------- round trip


def test_weights_and_router_biases_are_identical_after_load(tmp_path):
    path, run = _saved(tmp_path)
    fresh, _, _ = _restore(path)
    _assert_same_weights(run.model, fresh.model)
    biases = [moe.router.expert_bias for moe in fresh.model.moe_layers()]
    assert len(biases) == 2
    assert biases[0].tolist() == [0.5, -0.25, 0.125, -1.0]
    assert biases[1].tolist() == [1.0, -0.5, 0.25, -2.0]


def test_dense_file_holds_expert_bias_buffers_and_the_shard_holds_the_experts(tmp_path):
    path, run = _saved(tmp_path)
    dense, experts = load_file(os.path.join(path, DENSE)), load_file(os.path.join(path, EXPERTS))
    weights = {k for k in dense if not k.startswith("opt/")}
    assert sorted(k for k in weights if k.endswith("expert_bias")) == [
        "layers.0.ffn.router.expert_bias", "layers.1.ffn.router.expert_bias"]
    for i, moe in enumerate(run.model.moe_layers()):
        assert torch.equal(dense[f"layers.{i}.ffn.router.expert_bias"], moe.router.expert_bias)
    assert "rope_cos" not in dense and "rope_sin" not in dense  # non-persistent, rebuilt at init
    expert_names = {n for n, _ in run.plan.experts}
    assert expert_names and {k for k in experts if not k.startswith("opt/")} == expert_names
    assert weights | expert_names == set(run.model.state_dict())
    assert weights.isdisjoint(expert_names)
    for name, p in run.plan.experts:
        assert p.shape[0] == E
        assert torch.equal(experts[name], p.detach())


def test_manifest_lists_one_expert_shard_covering_every_expert(tmp_path):
    path, _ = _saved(tmp_path)
    files = read_manifest(path)["files"]
    assert sorted(files) == [DENSE, "expert_load.json", EXPERTS]
    assert files[EXPERTS]["experts"] == [0, E]
    assert "experts" not in files[DENSE]
    assert all(len(info["sha256"]) == 64 for info in files.values())
    assert verify_checkpoint(path)["files"] == files


def test_optimizer_state_is_identical_after_load(tmp_path):
    path, run = _saved(tmp_path)
    fresh, _, _ = _restore(path)
    s1, s2 = run.opt.state_dict(), fresh.opt.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    assert len(s1["state"]) == len(run.plan.params)
    for idx, st in s1["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[name], s2["state"][idx][name]), (idx, name)
        assert float(s2["state"][idx]["step"]) == 1.0
    assert read_manifest(path)["adam_step"] == 1.0
    assert any(st["exp_avg"].abs().sum() > 0 for st in s2["state"].values())  # a real, non-trivial state
    # Moments of the routed experts are in the shard file, under opt/<name>/...
    experts = load_file(os.path.join(path, EXPERTS))
    for name, p in run.plan.experts:
        assert torch.equal(experts[f"opt/{name}/exp_avg_sq"], run.opt.state[p]["exp_avg_sq"])


def test_training_continues_identically_after_load(tmp_path):
    path, run = _saved(tmp_path)
    fresh, _, _ = _restore(path)
    run.step(seed=1)
    fresh.step(seed=1)
    _assert_same_weights(run.model, fresh.model)


def test_tied_embeddings_round_trip(tmp_path):
    path, run = _saved(tmp_path, tie_embeddings=True)
    saved = load_file(os.path.join(path, DENSE))
    assert "embed.weight" in saved and "lm_head.weight" not in saved  # one name per storage
    assert "opt/embed.weight/exp_avg" in saved and "opt/lm_head.weight/exp_avg" not in saved
    fresh, _, _ = _restore(path, tie_embeddings=True)
    assert fresh.model.lm_head.weight is fresh.model.embed.weight  # still tied after load
    assert torch.equal(fresh.model.lm_head.weight, run.model.embed.weight)
    _assert_same_weights(run.model, fresh.model)
    run.step(seed=1)
    fresh.step(seed=1)
    _assert_same_weights(run.model, fresh.model)


def test_trainer_state_round_trips(tmp_path):
    run = _trained()
    state = TrainerState(step=42, data_position=98765, model_hash="abc123", mlflow_run_id="run-1",
                         restarts=2, world_size=4, expert_degree=2, extra={"best_val": 1.5, "tags": ["a", "b"]})
    save_checkpoint(str(tmp_path), run.model, run.opt, run.plan, state)
    loaded, records = _Run().load(str(tmp_path), expect_model_hash="abc123")
    assert loaded == state
    assert records == {}


def test_records_round_trip(tmp_path):
    path, _ = _saved(tmp_path)
    _, _, records = _restore(path)
    assert records == {"expert_load.json": HISTORY}


def test_rng_state_is_restored(tmp_path):
    run = _trained()
    torch.manual_seed(5)
    expected = torch.get_rng_state()
    save_checkpoint(str(tmp_path), run.model, run.opt, run.plan, _state())
    after_save = torch.rand(3)
    torch.manual_seed(999)
    _Run().load(str(tmp_path))
    assert torch.equal(torch.get_rng_state(), expected)
    assert torch.equal(torch.rand(3), after_save)


def test_no_temporary_manifest_is_left_behind(tmp_path):
    path, _ = _saved(tmp_path)
    assert sorted(os.listdir(path)) == [DENSE, "expert_load.json", EXPERTS, MANIFEST]


# ----------------------------------------------------------------------------- full state dict


def test_full_state_dict_gives_a_single_device_model_the_same_logits(tmp_path):
    path, run = _saved(tmp_path)
    weights = full_state_dict(path)
    assert not any(k.startswith("opt/") for k in weights)
    single = MoETransformer(_cfg().model)
    single.init_weights(seed=123)
    load_model_weights(single, weights)
    _assert_same_weights(run.model, single)
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(7))
    run.model.eval(), single.eval()
    with torch.no_grad():
        assert torch.equal(run.model(tokens).logits, single(tokens).logits)


def test_full_state_dict_of_tied_embeddings_loads(tmp_path):
    path, run = _saved(tmp_path, tie_embeddings=True)
    single = MoETransformer(_cfg(tie_embeddings=True).model)
    load_model_weights(single, full_state_dict(path))
    assert single.lm_head.weight is single.embed.weight
    _assert_same_weights(run.model, single)


# ----------------------------------------------------------------------------- refused checkpoints


@pytest.mark.parametrize("fname", [DENSE, EXPERTS])
def test_flipped_byte_is_refused_naming_sha256_and_file(tmp_path, fname):
    path, _ = _saved(tmp_path)
    fpath = os.path.join(path, fname)
    _flip_byte(fpath)
    with pytest.raises(CheckpointError) as info:
        _Run().load(path)
    msg = str(info.value)
    assert "sha256" in msg and fname in msg
    assert msg.startswith(fpath)


def test_flipped_byte_is_refused_by_full_state_dict(tmp_path):
    path, _ = _saved(tmp_path)
    _flip_byte(os.path.join(path, EXPERTS))
    with pytest.raises(CheckpointError, match=f"{EXPERTS}: sha256 does not match"):
        full_state_dict(path)


def test_truncated_file_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    fpath = os.path.join(path, EXPERTS)
    with open(fpath, "r+b") as f:
        f.truncate(os.path.getsize(fpath) // 2)
    with pytest.raises(CheckpointError) as info:
        _Run().load(path)
    assert EXPERTS in str(info.value)
    assert "truncated or corrupted" in str(info.value)


def test_edited_record_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    with open(os.path.join(path, "expert_load.json"), "w") as f:
        json.dump([], f)
    with pytest.raises(CheckpointError, match="expert_load.json: sha256 does not match"):
        _Run().load(path)


@pytest.mark.parametrize("fname", [DENSE, EXPERTS])
def test_missing_file_listed_in_manifest_is_refused(tmp_path, fname):
    path, _ = _saved(tmp_path)
    os.remove(os.path.join(path, fname))
    with pytest.raises(CheckpointError, match=f"{fname}: missing from the checkpoint"):
        _Run().load(path)


def test_checkpoint_without_manifest_is_refused_as_never_completed(tmp_path):
    path, _ = _saved(tmp_path)
    os.remove(os.path.join(path, MANIFEST))
    with pytest.raises(CheckpointError) as info:
        _Run().load(path)
    assert str(info.value) == f"{path}: no {MANIFEST}; the checkpoint was never completed"


def test_unreadable_manifest_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    with open(os.path.join(path, MANIFEST), "w") as f:
        f.write('{"format": 2, "sta')
    with pytest.raises(CheckpointError, match="manifest.json: unreadable"):
        _Run().load(path)


def test_manifest_of_another_format_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    mpath = os.path.join(path, MANIFEST)
    manifest = json.load(open(mpath))
    manifest["format"] = 1
    json.dump(manifest, open(mpath, "w"))
    with pytest.raises(CheckpointError, match="checkpoint format 1 is not 2"):
        _Run().load(path)


def test_checkpoint_of_a_different_architecture_is_refused_naming_both_hashes(tmp_path):
    path, _ = _saved(tmp_path)
    saved_hash = _cfg().model_hash()
    other_hash = _cfg(num_experts=8).model_hash()
    assert saved_hash != other_hash
    with pytest.raises(CheckpointError) as info:
        _Run().load(path, expect_model_hash=other_hash)
    msg = str(info.value)
    assert saved_hash in msg and other_hash in msg
    assert "different model architecture" in msg


def test_checkpoint_error_is_a_runtime_error():
    assert issubclass(CheckpointError, RuntimeError)


def test_weights_with_other_layer_count_are_refused_as_checkpoint_error(tmp_path):
    path, _ = _saved(tmp_path)
    deeper = MoETransformer(_cfg(num_layers=3).model)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(deeper, full_state_dict(path))
    assert "missing ['layers.2." in str(info.value)
    with pytest.raises(CheckpointError, match=r"does not match the model: it has no layers.2."):
        _Run(num_layers=3).load(path)  # no model hash given: the tensors themselves are checked


def test_weights_with_other_tensor_shapes_raise_a_checkpoint_error_naming_the_tensor(tmp_path):
    # Same key names, different shapes: torch's size-mismatch error is re-raised as ours, so the
    # CLI reports it in one line. load_checkpoint's model-hash check normally stops this earlier.
    path, _ = _saved(tmp_path)
    wider = MoETransformer(_cfg(hidden_size=32).model)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(wider, full_state_dict(path))
    assert "does not match the model" in str(info.value)
    with pytest.raises(CheckpointError, match="does not match the model"):
        _Run(hidden_size=32).load(path)


def test_expert_tensors_of_another_shape_are_refused_as_checkpoint_error(tmp_path):
    # Shared experts 2 x 8 wide vs 1 x 16 wide: every dense tensor matches, only the routed
    # experts' hidden dim differs.
    path, _ = _saved(tmp_path, num_shared_experts=2)
    with pytest.raises(CheckpointError, match="does not match the model"):
        _Run(num_shared_experts=1, expert_intermediate_size=16).load(path)


# ----------------------------------------------------------------------------- load_latest_good


def test_load_latest_good_falls_back_past_a_corrupted_newer_checkpoint(tmp_path):
    older, run = _saved(tmp_path, "step-7")
    newer = str(tmp_path / "step-8")
    run.step(seed=1)
    save_checkpoint(newer, run.model, run.opt, run.plan, _state(step=8, model_hash=run.hash))
    _flip_byte(os.path.join(newer, EXPERTS))
    fresh, lines = _Run(seed=123), []
    result = load_latest_good([newer, older], fresh.model, fresh.opt, fresh.plan, fresh.hash, log=lines.append)
    assert result is not None
    path, state, records = result
    assert path == older
    assert state.step == 7 and records == {"expert_load.json": HISTORY}
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint {newer} refused")
    assert "sha256" in lines[0] and EXPERTS in lines[0]
    reference, _, _ = _restore(older)
    _assert_same_weights(reference.model, fresh.model)


def test_load_latest_good_without_candidates_returns_none():
    fresh, lines = _Run(), []
    assert load_latest_good([], fresh.model, fresh.opt, fresh.plan, fresh.hash, log=lines.append) is None
    assert lines == []


def test_load_latest_good_raises_when_every_candidate_is_refused(tmp_path):
    a, _ = _saved(tmp_path, "a")
    b, _ = _saved(tmp_path, "b")
    _flip_byte(os.path.join(a, DENSE))
    os.remove(os.path.join(b, MANIFEST))
    fresh, lines = _Run(), []
    with pytest.raises(CheckpointError) as info:
        load_latest_good([a, b], fresh.model, fresh.opt, fresh.plan, fresh.hash, log=lines.append)
    # One line naming every refused file and why (one process: no rank numbers).
    assert str(info.value) == (
        f"none of the 2 checkpoints could be loaded: {os.path.join(a, DENSE)}: sha256 does not match manifest.json "
        f"(truncated or corrupted); {b}: no manifest.json; the checkpoint was never completed; "
        "fix or remove them, or start a new run name")
    assert [line.split(" refused")[0] for line in lines] == [f"checkpoint {a}", f"checkpoint {b}"]


def test_a_changed_base_model_ends_the_search_at_once(tmp_path):
    path, _ = _saved(tmp_path)
    mpath = os.path.join(path, MANIFEST)
    manifest = json.load(open(mpath))
    manifest["state"]["extra"] = {"base": {"init_from": "models:/base/1", "fingerprint": "aaa"}}
    json.dump(manifest, open(mpath, "w"))
    fresh, lines = _Run(), []
    with pytest.raises(BaseModelChanged, match="fingerprint aaa, but model.init_from now has bbb"):
        load_latest_good([path, path], fresh.model, fresh.opt, fresh.plan, fresh.hash, log=lines.append, expect_base="bbb")
    assert lines == []  # not "refused, trying the previous one": an older checkpoint has the same base


# ----------------------------------------------------------------------------- unfinished uploads


class _Registered:
    """What ray.train.get_checkpoint() returns for a checkpoint Ray Train registered (local storage)."""

    def __init__(self, path: str):
        import pyarrow.fs

        self.path, self.filesystem = path, pyarrow.fs.LocalFileSystem()


def test_a_checkpoint_whose_upload_was_cut_short_is_skipped_unless_ray_train_registered_it(tmp_path):
    """A rank lost while copying its files leaves rank 0's manifest beside a short or missing
    shard. Found only in the run directory, that checkpoint was never completed: the candidates
    skip it (one line naming the file) and fall back to the older one, or to none (the run starts
    over instead of ending on a CheckpointError). A registered checkpoint is never skipped, and a
    flipped byte (same size) is damage, left for load_checkpoint to refuse."""
    from raymoe.parallel.checkpoint import unfinished
    from raymoe.ray_train import _resume_candidates

    run_dir = tmp_path / "run"
    older, run = _saved(run_dir, "checkpoint_2026-01-01_00-00-01")
    newer = str(run_dir / "checkpoint_2026-01-01_00-00-02")
    save_checkpoint(newer, run.model, run.opt, run.plan, _state(step=8, model_hash=run.hash))
    assert unfinished(newer) is None and read_manifest(newer)["files"][EXPERTS]["bytes"] == os.path.getsize(f"{newer}/{EXPERTS}")
    full = os.path.getsize(f"{newer}/{EXPERTS}")
    with open(f"{newer}/{EXPERTS}", "r+b") as f:
        f.truncate(full // 3)

    assert unfinished(newer) == f"{EXPERTS} has {full // 3:,} of its {full:,} bytes"
    lines = []
    assert _resume_candidates(None, str(run_dir), log=lines.append) == [older]
    assert lines == [f"skipping checkpoint {newer}: never completed ({EXPERTS} has {full // 3:,} of its {full:,} bytes; "
                     "a worker was lost while writing it)"]
    # Registered by Ray Train, the same files are a damaged checkpoint: tried, and refused by name.
    assert _resume_candidates(_Registered(newer), str(run_dir)) == [newer, older]

    os.remove(f"{newer}/{EXPERTS}")
    assert unfinished(newer) == f"{EXPERTS} is missing"
    shutil.rmtree(older)
    assert _resume_candidates(None, str(run_dir)) == []  # nothing complete: start over

    flipped, _ = _saved(run_dir, "checkpoint_2026-01-01_00-00-03")
    _flip_byte(f"{flipped}/{DENSE}")
    assert unfinished(flipped) is None and _resume_candidates(None, str(run_dir)) == [flipped]
    # Rank 0 lost while copying the manifest itself: half a JSON document.
    manifest = f"{newer}/{MANIFEST}"
    text = open(manifest).read()
    open(manifest, "w").write(text[: len(text) // 2])
    assert unfinished(newer).startswith(f"{MANIFEST} is unreadable (")
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        _Run().load(flipped)


# ----------------------------------------------------------------------------- written before w13


def _split_gate_up(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout raymoe wrote before the routed experts' gate and up stacks were fused: every
    `...experts.w13` [E, D, 2F] (and its AdamW moments) as `...experts.w1` and `...experts.w3`."""
    out = {}
    for k, v in tensors.items():
        if ".experts.w13" in k:
            gate, up = v.chunk(2, dim=-1)
            out[k.replace(".experts.w13", ".experts.w1")] = gate.contiguous()
            out[k.replace(".experts.w13", ".experts.w3")] = up.contiguous()
        else:
            out[k] = v
    return out


def test_a_checkpoint_with_separate_gate_and_up_stacks_resumes_with_its_weights_and_moments(tmp_path):
    from safetensors.torch import save_file

    from raymoe.parallel.checkpoint import _sha256

    path, run = _saved(tmp_path)
    fpath = os.path.join(path, EXPERTS)
    save_file(_split_gate_up(load_file(fpath)), fpath)
    manifest = json.loads(open(os.path.join(path, MANIFEST)).read())
    manifest["files"][EXPERTS]["sha256"] = _sha256(fpath)
    open(os.path.join(path, MANIFEST), "w").write(json.dumps(manifest))
    assert not any(".w13" in k for k in load_file(fpath))

    fresh, _, _ = _restore(path)
    _assert_same_weights(run.model, fresh.model)
    for (name, p), (_, q) in zip(run.plan.experts, fresh.plan.experts):
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(run.opt.state[p][m], fresh.opt.state[q][m]), (name, m)
    run.step(seed=1)
    fresh.step(seed=1)
    _assert_same_weights(run.model, fresh.model)


def test_a_model_directory_with_separate_gate_and_up_stacks_gives_the_same_logits(tmp_path):
    from raymoe.model_dir import open_model, open_source, write_model_dir

    _, run = _saved(tmp_path)
    out = str(tmp_path / "model")
    write_model_dir(out, _cfg(), _split_gate_up(run.model.state_dict()).items())
    src = open_source(out)
    assert "layers.0.ffn.experts.w13" in src.names() and "layers.0.ffn.experts.w1" not in src.names()
    assert torch.equal(src.tensor("layers.1.ffn.experts.w13", experts=range(1, 3)),
                       run.model.layers[1].ffn.experts.w13.detach()[1:3])
    _, model, _, _ = open_model(out)
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, run.model.eval()(tokens).logits)
