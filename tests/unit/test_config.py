"""config.py: the strict loader names the file and the dotted key in one line for every kind of
mistake, `--set` overrides convert types, and a loaded config is frozen, hashable and round-trips.

    .venv/bin/python -m pytest tests/unit/test_config.py -q
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from readonly import read_only_dir
from raymoe.config import ConfigError, RunConfig, check_writable, config_from_dict, load_config

# A pinned miniature of jobs/configs/demo.yaml (the shipped file's values may be tuned at any time).
DEMO_YAML = """\
name: demo
output_dir: .raymoe
model:
  hidden_size: 128
  num_layers: 4
  attention: mla
  num_heads: 4
  kv_lora_rank: 64
  qk_nope_head_dim: 32
  qk_rope_head_dim: 16
  v_head_dim: 32
  first_k_dense_layers: 1
  num_experts: 8
  top_k: 2
  score_func: sigmoid
  route_scale: 2.5
  num_expert_groups: 4
  top_k_groups: 2
  capacity_factor: null
  balance:
    bias_update_rate: 0.001
    seq_aux_loss_coef: 0.0001
scaling:
  num_workers: 2
train:
  steps: 300
  lr: 3.0e-3
  warmup_steps: 30
"""


@pytest.fixture
def demo(tmp_path) -> str:
    return _write(tmp_path, DEMO_YAML, "demo.yaml")


def _write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _error(tmp_path, text: str, overrides=()) -> tuple[str, str]:
    """Load YAML text from a file; return (path, message of the ConfigError it must raise)."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return path, str(info.value)


def _assert_one_line_naming(msg: str, path: str, key: str) -> None:
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert key in msg, msg


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "text, key",
    [
        ("nmae: demo\n", "unknown key nmae"),
        ("model:\n  num_expert: 8\n", "unknown key model.num_expert"),
        ("model:\n  balance:\n    foo: 1\n", "unknown key model.balance.foo"),
        ("train:\n  learning_rate: 0.1\n", "unknown key train.learning_rate"),
    ],
    ids=["top_level", "model", "model.balance", "train"],
)
def test_unknown_key_is_an_error_naming_the_dotted_key_and_file(tmp_path, text, key):
    path, msg = _error(tmp_path, text)
    _assert_one_line_naming(msg, path, key)


def test_unknown_key_error_lists_the_valid_keys_of_its_section(tmp_path):
    _, msg = _error(tmp_path, "model:\n  balance:\n    foo: 1\n")
    assert "aux_loss_coef, bias_update_rate, seq_aux_loss_coef, z_loss_coef" in msg


# ----------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "text, expect",
    [
        ("model:\n  num_layers: four\n", "model.num_layers='four' must be an integer"),
        ("model:\n  num_layers: true\n", "model.num_layers=True must be an integer"),
        ("model:\n  num_layers: 4.0\n", "model.num_layers=4.0 must be an integer"),
        ("train:\n  lr: [0.1]\n", "train.lr=[0.1] must be a finite number"),
        ("train:\n  lr: fast\n", "train.lr='fast' must be a finite number"),
        # Quoted: PyYAML reads bare `yes` as True (YAML 1.1), a quoted one stays a string.
        ("model:\n  tie_embeddings: \"yes\"\n", "model.tie_embeddings='yes' must be true or false"),
        ("model:\n  tie_embeddings: 1\n", "model.tie_embeddings=1 must be true or false"),
        ("model:\n  attention: 3\n", "model.attention=3 must be one of 'mha' | 'mla'"),
        ("model:\n  score_func: relu\n", "model.score_func='relu' must be one of 'softmax' | 'sigmoid'"),
        ("name: 7\n", "name=7 must be a string"),
        ("train:\n  betas: [0.9]\n", "train.betas=[0.9] must be a list"),
        ("train:\n  betas: [0.9, x]\n", "train.betas[1]='x' must be a finite number"),
        ("model:\n  capacity_factor: lots\n", "model.capacity_factor='lots' must be float | null"),
        ("scaling:\n  num_workers: two\n", "scaling.num_workers='two' must be int | [int, int]"),
        ("model: 3\n", "model must be a mapping of ModelConfig keys, got 3"),
    ],
    ids=[
        "str_for_int", "bool_for_int", "float_for_int", "list_for_float", "word_for_float",
        "yes_string_for_bool", "int_for_bool", "int_for_literal", "str_not_in_literal", "int_for_str",
        "short_tuple", "bad_tuple_item", "str_for_optional_float", "str_for_int_or_pair", "scalar_for_section",
    ],
)
def test_wrong_type_is_an_error_naming_the_dotted_key_and_file(tmp_path, text, expect):
    path, msg = _error(tmp_path, text)
    _assert_one_line_naming(msg, path, expect)


