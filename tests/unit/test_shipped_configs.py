"""Every config under jobs/configs/ loads strictly and documents each key with a comment."""

import re
from pathlib import Path

import pytest

from raymoe.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))
KEY_LINE = re.compile(r"^\s*[A-Za-z_][\w.-]*\s*:")


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 4


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """A model directory with the demo's architecture: what finetune-demo.yaml's init_from names
    (models:/raymoe-demo/latest, which only `make demo` registers)."""
    from raymoe.model.transformer import MoETransformer
    from raymoe.model_dir import write_model_dir

    demo = load_config(CONFIGS[0].parent / "demo.yaml")
    model = MoETransformer(demo.model)
    model.init_weights(seed=0)
    out = str(tmp_path_factory.mktemp("demo") / "model")
    write_model_dir(out, demo, model.state_dict().items())
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path, request):
    overrides = []
    if "init_from: models:/raymoe-demo/" in path.read_text():
        overrides = [f"model.init_from={request.getfixturevalue('demo_model')}"]
    cfg = load_config(path, overrides)
    assert cfg.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_of_a_shipped_config_has_a_comment(path):
    lines = path.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if not KEY_LINE.match(line):
            continue
        trailing = re.search(r"\s#", line) is not None
        above = i > 0 and lines[i - 1].strip().startswith("#")
        if not (trailing or above):
            undocumented.append(f"{path.name}:{i + 1}: {line.strip()}")
    assert not undocumented, "keys without a comment:\n" + "\n".join(undocumented)
