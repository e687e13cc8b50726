"""Serving benchmark: closed-loop load against the HTTP API, routed vs monolithic, side by side.

    python bench/serve.py                                   # random-weight demo architecture
    python bench/serve.py --model models:/raymoe-demo/latest --concurrency 1 8 32 64 --seconds 10
    python bench/serve.py --concurrency 64 --seconds 12 --repeats 4 --data-paths direct  # the 0.8x target

Every mode is deployed first: monolithic (the baseline), then routed with --groups expert groups,
once per data path (--data-paths: 'direct', the TCP channel of serve/channel.py, and 'handle',
Serve handle calls) and per --micro-batches value. Then, --repeats times, each mode is measured
at each concurrency c: c clients send streaming completions back to back for --seconds. Repeats
are interleaved, so a slow spell of the machine hits every mode alike; the table shows, per point,
the repeat with the median output tokens/s, and the routed/monolithic ratio of every repeat.

Reported: requests/s, output tokens/s, time to first token (TTFT) and per-token latency (time
between tokens after the first) at p50 and p99, failed requests, and the CPU milliseconds each
process spent per output token (Linux /proc). For routed mode also the round trip of one 1-token
expert call measured from the driver on both paths (p50) and the hops per forward pass
(expert-group calls / (decode steps + prefills)). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

PROMPTS = ["def ", "import os\n", "class Node:\n    ", "for i in range(", "return self.", "# Copyright"]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _client(http, url: str, i: int, deadline: float, max_tokens: int, out: dict) -> None:
    n = 0
    while time.perf_counter() < deadline:
        body = {"prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": max_tokens, "stream": True, "temperature": 0.8, "seed": i * 1000 + n}
        n += 1
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        try:
            async with http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    out["failed"] += 1
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    if chunk["choices"][0]["finish_reason"]:
                        tokens = chunk["usage"]["completion_tokens"]
        except Exception:  # noqa: BLE001 - a failed request is a result here
            out["failed"] += 1
            continue
        out["requests"] += 1
        out["tokens"] += tokens
        out["ttft"].append(first - t0)
        if tokens > 1:
            out["tpot"].append((last - first) / (tokens - 1))


async def closed_loop(url: str, concurrency: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    out = {"requests": 0, "tokens": 0, "failed": 0, "ttft": [], "tpot": []}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(_client(http, url, i, deadline, max_tokens, out) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests_per_s": out["requests"] / elapsed,
        "output_tokens_per_s": out["tokens"] / elapsed,
        "ttft_p50_ms": _pct(out["ttft"], 0.5) * 1e3,
        "ttft_p99_ms": _pct(out["ttft"], 0.99) * 1e3,
        "tpot_p50_ms": _pct(out["tpot"], 0.5) * 1e3,
        "tpot_p99_ms": _pct(out["tpot"], 0.99) * 1e3,
        "failed": out["failed"],
        "requests": out["requests"],
    }


def _median_points(repeats: list[list[dict]]) -> list[dict]:
    """Per concurrency, the repeat with the median output tokens/s (all of its figures, as measured)."""
    out = []
    for same_c in zip(*repeats):
        ranked = sorted(same_c, key=lambda p: p["output_tokens_per_s"])
        out.append(ranked[(len(ranked) - 1) // 2])
    return out


def cpu_seconds_by_process() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each Ray process of this machine, by its title
    (e.g. 'ServeReplica:routed-direct:Router'), the driver as 'load generator', and the whole
    machine as 'all'. Linux only (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    with open("/proc/stat") as f:
        cpu = f.readline().split()[1:]
    out["all"] = (sum(map(int, cpu)) - int(cpu[3]) - int(cpu[4])) / tick  # all but idle and iowait
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        name = "load generator" if int(pid) == os.getpid() else title.removeprefix("ray::") if title.startswith("ray::") else None
        if name:
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def round_trips_ms(app: str, hidden: int, token: str, app_key: str, n: int = 200) -> dict[str, float]:
    """Driver -> ExpertGroup0 replica -> driver with one token's activations, p50 over n calls,
    through a Serve handle and through the direct channel."""
    import torch
    from ray import serve

    from raymoe.serve.channel import ExpertChannel
    from raymoe.serve.directory import AppDirectory, Registry

    handle = serve.get_deployment_handle("ExpertGroup0", app_name=app)
    x = torch.randn(1, hidden)
    e = len(handle.load.remote().result()["experts"])
    counts = torch.zeros(e, dtype=torch.long)
    counts[0] = 1
    channel = ExpertChannel(token, num_groups=1, registry=Registry(AppDirectory(app_key)))
    calls = {"handle": lambda: handle.forward.remote((0, x, counts)).result(),
             "direct": lambda: channel.send(0, 0, x, counts).result()}
    out = {}
    for name, call in calls.items():
        times = []
        for i in range(n + 10):
            t0 = time.perf_counter()
            call()
            if i >= 10:
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1e3
    return out


def random_model_dir(config: str) -> str:
    """The architecture of `config` with random weights, saved as a model directory."""
    from raymoe.config import load_config
    from raymoe.model.transformer import MoETransformer
    from raymoe.model_dir import save_model

    cfg = load_config(config)
    model = MoETransformer(cfg.model)
    model.init_weights(0)
    d = tempfile.mkdtemp(prefix="raymoe-bench-model-")
    save_model(model, cfg, d)
    return d


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="MODEL to serve (default: jobs/configs/demo.yaml's architecture, random weights)")
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "demo.yaml"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every mode this many times, interleaved, and report the median repeat per point")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=["monolithic", "routed"])
    p.add_argument("--data-paths", nargs="+", default=["direct", "handle"], choices=["direct", "handle"],
                   help="routed mode runs once per value: the direct TCP channel, Serve handle calls")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1],
                   help="routed mode runs once per value: decode micro-batches that overlap expert calls with compute")
    p.add_argument("--throughput-optimized", action="store_true",
                   help="set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for the Ray started here (cheaper handle hops)")
    p.add_argument("--client-nice", type=int, default=0,
                   help="niceness of this process (the load generator) once Ray is up; Ray's workers run at 15, so 0 "
                        "(default) leaves it ahead of the server processes and 15 puts it level with them")
    p.add_argument("--stream-interval", type=float, default=None,
                   help="serve.stream_interval_s: how often a stream's tokens cross from the Router to the Ingress (default: the serve default)")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/serve-<time>.json)")
    args = p.parse_args()

    import ray
    from ray import serve

    from raymoe.serve.deployments import build_app
    from raymoe.serve.settings import ServeSettings
    from raymoe.serve.engine import load_model

    model = args.model or random_model_dir(args.config)
    cfg, _ = load_model(model)
    if args.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # inherited by the Ray processes started below
    # Every app stays deployed for the interleaved repeats: reserve logical CPUs for all of them
    # (a router 1, a group 0.5); the processes still share the machine's real cores.
    routed_apps = len(args.data_paths) * len(args.micro_batches) if "routed" in args.modes else 0
    reserved = ("monolithic" in args.modes) + routed_apps * (1 + 0.5 * args.groups)
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(reserved)), log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    if args.client_nice:
        # Ray runs every worker (the proxy, routers, expert groups) at niceness 15; a load generator
        # at 0 takes the cores first on a small machine (measured: no gain for routed, see PERFORMANCE.md).
        os.nice(max(0, args.client_nice - os.nice(0)))
    results = {"model": args.model or f"random weights, {os.path.basename(args.config)} architecture", "device": "cpu",
               "throughput_optimized": args.throughput_optimized,
               "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "max_tokens": args.max_tokens,
               "seconds_per_point": args.seconds, "stream_interval_s": args.stream_interval, "modes": {}}
    runs = [("monolithic", "direct", 1)] if "monolithic" in args.modes else []
    runs += [("routed", path, k) for path in args.data_paths for k in args.micro_batches if "routed" in args.modes]
    token = os.urandom(16).hex()
    urls, app_keys = {}, {}
    for base, path, micro in runs:  # every app is up before the first measurement; idle ones cost ~nothing
        mode = base if base == "monolithic" else f"routed-{path}" + (f"-mb{micro}" if micro > 1 else "")
        extra = {} if args.stream_interval is None else {"stream_interval_s": args.stream_interval}
        settings = ServeSettings.of(model, mode=base, num_groups=args.groups, max_batch=args.max_batch, micro_batches=micro, **extra,
                                 data_path=path, channel_token=token, app_key=os.urandom(8).hex())
        app_keys[mode] = settings.app_key
        serve.run(build_app(settings), name=mode, route_prefix=f"/{mode}", logging_config=quiet)
        urls[mode] = f"http://127.0.0.1:{port}/{mode}"
        asyncio.run(closed_loop(urls[mode] + "/v1/completions", 1, 1.0, 4))  # warm up
        results["modes"][mode] = {"path": path, "repeats": []}
    for r in range(args.repeats):  # interleaved: each repeat measures every mode once, so drift hits all alike
        for mode, url in urls.items():
            points = []
            for c in args.concurrency:
                before = cpu_seconds_by_process()
                points.append(asyncio.run(closed_loop(url + "/v1/completions", c, args.seconds, args.max_tokens)))
                after = cpu_seconds_by_process()
                tokens = points[-1]["output_tokens_per_s"] * args.seconds
                # CPU milliseconds per output token, by process: where routed mode spends more than monolithic
                points[-1]["cpu_ms_per_token"] = {k: round((after[k] - before.get(k, 0.0)) * 1e3 / max(tokens, 1), 3)
                                                  for k in after if after[k] - before.get(k, 0.0) > 0.05 * args.seconds}
            results["modes"][mode]["repeats"].append(points)
            print(f"repeat {r + 1}/{args.repeats} {mode}: " + ", ".join(
                f"c={p['concurrency']} {p['output_tokens_per_s']:.0f} tok/s" for p in points), flush=True)
    for mode, entry in results["modes"].items():
        entry["points"] = _median_points(entry["repeats"])
        if mode != "monolithic":
            import urllib.request

            with urllib.request.urlopen(urls[mode] + "/v1/expert_load") as resp:
                load = json.load(resp)
            forwards = load["decode_steps"] + load["prefills"]
            entry["hops_per_forward"] = sum(load["groups"]["calls"]) / max(forwards, 1)
            entry["retries"], entry["fallbacks"] = load["groups"]["retries"], load["groups"]["fallbacks"]
            if entry["path"] == "direct":
                entry["round_trip_p50_ms"] = round_trips_ms(mode, cfg.model.hidden_size, token, app_keys[mode])
        serve.delete(mode)
    serve.shutdown()

    print(f"\nserving {results['model']}, {args.max_tokens} tokens per request, {args.seconds:.0f} s per point, "
          f"{os.cpu_count()} CPUs")
    header = f"{'mode':<16} {'conc':>4} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'failed':>6}"
    print(header)
    print("-" * len(header))
    for mode, entry in results["modes"].items():
        for pt in entry["points"]:
            print(f"{mode:<16} {pt['concurrency']:>4} {pt['requests_per_s']:>7.2f} {pt['output_tokens_per_s']:>8.1f} "
                  f"{pt['ttft_p50_ms']:>7.0f}ms {pt['ttft_p99_ms']:>7.0f}ms {pt['tpot_p50_ms']:>7.1f}ms {pt['tpot_p99_ms']:>7.1f}ms {pt['failed']:>6}")
    print(f"\nCPU ms per output token at c={args.concurrency[-1]}, by process ('all': the whole machine)")
    for mode, entry in results["modes"].items():
        usage = sorted(entry["points"][-1]["cpu_ms_per_token"].items(), key=lambda kv: -kv[1])
        print(f"{mode:<16} " + ", ".join(f"{k.split(':')[-1]} {v:.2f}" for k, v in usage))
    m = results["modes"].get("monolithic")
    for mode, r in results["modes"].items():
        if mode == "monolithic":
            continue
        if m:
            for pr, pm in zip(r["points"], m["points"]):
                pr["ratio_to_monolithic"] = pr["output_tokens_per_s"] / max(pm["output_tokens_per_s"], 1e-9)
            print(f"{mode} / monolithic output tokens/s (medians): " + ", ".join(f"c={p['concurrency']}: {p['ratio_to_monolithic']:.2f}x" for p in r["points"]))
            if args.repeats > 1:  # the same ratio within each repeat: its spread says how far to trust the median
                per = [[pr["output_tokens_per_s"] / max(pm["output_tokens_per_s"], 1e-9) for pr, pm in zip(rr, mr)]
                       for rr, mr in zip(r["repeats"], m["repeats"])]
                r["ratio_per_repeat"] = per
                for i, c in enumerate(args.concurrency):
                    print(f"  c={c} per repeat: " + ", ".join(f"{x[i]:.2f}x" for x in per))
        print(f"{mode}: {r['hops_per_forward']:.2f} expert-group hops per forward")
        if "round_trip_p50_ms" in r:
            rt = r["round_trip_p50_ms"]
            print(f"one 1-token expert call from the driver, p50: Serve handle {rt['handle']:.2f} ms, direct channel {rt['direct']:.3f} ms")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