# ----------------------------------------------------------------------------- impossible combinations


@pytest.mark.parametrize(
    "text, expect",
    [
        ("model:\n  num_experts: 8\n  top_k: 9\n", "model.top_k=9 must be in [1, model.num_experts=8]"),
        ("model:\n  num_experts: 8\n  num_expert_groups: 3\n", "model.num_expert_groups=3 must divide model.num_experts=8"),
        ("model:\n  num_experts: 8\n  num_expert_groups: 4\n  top_k_groups: 5\n",
         "model.top_k_groups=5 must be in [1, model.num_expert_groups=4]"),
        ("model:\n  hidden_size: 130\n  num_heads: 4\n", "model.hidden_size=130 must be divisible by model.num_heads=4"),
        ("model:\n  num_heads: 4\n  num_kv_heads: 3\n", "model.num_heads=4 must be a multiple of model.num_kv_heads=3"),
        ("model:\n  num_layers: 4\n  first_k_dense_layers: 5\n",
         "model.first_k_dense_layers=5 must be in [0, model.num_layers=4]"),
        ("model:\n  max_seq_len: 64\ntrain:\n  seq_len: 128\n", "train.seq_len=128 must be <= model.max_seq_len=64"),
        ("train:\n  steps: 10\n  warmup_steps: 11\n", "train.warmup_steps=11 must be in [0, train.steps=10]"),
        ("scaling:\n  num_workers: [3, 1]\n", "scaling.num_workers=[3, 1] must be >= 1"),
        ("scaling:\n  num_workers: 0\n", "scaling.num_workers=0 must be >= 1"),
        ("model:\n  capacity_factor: 0\n", "model.capacity_factor=0.0 must be > 0 or null"),
        ("model:\n  capacity_factor: -1.5\n", "model.capacity_factor=-1.5 must be > 0 or null"),
        ("model:\n  balance:\n    aux_loss_coef: -0.1\n", "model.balance.aux_loss_coef=-0.1 must be >= 0"),
        ("model:\n  attention: mla\n  num_kv_heads: 2\n", "model.num_kv_heads applies to attention=mha only"),
        ("model:\n  vocab_size: 100\n", "model.vocab_size=100 must be >= 260 for data.tokenizer=byte"),
        ("name: a/b\n", "name='a/b' must be a non-empty name without '/'"),
        ("model:\n  attention: mla\n  qkv_bias: true\n", "model.qkv_bias applies to attention=mha only"),
        ("model:\n  num_shared_experts: 2\n  shared_expert_intermediate_size: 40\n",
         "model.shared_expert_intermediate_size is the width of one fused shared expert; set model.num_shared_experts: 1"),
        ("model:\n  num_layers: 4\n  dense_layers: [1, 4]\n", "model.dense_layers has 4, outside the 4 layers"),
        ("model:\n  rope_scaling: {factor: 4}\n", "model.rope_scaling.original_max_position_embeddings=0 must be > 0"),
        ("model:\n  num_shared_experts: 0\n  shared_expert_gate: true\n", "model.shared_expert_gate needs shared experts"),
        ("model:\n  num_experts: 8\n  num_expert_groups: 8\n", "leaves 1 expert per group; model.group_score=top2_sum needs 2"),
    ],
    ids=[
        "top_k_over_experts", "groups_not_dividing_experts", "top_k_groups_over_groups", "hidden_not_divisible_by_heads",
        "heads_not_multiple_of_kv_heads", "dense_layers_over_layers", "seq_len_over_max_seq_len", "warmup_over_steps",
        "worker_range_reversed", "zero_workers", "zero_capacity_factor", "negative_capacity_factor",
        "negative_balance_coef", "kv_heads_with_mla", "vocab_too_small_for_bytes", "slash_in_name",
        "bias_with_mla", "shared_width_with_two_shared", "dense_layer_out_of_range", "yarn_without_original_length",
        "shared_gate_without_shared", "one_expert_groups_with_top2_sum",
    ],
)
def test_impossible_combination_is_an_error_naming_the_dotted_key_and_file(tmp_path, text, expect):
    path, msg = _error(tmp_path, text)
    _assert_one_line_naming(msg, path, expect)


