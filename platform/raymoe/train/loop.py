"""The training loop. No Ray in here: it runs under Ray Train (ray_train.py) or plain `torchrun`.

    result = train(cfg, corpus_dir=..., reporter=..., tracker=..., resume_dirs=[...])

Three parts, as in torchtitan's Trainer: `build_run` builds a run (the model cut to this rank's
experts on its mesh, the optimizer, the newest loadable checkpoint, the data iterators);
`train_step` runs one optimizer step; `train` is the loop around them: step callbacks (fault
injection and restart tracking, train/faults.py), the metric windows (train/metrics.py) flushed
at log steps, validation, checkpoints.

Each optimizer step: `grad_accum` micro-batches of `batch_size` sequences per rank, cross-entropy
plus the routers' balance losses, backward; gradients averaged over ranks (data parallel); the
per-expert loads summed over every micro-batch of every rank, so the auxiliary-loss-free bias
moves identically on all replicas; global-norm clipping; AdamW with linear warmup and cosine
decay. Every `log_every` steps rank 0 logs the metrics to the tracker and prints one progress line.

The reporter is called at the same steps on every rank: under Ray Train it is `ray.train.report`,
a barrier across the worker group. So it is called at checkpoint steps, and at the other log
steps only when it says it `wants_metrics` (a Tune trial, whose scheduler reads them); a
reporter without that attribute gets every log step.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.distributed as dist

from raymoe.config import RunConfig
from raymoe.tracking import LOAD_HISTORY
from raymoe.model.lora import apply_lora, cast_frozen_, count_parameters, init_adapters, set_trainable
from raymoe.model.params import train_flops_per_token
from raymoe.model.transformer import MoETransformer
from raymoe.parallel.apply import ParallelPlan, assign_, materialize, parallelize
from raymoe.parallel.checkpoint import TrainerState, load_latest_good, save_checkpoint
from raymoe.parallel.mesh import Mesh, build_mesh, resolve_expert_degree
from raymoe.train.data import BatchIterator, eval_batches, open_corpus
from raymoe.train.faults import FaultInjector, RestartWatch
from raymoe.train.metrics import MetricWindows, device_peak_flops, format_progress


RUN_CONFIG = "run_config.json"  # what serving rebuilds the model from


class Reporter(Protocol):
    wants_metrics: bool
    """True: report at every log step (a Tune trial: its scheduler reads the metrics). False: only
    at checkpoint steps, so a plain run does not stop at a worker-group barrier every log step;
    MLflow gets every log step from rank 0 either way. Absent: True."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """Same signatures as the MLflow tracker; what non-zero ranks and tests get."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass


@dataclass
class TrainStart:
    """What the loop tells its callbacks once the run is built, before the first step."""

    step: int
    """Where training continues: the loaded checkpoint's step, 0 = from scratch."""
    checkpoint: str | None
    """The checkpoint loaded, if any."""
    resumes: int
    """The checkpoint's own count of resumes (TrainerState.restarts), this one included."""
    world_size: int
    expert_degree: int


class StepCallback(Protocol):
    """Hooks the loop calls on every rank, in the order given (faults.py has two)."""

    def on_train_start(self, start: TrainStart) -> None: ...
    def on_step_begin(self, step: int) -> None: ...
    def on_step_end(self, step: int) -> None: ...
    def on_train_end(self, step: int) -> None: ...


