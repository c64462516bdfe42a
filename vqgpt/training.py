"""The one training loop (`fit`) and what every stage builds it from: the schedule, distributed setup,
per-step seeding, the optimizer, checkpoint state and resumption, tracking, faults.

Kept as small functions so the stages (vqgpt/stages.py) read top to bottom (nanoGPT's `get_lr`, not a
Trainer class).
"""

from __future__ import annotations

import gc
import json
import math
import os
import secrets
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


# --- learning rate -----------------------------------------------------------------------------------
def lr_at(step: int, *, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to max_lr over `warmup` steps, then cosine decay to min_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- determinism ---------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of one training step on one rank.

    Every random choice of a step (batch order, augmentation, caption dropout, dropout) is drawn from
    RNGs reseeded here at the start of the step, so a resumed run needs no RNG state at all to continue
    exactly where it stopped, and each rank draws differently.
    """
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**62)


def seed_step(seed: int, step: int, rank: int = 0) -> torch.Generator:
    s = step_seed(seed, step, rank)
    torch.manual_seed(s)  # the global stream: dropout and the model's own randomness (CPU and CUDA)
    return torch.Generator().manual_seed(s)  # a private stream for data choices


def epoch_batch(n: int, step: int, global_batch: int, seed: int) -> torch.Tensor:
    """Indices of the global batch for `step`: epochs are seeded permutations, walked in order.

    A pure function of (step, seed): resuming at step k continues mid-epoch exactly.
    """
    if n < 1:
        raise ValueError("the dataset is empty")
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 31 + epoch))
        out.extend(perm[offset : offset + global_batch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)


# --- distributed ---------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device mps was asked for but torch sees no MPS device (Apple silicon, a macOS build)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device(device))
    if device == "mps":
        raise RuntimeError("--device mps trains in one process: run train.py without torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():  # the demo runs both stages in one process
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Tear the process group down after a successful run, once every rank is done.

    Call it after the training function has returned: FSDP's modules hold the group, and a group still alive
    when the interpreter exits made a rank abort ("terminate called without an active exception") in about 1
    of 30 two-process runs on gloo. Not after an error: a barrier with a failed rank would wait forever.
    """
    if dist.is_initialized():
        gc.collect()  # FSDP's hooks form reference cycles; free the modules (and their group) now
        dist.barrier()
        dist.destroy_process_group()


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank, when there is a process group of more than one (a no-op otherwise)."""
    if _group_size() > 1:
        dist.barrier()


@contextmanager
def rank_zero_first(d: Dist | None = None):
    """Rank 0 runs the block first (it fills any cache all ranks share: rendered sets, `datasets` files), the
    other ranks wait at a barrier and then run it on the warm cache, so that no two ranks build one cache."""
    rank = dist.get_rank() if _group_size() > 1 else 0
    if rank != 0:
        barrier()
    try:
        yield
    finally:
        if rank == 0:
            barrier()


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX)? Elsewhere bf16 is emulated and slow."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """precision 'bf16' | 'fp32' | 'auto': bf16 on CUDA, and on a CPU that has native bf16 (there the demo's
    GPT steps ran 1.26x and the tokenizer's 1.65x faster than in fp32); fp32 elsewhere."""
    return precision_choice(device, precision)[0]


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what `platform` knows), for logs and reports."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def precision_choice(device: torch.device, precision: str = "auto") -> tuple[bool, str]:
    """(bf16?, the reason in words): what `use_bf16` decides and why, for the line a run starts with."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision != "auto":
        return precision == "bf16", f"{precision}: asked for with --precision {precision}"
    if device.type == "cuda":
        return True, "bf16: a CUDA device (autocast; weights and optimizer state stay fp32)"
    if device.type != "cpu":
        return False, f"fp32: no bf16 autocast on {device.type}"
    if cpu_has_bf16():
        return True, (
            f"bf16: this CPU ({cpu_name()}) multiplies bf16 natively (avx512_bf16 or amx); weights and "
            "optimizer state stay fp32"
        )
    return False, (
        f"fp32: this CPU ({cpu_name()}) has no native bf16 (no avx512_bf16/amx in its flags), where bf16 "
        "would be emulated and slower"
    )


def autocast(device: torch.device, bf16: bool | None = None):
    """bf16 autocast (weights and optimizer stay fp32). bf16=None: on CUDA only."""
    if bf16 is None:
        bf16 = device.type == "cuda"
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# --- numerical faults ------------------------------------------------------------------------------------
class NonFiniteGuard:
    """Skips steps whose loss or gradient is not finite; stops the run after `limit` in a row."""

    def __init__(self, limit: int = 20):
        self.limit = limit
        self.skipped = 0
        self.in_a_row = 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, d: Dist | None = None) -> bool:
        """True when the step may be applied. Syncs with the host once a step (the loss is logged anyway).

        Under torchrun every rank takes the same decision (a rank that stepped alone would drift away)."""
        if hasattr(grad_norm, "full_tensor"):  # FSDP2's clip_grad_norm_ returns a DTensor (already reduced)
            grad_norm = grad_norm.full_tensor()
        finite = (torch.isfinite(loss.detach().float()) & torch.isfinite(grad_norm.detach().float())).float()
        if d is not None and d.enabled:
            finite = finite.reshape(1).clone()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        ok = bool(finite.item())
        if ok:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        warnings.warn(f"step {step}: non-finite loss or gradient, step skipped ({self.skipped} so far)", stacklevel=2)
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                f"stopping. The last good checkpoint is intact: lower --lr, or check the data, then --resume"
            )
        return False


def weights_finite(model: torch.nn.Module, d: Dist | None = None) -> bool:
    """Are all parameters finite (on every rank, for sharded ones)?"""
    bad = torch.zeros((), dtype=torch.float32)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this rank's shard
        bad += (~torch.isfinite(local.detach())).sum().float().cpu()
    if d is not None and d.enabled:
        bad = bad.reshape(1).to(d.device)
        dist.all_reduce(bad)
    return bool(bad.item() == 0)


class SaveCadence:
    """Checkpoints every `every` steps, written only once their weights have shown a finite loss.

    The step that blows the weights up usually has a finite loss and gradient of its own, so the guard applies
    it; a checkpoint written right after it would hold broken weights, prune a good one, and be what --resume
    reloads. So the checkpoint due after step s is written during step s + 1, after that step's loss and
    gradient (computed from exactly those weights) passed the guard and before its update, and dropped if
    they did not. The last step has no next step: it is saved if its own step passed and its weights are
    finite. Call `before_update(ok)` between the guard and the optimizer step, `after_step(done, ok)` after.
    """

    def __init__(self, save, every: int, total: int, model: torch.nn.Module, d: Dist | None = None):
        self.save, self.every, self.total, self.model, self.d = save, every, total, model, d
        self.pending: int | None = None
        self.last_saved: int | None = None

    def before_update(self, ok: bool) -> None:
        if self.pending is not None:
            if ok:
                self._write(self.pending)
            else:
                warnings.warn(
                    f"checkpoint {self.pending} not written: its weights gave a non-finite loss", stacklevel=2
                )
            self.pending = None

    def after_step(self, done: int, ok: bool) -> None:
        if done == self.total:
            if ok and weights_finite(self.model, self.d):
                self._write(done)
            else:
                raise FloatingPointError(
                    f"training ended on weights that give a non-finite loss; step {done} was not saved and the "
                    f"last good checkpoint ({self.last_saved or 'from before this run'}) is intact: lower --lr, "
                    f"or check the data, then --resume"
                )
        elif done % self.every == 0:
            self.pending = done

    def _write(self, step: int) -> None:
        self.save(step)
        self.last_saved = step


# --- tracking ----------------------------------------------------------------------------------------------
WANDB_RUN_FILE = "wandb.json"  # in the run directory: the wandb run's id and project, so --resume continues it


def init_wandb(
    mode: str | None,
    project: str | None,
    name: str | None,
    config: dict,
    out_dir: str,
    enabled: bool = True,
    resume: bool = False,
    default_name: str = "vqgpt",
):
    """A wandb run, or None. With no account configured the default is offline, never a login prompt.

    project / name: the flags; unset, WANDB_PROJECT / WANDB_NAME, else "vqgpt" / `default_name`. The run's id
    is kept in `out_dir/wandb.json`: with `resume` the stored run is continued (resume="allow", same id, same
    project unless another is asked for), so a resumed training run is one wandb run, not two."""
    if not enabled:
        return None
    if mode is None:
        has_account = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
        mode = os.environ.get("WANDB_MODE") or ("online" if has_account else "offline")
    if mode == "disabled":
        return None
    if mode not in ("online", "offline"):
        raise ValueError(f"--wandb must be online, offline or disabled, got {mode!r}")
    import wandb

    from .checkpoint import atomic_write_bytes, read_json_file

    os.makedirs(out_dir, exist_ok=True)
    record_path = os.path.join(out_dir, WANDB_RUN_FILE)
    stored = read_json_file(record_path, "wandb run record") if resume and os.path.exists(record_path) else {}
    project = project or stored.get("project") or os.environ.get("WANDB_PROJECT") or "vqgpt"
    name = name or stored.get("name") or os.environ.get("WANDB_NAME") or default_name
    run_id = stored.get("id") if stored.get("project") == project else None
    run = wandb.init(
        project=project,
        name=name,
        id=run_id or secrets.token_hex(4),
        resume="allow",
        config=config,
        mode=mode,
        dir=out_dir,
        reinit="finish_previous",
    )
    record = {"id": run.id, "project": project, "name": name}
    atomic_write_bytes(record_path, (json.dumps(record) + "\n").encode())
    return run


def wandb_grid(path, prompts: list[str]):
    """A sample grid for wandb.log, captioned with its prompts in row order (the grid's labels cut long ones)."""
    import wandb

    return wandb.Image(str(path), caption="\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)))


# --- optimizer, wrapping, checkpoint state ------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on norms, biases and other vectors (the usual GPT-2
    split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=False)  # fused: no faster (bench/demo_levers.py)


def wrap_for_training(module: torch.nn.Module, d: Dist, compile: bool, shard=None) -> torch.nn.Module:
    """DDP across ranks when launched by torchrun (gradients all-reduced in backward), then compile.

    With `shard` (a list of blocks), FSDP2 instead: each block and then the root are sharded over the ranks,
    so parameters, gradients and optimizer state take 1/world of the memory each (for the L/XL presets).
    """
    if shard is not None:
        from torch.distributed.fsdp import fully_shard

        for block in shard:
            fully_shard(block)
        fully_shard(module)
    elif d.enabled:
        ids = [d.local_rank] if d.device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return torch.compile(module) if compile else module


def rank_batch_size(batch_size: int, grad_accum: int, d: Dist) -> int:
    """This rank's share of the global batch, which must split evenly over the ranks and micro-batches."""
    per_rank = batch_size // d.world
    if per_rank * d.world != batch_size or per_rank % grad_accum:
        raise ValueError(
            f"--batch-size {batch_size} must split evenly over {d.world} ranks x {grad_accum} micro-batches"
        )
    return per_rank


def trainer_state(
    step: int, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard, extra: dict | None = None
) -> dict:
    """What a checkpoint holds beside the weights: the step, the optimizer and the guard's count."""
    return {"step": step, "optimizer": optimizer.state_dict(), "skipped": guard.skipped, **(extra or {})}


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Unsharded (weights, optimizer state) on the CPU; under FSDP a collective that every rank must call."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore(
    resume, model: torch.nn.Module, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard, d: Dist, adapter=None
) -> tuple[int, dict]:
    """Load weights (the adapter's only, for LoRA) and optimizer from a verified checkpoint (`resume`, or None
    for a fresh run); returns (step to start at, trainer state)."""
    if resume is None:
        return 0, {}
    from .finetune import load_adapter_state
    from .tokenizer import load_state_strict

    if adapter is not None:
        load_adapter_state(adapter.peft_model, resume.weights(), str(resume.path))
    else:
        load_state_strict(model, str(resume.file("model.safetensors")))
    state = resume.trainer_state()
    optimizer.load_state_dict(state["optimizer"])
    guard.skipped = state["skipped"]
    if d.main:
        print(f"resuming {resume.path.parent.parent} from step {state['step']}", flush=True)
    return state["step"], state


def restore_sharded(
    resume, model: torch.nn.Module, optimizer: torch.optim.Optimizer, guard: NonFiniteGuard, d: Dist
) -> int:
    """restore() for an FSDP run: every rank reads the full checkpoint and keeps its shards."""
    if resume is None:
        return 0
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = resume.trainer_state()
    set_state_dict(
        model,
        optimizer,
        model_state_dict=load_file(str(resume.file("model.safetensors"))),
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    guard.skipped = state["skipped"]
    if d.main:
        print(f"resuming {resume.path.parent.parent} from step {state['step']} (FSDP)", flush=True)
    return state["step"]


def progress(total: int, start: int, enabled: bool):
    """The step progress bar (rank 0 only); evaluations write their lines above it."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, unit="step")


# --- the training loop -------------------------------------------------------------------------------------
@dataclass
class Stage:
    """What a training stage hands `fit`: its model, loss and evaluation; the loop owns the rest.

    batches: one item per step from `start`, a tensor or a tuple of tensors with the batch first; each is
    split into `grad_accum` micro-batches. loss(micro, step) -> (loss, stats) runs under autocast.
    after_update(step, batch, stats): extra work after the optimizer step (a GAN's discriminator).
    evaluate(done): in-training evaluation every `eval_every` steps (rank 0 decides inside it).
    log_stats(stats) -> dict: extra numbers for the log. rate_name / items(batch): the throughput figure.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: object
    loss: object
    save: object
    rate_name: str
    items: object
    evaluate: object = None
    after_update: object = None
    log_stats: object = None


@dataclass
class Schedule:
    steps: int
    lr: float
    warmup: int
    grad_accum: int = 1
    clip: float = 1.0
    seed: int = 0
    save_every: int = 500
    eval_every: int = 500
    log_every: int = 25


def fit(
    stage: Stage, sched: Schedule, *, start: int, d: Dist, guard: NonFiniteGuard, bf16: bool, wb=None, bar=None
) -> float:
    """Train from step `start` to `sched.steps`; returns the seconds spent in steps (not evaluating or saving).

    Each step: reseed from (seed, step, rank), set the learning rate, accumulate the micro-batches' gradients,
    clip, let the guard skip a non-finite step, write a due checkpoint once its weights proved finite
    (`SaveCadence`), update, log, evaluate."""
    cadence = SaveCadence(stage.save, sched.save_every, sched.steps, stage.model, d)
    t_last, seen, t_aside, t0 = time.time(), 0, 0.0, time.time()
    stage.model.train()
    for step, batch in zip(range(start, sched.steps), stage.batches):
        seed_step(sched.seed, step, d.rank)
        lr = lr_at(step, max_lr=sched.lr, warmup=sched.warmup, total=sched.steps)
        for g in stage.optimizer.param_groups:
            g["lr"] = lr
        parts = batch if isinstance(batch, (tuple, list)) else (batch,)
        stage.optimizer.zero_grad(set_to_none=True)
        for micro in zip(*(p.chunk(sched.grad_accum) for p in parts)):
            with autocast(d.device, bf16):
                loss, stats = stage.loss(micro if len(micro) > 1 else micro[0], step)
            (loss / sched.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(stage.model.parameters(), sched.clip)
        ok = guard.check(loss.detach(), grad_norm, step, d)
        t_mark = time.time()
        cadence.before_update(ok)
        t_aside += time.time() - t_mark
        if ok:
            stage.optimizer.step()
        if stage.after_update is not None:
            stage.after_update(step, batch, stats)
        seen += stage.items(batch) * d.world
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % sched.log_every == 0 or done == sched.steps:
            rate = seen / max(time.time() - t_last, 1e-9)
            t_last, seen = time.time(), 0
            loss_v = all_reduce_mean(loss.detach().float(), d).item()
            extra = stage.log_stats(stats) if stage.log_stats is not None else {}
            if bar is not None:
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", **{stage.rate_name: f"{rate:.0f}"})
            if wb:
                wb.log(
                    {"train/loss": loss_v, "lr": lr, stage.rate_name: rate, "skipped_steps": guard.skipped, **extra},
                    step=done,
                )
        t_mark = time.time()
        if stage.evaluate is not None and (done % sched.eval_every == 0 or done == sched.steps):
            stage.evaluate(done)
        cadence.after_step(done, ok)
        t_aside += time.time() - t_mark
    return time.time() - t0 - t_aside