# ----------------------------------------------------------------------------- the file itself


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("name: x\ntrain:\n  steps: 10\n   lr: 3.0e-4\n", "4:6", "mapping values are not allowed here"),
        ("name: x\nmodel:\n  dense_layers: [0, 1\n  num_experts: 8\n", "4:14",
         "expected ',' or ']', but got ':' (while parsing a flow sequence from line 3, column 17)"),
        ("name: x\ntrain:\n\tsteps: 10\n", "3:1",
         "found character '\\t' that cannot start any token (YAML indents with spaces, not tabs)"),
        ("name: x\ntrain\n  steps: 10\nmodel: {}\n", "3:8",
         "could not find expected ':' (while scanning a simple key from line 2, column 1)"),
        ("name: x\ntrain:\n  steps: \x07\n", "3:10", "unacceptable character #x0007: special characters are not allowed"),
    ],
    ids=["bad_indentation", "unclosed_bracket", "tab", "missing_colon", "control_character"],
)
def test_invalid_yaml_is_a_one_line_error_naming_file_line_and_column(tmp_path, text, where, problem):
    path, msg = _error(tmp_path, text)
    assert msg == f"{path}:{where}: not valid YAML: {problem}"


def test_config_that_is_not_utf8_names_the_line_and_column_of_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\ntrain:\n  steps: 1\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:1:10: not valid YAML: byte 0xe9 is not UTF-8; save the file as UTF-8"


def test_config_path_that_is_a_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read the config file (Is a directory)"


def test_missing_file_is_a_one_line_error_naming_the_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such config file"


@pytest.mark.parametrize("text", ["- model\n- train\n", "just a string\n", "42\n"], ids=["list", "string", "number"])
def test_top_level_that_is_not_a_mapping_is_an_error_naming_the_file(tmp_path, text):
    path, msg = _error(tmp_path, text)
    assert msg == f"{path}: the top level must be a mapping of sections (model:, train:, ...)"


def test_empty_file_gives_the_default_config(tmp_path):
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.model == RunConfig().model
    assert cfg.train.lr == 1e-3


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_config_from_dict_errors_are_prefixed_with_the_source():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"top_k": 9}}, source="inline")
    assert str(info.value) == "inline: model.top_k=9 must be in [1, model.num_experts=8]"


# ----------------------------------------------------------------------------- overrides


def test_override_reads_3e_minus_4_as_a_float_although_yaml_reads_it_as_a_string(tmp_path, demo):
    import yaml

    assert yaml.safe_load("3e-4") == "3e-4"  # the PyYAML quirk the loader works around
    cfg = load_config(demo, ["train.lr=3e-4"])
    assert cfg.train.lr == 0.0003
    assert type(cfg.train.lr) is float


