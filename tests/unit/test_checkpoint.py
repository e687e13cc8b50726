"""parallel/checkpoint.py: a tiny real MoE model and AdamW survive a save/load round trip bit for
bit (routers' selection biases and tied embeddings included), and every kind of damaged or
mismatched checkpoint is refused with a CheckpointError that names the file and the reason.

    .venv/bin/python -m pytest tests/unit/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from raymoe.config import config_from_dict
from raymoe.model.transformer import MoETransformer
from raymoe.parallel.checkpoint import (
    MANIFEST,
    CheckpointError,
    TrainerState,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)

V = 260
_TINY = {
    "vocab_size": V,
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "max_seq_len": 128,
    "num_experts": 4,
    "top_k": 2,
    "expert_intermediate_size": 8,
    "dense_intermediate_size": 16,
    "num_shared_experts": 1,
}

HISTORY = [{"step": 10, "load": [[1, 2, 3, 4], [4, 3, 2, 1]]}, {"step": 20, "load": [[2, 2, 2, 2], [0, 1, 2, 5]]}]


def _cfg(**model):
    return config_from_dict({"model": {**_TINY, **model}})


def _model(seed: int = 0, **model) -> MoETransformer:
    m = MoETransformer(_cfg(**model).model)
    m.init_weights(seed=seed)
    return m


def _optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def _step(model: MoETransformer, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    tokens = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(seed))
    out = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), tokens[:, 1:].reshape(-1)) + out.aux_loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def _trained(**model):
    """A model whose routers carry distinct non-zero biases, and an AdamW that has taken one step."""
    torch.manual_seed(0)
    m = _model(**model)
    with torch.no_grad():
        for i, moe in enumerate(m.moe_layers()):
            moe.router.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.125, -1.0]) * (i + 1))
    opt = _optimizer(m)
    _step(m, opt)
    return m, opt


def _state(**kw) -> TrainerState:
    return TrainerState(**{"step": 7, "data_position": 1234, "model_hash": _cfg().model_hash(), **kw})


def _saved(tmp_path, **model):
    m, opt = _trained(**model)
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, m, opt, _state(model_hash=_cfg(**model).model_hash()), records={"expert_load.json": HISTORY})
    return path, m, opt


def _restore(path: str, **model):
    ckpt = load_checkpoint(path, expect_model_hash=_cfg(**model).model_hash())
    fresh = _model(seed=123, **model)
    load_model_weights(fresh, ckpt.model)
    opt = _optimizer(fresh)
    opt.load_state_dict(ckpt.optimizer)
    return ckpt, fresh, opt


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- round trip


def test_weights_and_router_biases_are_identical_after_load(tmp_path):
    path, m, _ = _saved(tmp_path)
    _, fresh, _ = _restore(path)
    _assert_same_weights(m, fresh)
    biases = [moe.router.expert_bias for moe in fresh.moe_layers()]
    assert len(biases) == 2
    assert biases[0].tolist() == [0.5, -0.25, 0.125, -1.0]
    assert biases[1].tolist() == [1.0, -0.5, 0.25, -2.0]


def test_saved_file_holds_expert_bias_buffers(tmp_path):
    from safetensors.torch import load_file

    path, m, _ = _saved(tmp_path)
    saved = load_file(os.path.join(path, "model.safetensors"))
    bias_keys = sorted(k for k in saved if k.endswith("expert_bias"))
    assert len(bias_keys) == 2
    assert "rope_cos" not in saved and "rope_sin" not in saved  # non-persistent, rebuilt at init
    assert set(saved) == set(m.state_dict())


def test_optimizer_state_is_identical_after_load(tmp_path):
    path, _, opt = _saved(tmp_path)
    _, _, opt2 = _restore(path)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    assert len(s1["state"]) == len(list(opt.param_groups[0]["params"]))
    for idx, st in s1["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[name], s2["state"][idx][name]), (idx, name)
        assert float(s2["state"][idx]["step"]) == 1.0
    assert any(st["exp_avg"].abs().sum() > 0 for st in s2["state"].values())  # a real, non-trivial state


def test_training_continues_identically_after_load(tmp_path):
    path, m, opt = _saved(tmp_path)
    _, fresh, opt2 = _restore(path)
    _step(m, opt, seed=1)
    _step(fresh, opt2, seed=1)
    _assert_same_weights(m, fresh)


def test_tied_embeddings_round_trip(tmp_path):
    path, m, _ = _saved(tmp_path, tie_embeddings=True)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(path, "model.safetensors"))
    assert "embed.weight" in saved and "lm_head.weight" not in saved  # one name per storage
    _, fresh, _ = _restore(path, tie_embeddings=True)
    assert fresh.lm_head.weight is fresh.embed.weight  # still tied after load
    assert torch.equal(fresh.lm_head.weight, m.embed.weight)
    _assert_same_weights(m, fresh)


def test_trainer_state_round_trips(tmp_path):
    m, opt = _trained()
    state = TrainerState(step=42, data_position=98765, model_hash="abc123", mlflow_run_id="run-1",
                         restarts=2, world_size=4, extra={"best_val": 1.5, "tags": ["a", "b"]})
    save_checkpoint(str(tmp_path), m, opt, state)
    ckpt = load_checkpoint(str(tmp_path), expect_model_hash="abc123")
    assert ckpt.state == state
    assert ckpt.records == {}


def test_records_round_trip(tmp_path):
    path, _, _ = _saved(tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.records == {"expert_load.json": HISTORY}
    with open(os.path.join(path, MANIFEST)) as f:
        files = json.load(f)["files"]
    assert sorted(files) == ["expert_load.json", "model.safetensors", "optimizer.pt"]
    assert all(len(d) == 64 for d in files.values())


def test_rng_state_is_saved(tmp_path):
    torch.manual_seed(5)
    expected = torch.get_rng_state()
    m, opt = _trained()
    torch.set_rng_state(expected)
    save_checkpoint(str(tmp_path), m, opt, _state())
    ckpt = load_checkpoint(str(tmp_path))
    assert torch.equal(ckpt.rng["torch"], expected)


def test_no_temporary_manifest_is_left_behind(tmp_path):
    path, _, _ = _saved(tmp_path)
    assert sorted(os.listdir(path)) == ["expert_load.json", MANIFEST, "model.safetensors", "optimizer.pt"]


# ----------------------------------------------------------------------------- refused checkpoints


def test_flipped_byte_in_weights_is_refused_naming_sha256_and_file(tmp_path):
    path, _, _ = _saved(tmp_path)
    fpath = os.path.join(path, "model.safetensors")
    data = bytearray(open(fpath, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(fpath, "wb").write(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "sha256" in msg and "model.safetensors" in msg
    assert msg.startswith(fpath)


def test_truncated_optimizer_state_is_refused(tmp_path):
    path, _, _ = _saved(tmp_path)
    fpath = os.path.join(path, "optimizer.pt")
    size = os.path.getsize(fpath)
    with open(fpath, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "optimizer.pt" in str(info.value)
    assert "truncated or corrupted" in str(info.value)


def test_edited_record_is_refused(tmp_path):
    path, _, _ = _saved(tmp_path)
    with open(os.path.join(path, "expert_load.json"), "w") as f:
        json.dump([], f)
    with pytest.raises(CheckpointError, match="expert_load.json: sha256 does not match"):
        load_checkpoint(path)


def test_missing_file_listed_in_manifest_is_refused(tmp_path):
    path, _, _ = _saved(tmp_path)
    os.remove(os.path.join(path, "optimizer.pt"))
    with pytest.raises(CheckpointError, match="optimizer.pt: missing from the checkpoint"):
        load_checkpoint(path)


def test_checkpoint_without_manifest_is_refused_as_never_completed(tmp_path):
    path, _, _ = _saved(tmp_path)
    os.remove(os.path.join(path, MANIFEST))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"{path}: no {MANIFEST}; the checkpoint was never completed"


def test_unreadable_manifest_is_refused(tmp_path):
    path, _, _ = _saved(tmp_path)
    with open(os.path.join(path, MANIFEST), "w") as f:
        f.write('{"format": 1, "sta')
    with pytest.raises(CheckpointError, match="manifest.json: unreadable"):
        load_checkpoint(path)


def test_checkpoint_of_a_different_architecture_is_refused_naming_both_hashes(tmp_path):
    path, _, _ = _saved(tmp_path)
    saved_hash = _cfg().model_hash()
    other_hash = _cfg(num_experts=8).model_hash()
    assert saved_hash != other_hash
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, expect_model_hash=other_hash)
    msg = str(info.value)
    assert saved_hash in msg and other_hash in msg
    assert "different model architecture" in msg


def test_checkpoint_error_is_a_runtime_error():
    assert issubclass(CheckpointError, RuntimeError)


def test_weights_with_other_layer_count_are_refused_as_checkpoint_error(tmp_path):
    path, _, _ = _saved(tmp_path)
    ckpt = load_checkpoint(path)
    deeper = _model(num_layers=3)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(deeper, ckpt.model)
    assert "missing ['layers.2." in str(info.value)


def test_weights_with_other_tensor_shapes_raise_a_checkpoint_error_naming_the_tensor(tmp_path):
    # Same key names, different shapes: torch's size-mismatch error is re-raised as ours, so the
    # CLI reports it in one line. load_checkpoint's model-hash check normally stops this earlier.
    path, _, _ = _saved(tmp_path)
    ckpt = load_checkpoint(path)
    wider = _model(hidden_size=32)
    with pytest.raises(CheckpointError) as info:
        load_model_weights(wider, ckpt.model)
    assert "does not match the model" in str(info.value)
