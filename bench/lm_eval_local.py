"""lm-evaluation-harness against `raymoe serve`, checked against lm-eval's own transformers backend.

    pip install lm-eval                      # not in the test extra: it pulls datasets, sacrebleu, nltk, ...
    python bench/lm_eval_local.py            # about two minutes on 2 cores

What it does, offline:
1. Builds a tiny random DeepseekV3ForCausalLM with a byte-level BPE tokenizer (tests/tiny_hf.py) in a temp dir.
2. Writes a 12-question multiple-choice task as a local JSONL file.
3. Scores the task twice with lm-eval's Python API (`simple_evaluate`), with log_samples on:
   - `local-completions` (OpenAI completions over HTTP, token-id prompts, `echo` + `logprobs`) against
     `raymoe serve DIR --monolithic` on a local Ray;
   - lm-eval's `hf` model, which runs the same checkpoint in transformers in this process.
4. Every per-choice log-likelihood and is-greedy flag must agree (1e-3), and so must acc.

It writes bench/results/lm_eval_local.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [
    ("def add(a, b):\n    return", [" a + b", " a - b", " None"], 0),
    ("import", [" os", " ))", " 12"], 0),
    ("for i in", [" range(10):", " if else", " ]]"], 0),
    ("class Foo", ["(object):", " = = =", " 1 2 3"], 0),
    ("x = [1, 2,", [" 3]", " def", " )"], 0),
    ("while True:\n   ", [" break", " class", " ]"], 0),
    ("print(", ["'hello')", ")))", " import"], 0),
    ("if x ==", [" 0:", " def", " ]]]"], 0),
    ("return", [" self", " (((", " import import"], 0),
    ("from os import", [" path", " 1 2", " ::"], 0),
    ("try:\n    pass\n", ["except:", "class:", "0000"], 0),
    ("with open(f) as", [" fh:", " 9 9", " (("], 0),
]

TASK = """task: raymoe_tiny_code_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"raymoe serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                return json.loads(r.read())["data"][0]["id"]
        except OSError:
            time.sleep(2)
    raise SystemExit(f"raymoe serve did not answer at {url} within {timeout_s:.0f} s")


def per_choice(result: dict) -> list[tuple[float, bool]]:
    samples = sorted(result["samples"]["raymoe_tiny_code_mc"], key=lambda s: s["doc_id"])
    return [(float(ll), bool(g)) for s in samples for ll, g in (r[0] for r in s["resps"])]


def main() -> None:
    import lm_eval
    import tiny_hf
    from lm_eval.tasks import TaskManager

    work = Path(tempfile.mkdtemp(prefix="raymoe-lm-eval-"))
    model_dir = work / "model"
    tiny_hf.save("DeepseekV3ForCausalLM", model_dir)
    data = work / "task.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (work / "tasks").mkdir()
    (work / "tasks" / "raymoe_tiny_code_mc.yaml").write_text(TASK.format(data=data))
    task_manager = TaskManager(include_path=str(work / "tasks"))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen([sys.executable, "-m", "raymoe.cli", "serve", str(model_dir), "--monolithic", "--port", str(port)],
                             stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "platform")})
    try:
        name = wait_ready(url, serve)
        t0 = time.time()
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=["raymoe_tiny_code_mc"], task_manager=task_manager, log_samples=True,
            model_args=f"base_url={url}/v1/completions,model={name},tokenizer={model_dir},tokenizer_backend=huggingface,add_bos_token=True,"
                       "num_concurrent=1,max_retries=1")
        served_s = time.time() - t0
    finally:
        serve.terminate()
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
    t0 = time.time()
    local = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32,add_bos_token=True", tasks=["raymoe_tiny_code_mc"],
                                    task_manager=task_manager, log_samples=True, device="cpu", batch_size=1)
    local_s = time.time() - t0

    a, b = per_choice(served), per_choice(local)
    worst = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    greedy_same = sum(x[1] == y[1] for x, y in zip(a, b))
    acc = {k: r["results"]["raymoe_tiny_code_mc"]["acc,none"] for k, r in (("raymoe", served), ("hf", local))}
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "lm_eval": lm_eval.__version__, "questions": len(QUESTIONS),
           "choices": len(a), "acc": acc, "max_abs_loglikelihood_diff": worst, "is_greedy_agree": f"{greedy_same}/{len(a)}",
           "seconds": {"raymoe_local_completions": round(served_s, 1), "hf": round(local_s, 1)},
           "loglikelihoods": {"raymoe": a, "hf": b}}
    path = ROOT / "bench" / "results" / "lm_eval_local.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "loglikelihoods"}, indent=1))
    print(f"wrote {path}")
    if worst > 1e-3 or greedy_same != len(a) or acc["raymoe"] != acc["hf"]:
        raise SystemExit("raymoe's scores differ from transformers' for the same checkpoint")


if __name__ == "__main__":
    main()