def test_float_written_without_a_dot_in_the_file_is_a_float(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  lr: 3e-4\n  eps: 1\n"))
    assert cfg.train.lr == 0.0003 and type(cfg.train.lr) is float
    assert cfg.train.eps == 1.0 and type(cfg.train.eps) is float


def test_override_list_becomes_a_tuple(demo):
    cfg = load_config(demo, ["scaling.num_workers=[1,2]"])
    assert cfg.scaling.num_workers == (1, 2)
    assert cfg.scaling.worker_range == (1, 2)


def test_override_null_becomes_none(demo):
    cfg = load_config(demo, ["model.capacity_factor=1.25"])
    assert cfg.model.capacity_factor == 1.25
    cfg = load_config(demo, ["model.capacity_factor=1.25", "model.capacity_factor=null"])
    assert cfg.model.capacity_factor is None


def test_override_empty_value_becomes_none(demo):
    cfg = load_config(demo, ["model.capacity_factor="])
    assert cfg.model.capacity_factor is None


def test_override_can_add_a_key_in_a_section_the_file_does_not_have(demo):
    # demo.yaml has no model.balance.z_loss_coef and no train.grad_accum.
    cfg = load_config(demo, ["model.balance.z_loss_coef=0.001", "train.grad_accum=4"])
    assert cfg.model.balance.z_loss_coef == 0.001
    assert cfg.model.balance.seq_aux_loss_coef == 0.0001  # the file's sibling keys survive
    assert cfg.train.grad_accum == 4


def test_override_can_create_a_whole_nested_section():
    cfg = config_from_dict({}, ["model.balance.aux_loss_coef=0.01"])
    assert cfg.model.balance.aux_loss_coef == 0.01
    assert cfg.model.balance.bias_update_rate == 0.001


def test_later_override_wins(demo):
    cfg = load_config(demo, ["train.steps=100", "train.steps=200"])
    assert cfg.train.steps == 200


def test_override_without_equals_sign_is_an_error_naming_the_file(demo):
    with pytest.raises(ConfigError) as info:
        load_config(demo, ["train.lr"])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == f"{demo}: --set 'train.lr' must look like key.path=value"


def test_override_of_unknown_key_is_an_error_naming_the_key(demo):
    with pytest.raises(ConfigError) as info:
        load_config(demo, ["train.lrr=0.1"])
    assert "unknown key train.lrr" in str(info.value)


def test_override_that_is_not_valid_yaml_is_an_error_naming_the_key(demo):
    with pytest.raises(ConfigError) as info:
        load_config(demo, ["model.dense_layers=[0, 1"])
    assert str(info.value) == (f"{demo}: --set model.dense_layers: '[0, 1' is not a valid YAML value "
                               "(expected ',' or ']', but got '<stream end>'); quote it or fix it")


def test_override_into_a_scalar_is_an_error_naming_the_key(demo):
    with pytest.raises(ConfigError) as info:
        load_config(demo, ["train.lr.x=1"])
    assert str(info.value) == f"{demo}: --set train.lr.x: lr is not a section"


def test_override_with_wrong_type_is_checked_like_the_file(demo):
    with pytest.raises(ConfigError) as info:
        load_config(demo, ["model.top_k=two"])
    assert str(info.value) == f"{demo}: model.top_k='two' must be an integer"


def test_overrides_do_not_mutate_the_input_dict():
    data = {"train": {"steps": 5, "warmup_steps": 1}}
    config_from_dict(data, ["train.steps=7", "model.top_k=1"])
    assert data == {"train": {"steps": 5, "warmup_steps": 1}}


# ----------------------------------------------------------------------------- the loaded config


def test_output_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(tmp_path, "output_dir: out/sub\n"))
    assert cfg.output_dir == os.path.join(str(tmp_path), "out", "sub")
    assert os.path.isabs(cfg.output_dir)
    assert cfg.storage_path == os.path.join(str(tmp_path), "out", "sub", "runs")
    assert cfg.data_cache_dir == os.path.join(str(tmp_path), "out", "sub", "data")


def test_output_dir_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_from_dict({"output_dir": "~/runs"})
    assert cfg.output_dir == os.path.join(str(tmp_path), "runs")


@pytest.mark.parametrize(
    "assign",
    [
        lambda c: setattr(c, "name", "x"),
        lambda c: setattr(c.model, "top_k", 1),
        lambda c: setattr(c.model.balance, "aux_loss_coef", 1.0),
        lambda c: setattr(c.train, "lr", 1.0),
    ],
    ids=["run", "model", "balance", "train"],
)
def test_config_is_frozen(assign, demo):
    cfg = load_config(demo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        assign(cfg)


def test_sections_are_keyword_only():
    from raymoe.config import ModelConfig

    with pytest.raises(TypeError):
        ModelConfig(260)  # type: ignore[misc]


def test_flat_keys_are_dotted_paths_to_leaf_values(demo):
    cfg = load_config(demo)
    flat = cfg.flat()
    assert flat["model.balance.bias_update_rate"] == 0.001
    assert flat["model.num_experts"] == 8
    assert flat["train.lr"] == 0.003
    assert flat["scaling.num_workers"] == 2
    assert flat["train.betas"] == [0.9, 0.95]  # tuples flatten to lists, not to dotted indices
    assert flat["name"] == "demo"
    assert "model.balance" not in flat and "model" not in flat
    assert all(not isinstance(v, dict) for v in flat.values())


def test_model_hash_changes_with_the_model_section_only(demo):
    base = load_config(demo)
    assert base.model_hash() == load_config(demo).model_hash()
    assert len(base.model_hash()) == 16
    assert load_config(demo, ["model.top_k=3"]).model_hash() != base.model_hash()
    assert load_config(demo, ["model.balance.bias_update_rate=0.002"]).model_hash() != base.model_hash()
    assert load_config(demo, ["train.lr=3e-4"]).model_hash() == base.model_hash()
    assert load_config(demo, ["scaling.num_workers=4", "name=other"]).model_hash() == base.model_hash()


@pytest.mark.parametrize(
    "overrides",
    [[], ["scaling.num_workers=[1,3]", "model.capacity_factor=1.5", "train.lr=3e-4", "train.eps=1e-8"]],
    ids=["demo", "demo_with_overrides"],
)
def test_to_yaml_round_trips_to_an_equal_config(tmp_path, overrides, demo):
    cfg = load_config(demo, overrides)
    path = _write(tmp_path, cfg.to_yaml(), "resolved.yaml")
    again = load_config(path)
    assert again == cfg
    assert again.model_hash() == cfg.model_hash()
    assert again.to_yaml() == cfg.to_yaml()


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=.inf", "model.capacity_factor=nan", "train.grad_clip=.nan"])
def test_non_finite_float_is_an_error_naming_the_key(override):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, [override])
    assert override.split("=")[0] in str(info.value)


