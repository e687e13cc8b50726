"""Relative error of raymoe's logits against transformers', for every tiny model of tests/tiny_hf.py.

    python bench/hf_parity.py

Each model is built offline from its config with decisive random weights, saved with
save_pretrained, opened by raymoe (model_dir.open_source: the same mapping `raymoe import` uses) and
run on the same 2 x 40 tokens in fp32. Prints a table and writes bench/results/hf-parity.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "platform"), os.path.join(HERE, "..", "tests")]


def main() -> None:
    import torch
    import transformers

    from raymoe.model.transformer import MoETransformer
    from raymoe.model_dir import load_weights, open_source
    from tiny_hf import ALL, build

    rows = {}
    x = torch.randint(3, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    for name in ALL:
        with tempfile.TemporaryDirectory() as d:
            ref = build(name)
            ref.save_pretrained(d)
            src = open_source(d)
            model = MoETransformer(src.cfg.model)
            load_weights(model, src)
            with torch.no_grad():
                a, b = model.eval()(x).logits, ref(x).logits
            rows[name] = float((a - b).norm() / b.norm())
        print(f"{name:28s} {rows[name]:.2e}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "hf-parity.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "relative_error": rows}, f, indent=1)


if __name__ == "__main__":
    main()
