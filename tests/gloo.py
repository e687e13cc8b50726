"""Helpers for the multi-process (gloo, no Ray) tests of tests/distributed/."""

from __future__ import annotations

import json
import os
import socket


PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.checkpoint", "pyarrow.dataset", "raymoe.train.loop", "raymoe.parallel.apply", "raymoe.parallel.checkpoint"]
"""What the fork server imports once, so that each rank starts without importing torch again."""


def spawn(fn, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn, but every rank forked from a server process that has already
    imported torch (with torch._dynamo, which the first parameter init under a device context imports: 2 s a rank) and the training code (multiprocessing's forkserver with a preload): about two
    seconds less per rank group on the 2-core machine, and, unlike a plain fork of the test process,
    nothing of the parent's threads or torch state is inherited."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(PRELOAD)  # read when the server first starts
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MetricByStep:
    """A reporter keeping one metric of every report (every log step: `wants_metrics`)."""

    wants_metrics = True

    def __init__(self, key: str):
        self.key, self.by_step = key, {}

    def report(self, metrics, checkpoint_dir):
        self.by_step[int(metrics["train/step"])] = metrics[self.key]


def train_and_record(rank: int, world: int, port: int, cfg_dict: dict, corpus_dir: str, out_file: str, key: str) -> None:
    """One rank of a training run (mp.spawn target); rank 0 writes {step: metrics[key]} to out_file."""
    import torch
    import torch.distributed as dist

    from raymoe.config import config_from_dict
    from raymoe.train.loop import DistInfo, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reporter = MetricByStep(key)
    train(config_from_dict(cfg_dict), corpus_dir=corpus_dir, reporter=reporter, info=DistInfo(rank, world, torch.device("cpu")))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(reporter.by_step, f)
    dist.destroy_process_group()