@pytest.mark.parametrize(
    "path",
    # Not finetune-demo.yaml: its init_from is the model `make demo` registers (test_shipped_configs
    # loads it against a stand-in).
    sorted(str(p) for p in (Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml")
           if "init_from:" not in p.read_text()),
    ids=os.path.basename,
)
def test_every_shipped_config_round_trips_through_to_yaml(tmp_path, path):
    cfg = load_config(path)
    assert load_config(_write(tmp_path, cfg.to_yaml(), "resolved.yaml")) == cfg


# ----------------------------------------------------------------------------- writable directories




def test_writable_output_dir_is_created_and_left_without_a_probe_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config_from_dict({"output_dir": str(tmp_path / "out" / "run"), "data": {"cache_dir": str(tmp_path / "cache")}})
    check_writable(cfg)
    assert os.listdir(tmp_path / "out" / "run") == [] and os.listdir(tmp_path / "cache") == []


def test_output_dir_under_a_file_is_a_one_line_error_naming_key_path_and_file(tmp_path):
    (tmp_path / "afile").write_text("")
    cfg = config_from_dict({"output_dir": str(tmp_path / "afile" / "out")})
    with pytest.raises(ConfigError) as info:
        check_writable(cfg)
    assert str(info.value) == (f"output_dir={tmp_path / 'afile' / 'out'} is not writable ({tmp_path / 'afile'} is a file, "
                               "not a directory); set output_dir to a writable directory")


def test_output_dir_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ConfigError, match=r"output_dir=.*/out is not writable \(.*/out is a file, not a directory\)"):
        check_writable(config_from_dict({"output_dir": str(tmp_path / "out")}))


def test_read_only_output_dir_is_an_error_even_for_root():
    path = read_only_dir()
    with pytest.raises(ConfigError) as info:
        check_writable(config_from_dict({"output_dir": path}))
    assert str(info.value) == f"output_dir={path} is not writable (Operation not permitted); set output_dir to a writable directory"


def test_unwritable_data_cache_dir_is_an_error_naming_data_cache_dir(tmp_path):
    path = read_only_dir()
    cfg = config_from_dict({"output_dir": str(tmp_path / "out"), "data": {"cache_dir": path}})
    with pytest.raises(ConfigError) as info:
        check_writable(cfg)
    assert str(info.value) == (f"data.cache_dir={path} is not writable (Operation not permitted); "
                               "set data.cache_dir to a writable directory (null = <output_dir>/data)")


def test_default_mlflow_store_directory_is_checked_wherever_tracking_puts_it(tmp_path, monkeypatch):
    import raymoe.tracking

    store = read_only_dir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(raymoe.tracking, "default_tracking_uri", lambda uri, output_dir: uri or f"sqlite:///{store}/mlflow.db")
    cfg = config_from_dict({"output_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError) as info:
        check_writable(cfg)
    assert str(info.value) == (f"the MLflow store sqlite:///{store}/mlflow.db (tracking.uri=null) is not writable (Operation not "
                               "permitted); set output_dir to a writable directory, or tracking.uri to another store")
    check_writable(config_from_dict({"output_dir": str(tmp_path / "out"), "tracking": {"uri": "http://mlflow:5000"}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    check_writable(cfg)