class _OnStep:
    """`train(on_step=fn)`: fn(step) after every optimizer step."""

    def __init__(self, fn: Callable[[int], None]):
        self.fn = fn

    def on_train_start(self, start: TrainStart) -> None:
        pass

    def on_step_begin(self, step: int) -> None:
        pass

    def on_step_end(self, step: int) -> None:
        self.fn(step)

    def on_train_end(self, step: int) -> None:
        pass


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    load_history: list[dict[str, Any]]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def current(cls, device: torch.device | None = None) -> "DistInfo":
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = 0, 1
        if device is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
        return cls(rank, world, device)


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine to lr * min_lr_ratio at cfg.steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm scales and the embedding lookup are exempt).
    Fused (one kernel over all tensors) on CUDA and on CPU, where it is 3.8x faster than the
    per-tensor loop (docs/PERFORMANCE.md)."""
    # One group per (decay, mesh): a fused step takes either plain tensors or DTensors of one
    # device mesh (FSDP's dense shards, experts sharded over their replicas), never a mix.
    groups: dict[tuple[bool, int], list[torch.nn.Parameter]] = {}
    for name, p in named_params:
        decays = not (p.dim() < 2 or name.startswith("embed."))
        groups.setdefault((decays, id(getattr(p, "device_mesh", None))), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0} for (decays, _), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type in ("cuda", "cpu"))


def _uses_bf16(cfg, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast_for(cfg, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if _uses_bf16(cfg, device) else nullcontext()


def _all_reduce_(t: torch.Tensor, world: int, op=None) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _write_line(msg: str) -> None:
    # Not print(): Ray Train patches it to tee into its logger, which shows each line twice.
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def print0(rank: int) -> Callable[[str], None]:
    """A print for rank 0 only; other ranks get a no-op."""
    return _write_line if rank == 0 else (lambda msg: None)


def _to_device(batch, device: torch.device):
    """(inputs, targets, loss mask, positions, segments) on the device; the last three are None for
    pre-training windows, where every target counts and no sequence is packed."""
    if isinstance(batch, tuple):
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True), None, None, None
    return tuple(t.to(device, non_blocking=True) for t in (batch.inputs, batch.targets, batch.loss_mask, batch.positions, batch.segments))


def _held_bytes(tensors) -> int:
    """Bytes this rank holds of these tensors (its local shard of FSDP DTensors)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in local)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the AdamW moments this rank holds (what LoRA and freezing shrink)."""
    return _held_bytes(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)


def _load_init_from(model, cfg: RunConfig, mesh, log) -> str:
    """model.init_from's weights into the (parallelized) model; returns the source's fingerprint.
    Each rank reads the dense tensors and only the rows of the experts it owns."""
    from raymoe.model_dir import load_weights, open_source
    from raymoe.tracking import tracking_uri

    t_load = time.perf_counter()
    src = open_source(cfg.model.init_from, tracking_uri(cfg))
    ep = mesh.expert_degree
    load_weights(model, src, experts=mesh.local_experts() if ep > 1 else None)
    log(f"initialized from {cfg.model.init_from} in {time.perf_counter() - t_load:.1f}s"
        + (f" (each rank read its {mesh.experts_per_rank} experts per layer)" if ep > 1 else ""))
    return src.fingerprint()


def evaluate(model, batches, cfg: RunConfig, info: DistInfo) -> float:
    """Mean validation cross-entropy (per loss-carrying token) over this rank's fixed batches, over all ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    with torch.no_grad(), autocast_for(cfg.train, info.device):
        for batch in batches:
            x, y, mask, pos, seg = _to_device(batch, info.device)
            token_loss = model(x, positions=pos, segments=seg, targets=y).token_loss
            ce = token_loss.sum() if mask is None else (token_loss * mask).sum()
            total[0] += ce.double()
            total[1] += y.numel() if mask is None else float(mask.sum())
    model.train()
    _all_reduce_(total, info.world_size)
    return float(total[0] / total[1])


@dataclass
class TrainingRun:
    """Everything `build_run` makes: what `train_step` and the loop work on."""

    cfg: RunConfig
    info: DistInfo
    model: MoETransformer
    optimizer: torch.optim.Optimizer
    plan: ParallelPlan
    mesh: Mesh
    state: TrainerState
    """Step, data position, resume count: what every checkpoint saves."""
    checkpoint: str | None
    """The checkpoint this run resumed from (None: from scratch)."""
    records: dict[str, Any]
    """The checkpoint's JSON records (the expert-load history)."""
    only: set[str] | None
    """State-dict keys a checkpoint holds (a LoRA run's: what trains), None = all."""
    batches: Any
    """BatchIterator or SFTBatches: this rank's training batches, at the resumed position."""
    val: list
    """This rank's fixed validation batches."""
    moe_layers: list
    trainable: int
    total: int

    @property
    def sft(self) -> bool:
        return self.cfg.data.format == "sft"

    @property
    def tokens_per_step(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.seq_len * tc.grad_accum * self.info.world_size


def build_run(cfg: RunConfig, *, corpus_dir: str, resume_dirs: Sequence[str], info: DistInfo, log: Callable[[str], None]) -> TrainingRun:
    """The model on this rank's part of the mesh, its optimizer, the newest loadable checkpoint of
    `resume_dirs` (newest first) if any, and this rank's data iterators at the resumed position."""
    tc = cfg.train
    # Built on the meta device and cut to this rank's experts before anything is allocated: a rank
    # never holds the other ranks' experts. Initialization is per tensor and per expert (seeded by
    # name and global expert id), so every layout starts from the same global weights.
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    apply_lora(model, cfg.lora, seed=tc.seed)
    set_trainable(model, cfg)
    model.checkpoint_every = tc.activation_checkpointing
    ep = resolve_expert_degree(cfg.parallel.expert_degree, info.world_size, cfg.model.num_experts)
    mesh = build_mesh(info.world_size, info.rank, ep, cfg.model.num_experts)
    plan = parallelize(model, mesh, dense=cfg.parallel.dense, device_type=info.device.type,
                       compute_dtype=torch.bfloat16 if _uses_bf16(tc, info.device) else None)
    materialize(model, plan, info.device)
    if cfg.model.init_from or resume_dirs:
        # Every weight is about to be loaded, from model.init_from or a checkpoint (if none of the
        # checkpoints loads, the run stops below): drawing random weights first would be wasted.
        model.init_buffers()
    else:
        model.init_weights(seed=tc.seed, assign=assign_)
    init_adapters(model, seed=tc.seed, assign=assign_)
    optimizer = build_optimizer([(n, p) for n, p in plan.dense + plan.experts if p.requires_grad], tc, info.device)
    state = TrainerState(model_hash=cfg.model_hash(), world_size=info.world_size, expert_degree=ep)
    records: dict[str, Any] = {}
    # A LoRA run's checkpoints hold what trains (and the buffers); the frozen base is read from
    # model.init_from at every start, and must be the base the adapters were trained on.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    only = {k for k in model.state_dict() if k not in frozen} if cfg.lora.enabled else None
    base_fingerprint = None
    if cfg.lora.enabled:
        base_fingerprint = _load_init_from(model, cfg, mesh, log)
        state.extra["base"] = {"init_from": cfg.model.init_from, "fingerprint": base_fingerprint}
        if _uses_bf16(tc, info.device) and not plan.fsdp:  # compute is bf16 anyway; the frozen copy needs no fp32
            saved = cast_frozen_(model, torch.bfloat16)
            log(f"frozen base held in bf16 ({saved / 2**20:.1f} MiB less per rank)")
    trainable, total = count_parameters(model)
    resumed = load_latest_good(list(resume_dirs), model, optimizer, plan, cfg.model_hash(), log=log,
                               only=only, expect_base=base_fingerprint)
    checkpoint = None
    if resumed is not None:
        checkpoint, state, records = resumed
        state.restarts += 1
        log(f"resumed from step {state.step} of {checkpoint} (saved at world size {state.world_size}, expert degree "
            f"{state.expert_degree}; now {info.world_size} and {ep}; resume #{state.restarts})")
        state.world_size, state.expert_degree = info.world_size, ep
    else:
        log(f"world size {info.world_size}: expert degree {ep} x data degree {mesh.data_degree}, "
            f"{mesh.experts_per_rank if cfg.model.num_experts else 0} routed experts per rank per layer")
        if cfg.model.init_from and not cfg.lora.enabled:
            _load_init_from(model, cfg, mesh, log)
    if cfg.lora.enabled or tc.freeze:
        what = (f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}" + (" + routers" if cfg.lora.train_router else "")
                if cfg.lora.enabled else f"frozen: {', '.join(tc.freeze)}")
        log(f"{what}: {trainable:,} of {total:,} parameters train on this rank ({100 * trainable / total:.2f}%)")
    model.train()

    if cfg.data.format == "sft":
        from raymoe.train.sft import SFTBatches, open_sft, sft_eval_batches

        examples = open_sft(corpus_dir)
        batches = SFTBatches(examples.examples("train"), batch_size=tc.batch_size, seq_len=tc.seq_len, rank=info.rank,
                             world_size=info.world_size, seed=tc.seed, position=state.data_position, packing=cfg.data.packing)
        val = sft_eval_batches(examples.examples("val"), tc.batch_size, tc.seq_len, tc.val_batches, info.rank,
                               info.world_size, packing=cfg.data.packing)
    else:
        corpus = open_corpus(corpus_dir)
        batches = BatchIterator(
            corpus.tokens("train"), batch_size=tc.batch_size, seq_len=tc.seq_len, rank=info.rank,
            world_size=info.world_size, seed=tc.seed, position=state.data_position,
        )
        val = eval_batches(corpus.tokens("val"), tc.batch_size, tc.seq_len, tc.val_batches, info.rank, info.world_size)
    return TrainingRun(cfg=cfg, info=info, model=model, optimizer=optimizer, plan=plan, mesh=mesh, state=state,
                       checkpoint=checkpoint, records=records, only=only, batches=batches, val=val,
                       moe_layers=model.moe_layers(), trainable=trainable, total=total)


@dataclass
class StepOutput:
    """One optimizer step's measurements, for the metric windows."""

    lr: float
    ce_sum: torch.Tensor
    """Cross-entropy summed over the micro-batches (SFT: over loss tokens), float64, on the device."""
    ce_count: float
    """What ce_sum is a sum over: micro-batches (pre-training), loss tokens (SFT)."""
    load_LE: torch.Tensor
    """Tokens per expert per MoE layer, summed over every rank (the bias update's input)."""
    dropped: torch.Tensor | int
    slots: int
    loss_tokens: float
    """Loss-carrying tokens of the global batch (SFT; 0 for pre-training)."""
    grad_norm: torch.Tensor
    grad_bytes: int


def train_step(run: TrainingRun) -> StepOutput:
    """One optimizer step: forward/backward over grad_accum micro-batches, gradient sync and
    clipping, AdamW, the routers' bias update. Advances run.state (step, data position)."""
    cfg, tc, info, model = run.cfg, run.cfg.train, run.info, run.model
    lr = lr_at(run.state.step, tc)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    moe_layers = run.moe_layers
    step_load = torch.zeros(len(moe_layers), max(cfg.model.num_experts, 1), dtype=torch.long, device=info.device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    ce_count, dropped, slots, loss_tokens = 0.0, 0, 0, 0.0
    micro = [_to_device(run.batches.next_batch(), info.device) for _ in range(tc.grad_accum)]
    if run.sft:
        # Every loss token of the global batch weighs the same, whatever rank or micro-batch
        # it fell in: normalize by the step's global count (the gradient sync averages ranks).
        step_loss_tokens = _all_reduce_(sum(m[2].sum() for m in micro).to(torch.float64).reshape(1), info.world_size)
        loss_tokens = float(step_loss_tokens)
        denom = float(step_loss_tokens.clamp(min=1)) / info.world_size
    for x, y, mask, pos, seg in micro:
        with autocast_for(tc, info.device):
            out = model(x, positions=pos, segments=seg, targets=y)
            if mask is None:
                ce = out.token_loss.mean()
                loss = (ce + out.aux_loss) / tc.grad_accum
            else:
                ce = (out.token_loss * mask).sum()
                loss = ce / denom + out.aux_loss / tc.grad_accum
        loss.backward()
        ce_sum += ce.detach().double()
        ce_count += 1 if mask is None else float(mask.sum())
        for i, st in enumerate(out.moe_stats):
            step_load[i] += st.tokens_per_expert
            dropped = dropped + st.num_dropped  # a tensor: int() here would be a host sync per layer
            slots += st.num_slots

    run.plan.sync_gradients()
    grad_norm = run.plan.clip_grad_norm_(tc.grad_clip)
    run.optimizer.step()
    grad_bytes = _held_bytes(p.grad for p in model.parameters())
    run.optimizer.zero_grad(set_to_none=True)
    # Every replica sees the same global load, so every replica's bias moves the same way.
    _all_reduce_(step_load, info.world_size)
    for layer, moe in enumerate(moe_layers):
        moe.router.update_bias(step_load[layer])
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    run.state.step += 1
    run.state.data_position = run.batches.position
    return StepOutput(lr=lr, ce_sum=ce_sum, ce_count=ce_count, load_LE=step_load, dropped=dropped, slots=slots,
                      loss_tokens=loss_tokens, grad_norm=grad_norm, grad_bytes=grad_bytes)


def validate(run: TrainingRun) -> float:
    """Validation loss (every rank calls it), without its all-to-all traffic in moe/a2a_bytes."""
    loss = evaluate(run.model, run.val, run.cfg, run.info)
    # Evaluation's forward passes dispatch tokens too; counted, they would land in the next
    # training step's window (a spike after every validation).
    run.plan.take_a2a_bytes()
    return loss


def save_run_checkpoint(run: TrainingRun, load_history: list[dict[str, Any]]) -> str:
    """This rank's part of a checkpoint of the run, in a fresh temporary directory (the caller
    reports it, then deletes it)."""
    # Every rank writes its own part (dense on rank 0, expert shards on data index 0);
    # Ray Train merges the ranks' directories.
    info = run.info
    ckpt_dir = tempfile.mkdtemp(prefix=f"raymoe-ckpt-{run.state.step:07d}-r{info.rank}-")
    records = {LOAD_HISTORY: load_history, RUN_CONFIG: run.cfg.to_dict()} if info.rank == 0 else None
    save_checkpoint(ckpt_dir, run.model, run.optimizer, run.plan, run.state, records=records, only=run.only)
    return ckpt_dir


def train(
    cfg: RunConfig,
    *,
    corpus_dir: str,
    reporter: Reporter,
    tracker: Tracker | None = None,
    resume_dirs: Sequence[str] = (),
    info: DistInfo | None = None,
    fault_marker: str | None = None,
    on_step: Callable[[int], None] | None = None,
    callbacks: Sequence[StepCallback] = (),
) -> TrainResult:
    """Train from scratch, or from the newest loadable checkpoint in `resume_dirs` (newest first).

    `fault_marker`: a file path on storage every rank sees; train.fault_injection writes the kill
    time there (so it fires once per run) and the first step after the restart reads it back.
    `on_step(step)` runs after every step; `callbacks` get every hook of StepCallback.
    """
    info = info or DistInfo.current()
    if info.device.type == "cuda":
        # NCCL's object collectives and barriers (checkpoint manifests) run on the current device.
        torch.cuda.set_device(info.device)
    tracker = tracker if (tracker is not None and info.rank == 0) else NullTracker()
    log = print0(info.rank)
    tc = cfg.train

    # Before anything that can fail: a start that finds the previous one unfinished is a restart.
    watch = RestartWatch(os.path.join(cfg.storage_path, cfg.name), cfg.name, rank=info.rank, world_size=info.world_size,
                         fault_marker=fault_marker, tracker=tracker, log=log)
    run = build_run(cfg, corpus_dir=corpus_dir, resume_dirs=resume_dirs, info=info, log=log)
    state = run.state
    # The watch first (its record of the last finished step must not wait for others), the kill last.
    hooks: list[StepCallback] = [watch, *callbacks, *([_OnStep(on_step)] if on_step is not None else [])]
    if tc.fault_injection is not None:
        hooks.append(FaultInjector(tc.fault_injection, rank=info.rank, world_size=info.world_size, marker=fault_marker, log=log))

    last_train = last_val = None
    if run.checkpoint is None:
        start = {"params/trainable_per_rank": run.trainable, "params/total_per_rank": run.total}
        if run.sft:
            start.update({"data/padding_fraction": run.batches.padding_fraction, "data/loss_fraction": run.batches.loss_fraction})
            log(f"sft data: {run.batches.num_rows} rows of {tc.seq_len} tokens, {100 * run.batches.loss_fraction:.1f}% of "
                f"slots carry loss, {100 * run.batches.padding_fraction:.1f}% padding")
        if cfg.model.init_from:
            # Where fine-tuning starts from, on the same held-out data: the baseline of every later val/loss.
            start["val/loss"] = last_val = validate(run)
            log(f"validation loss of model.init_from before training: {last_val:.4f}")
        tracker.log_metrics(start, step=0)
    begin = TrainStart(step=state.step, checkpoint=run.checkpoint, resumes=state.restarts, world_size=info.world_size,
                       expert_degree=run.mesh.expert_degree)
    for h in hooks:
        h.on_train_start(begin)
    if state.step >= tc.steps:
        log(f"already at step {state.step} of train.steps={tc.steps}; nothing to train")
        # Still report once: whoever drives this run (a Tune trial resumed after finishing its
        # steps, say) needs the final metrics, not an empty result.
        last_val = validate(run)
        reporter.report({"train/step": state.step, "val/loss": last_val}, None)

    windows = MetricWindows(
        num_moe_layers=len(run.moe_layers), num_experts=cfg.model.num_experts, device=info.device,
        world_size=info.world_size, tokens_per_step=run.tokens_per_step,
        flops_per_token=train_flops_per_token(cfg.model, tc.seq_len), peak_flops=device_peak_flops(info.device),
        expert_parallel=run.mesh.expert_degree > 1, sft=run.sft,
        # Carried in every checkpoint, so the run's heatmap survives restarts.
        load_history=list(run.records.get(LOAD_HISTORY, [])),
    )
    wants_metrics = getattr(reporter, "wants_metrics", True)
    while state.step < tc.steps:
        step = state.step + 1
        for h in hooks:
            h.on_step_begin(step)
        t0 = time.perf_counter()
        out = train_step(run)
        windows.add_step(ce_sum=out.ce_sum, ce_count=out.ce_count, load_LE=out.load_LE, dropped=out.dropped, slots=out.slots,
                         seconds=time.perf_counter() - t0, a2a_bytes=run.plan.take_a2a_bytes(), loss_tokens=out.loss_tokens)
        for h in hooks:
            h.on_step_end(step)

        last = step == tc.steps
        do_log = step % tc.log_every == 0 or last
        do_val = step % tc.val_every == 0 or last
        do_ckpt = step % tc.checkpoint_every == 0 or last
        if not (do_log or do_ckpt):
            continue

        metrics: dict[str, float] = {"train/step": step}
        if do_val:
            last_val = metrics["val/loss"] = validate(run)
        if do_log:
            # After validation, so the progress line's wall-clock speed includes it.
            metrics.update(windows.flush(step, lr=out.lr, grad_norm=out.grad_norm))
            last_train = metrics["train/loss"]
            # What this rank holds (raymoe plan's figures; checked in tests/distributed/test_fsdp.py).
            metrics["memory/optimizer_state_bytes"] = float(_optimizer_state_bytes(run.optimizer))
            metrics["memory/param_bytes"] = float(_held_bytes(run.model.parameters()))
            metrics["memory/grad_bytes"] = float(out.grad_bytes)
            log(format_progress(step, tc.steps, metrics, windows.ms_per_step))
        tracker.log_metrics(metrics, step=step)

        ckpt_dir = save_run_checkpoint(run, windows.load_history) if do_ckpt else None
        if ckpt_dir is not None or wants_metrics:
            # The reporter (Ray Train, and through it Tune's schedulers) sees the latest validation
            # loss in every report; MLflow above gets it only at the steps where it was measured.
            reporter.report({**metrics, "val/loss": last_val} if last_val is not None else metrics, ckpt_dir)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    for h in hooks:
        h.on_train_end(state.step)
    return TrainResult(state.step, last_train, last_val, windows.load_history)
