"""Train vqgpt: stage 1 the image tokenizer, stage 2 the text-to-image GPT.

    python train.py                                               # the embedded demo: both stages, then samples
    python train.py tokenizer --data openmoji --out runs/tok       # stage 1
    python train.py gpt --data openmoji --tokenizer runs/tok --out runs/t2i   # stage 2
    torchrun --nproc_per_node 2 train.py gpt ...                   # data-parallel, same flags
    python train.py gpt ... --resume runs/t2i                      # continue exactly where it stopped
    python train.py lit --data shapes --tokenizer runs/tok --out runs/lit   # a LiT scorer (vqgpt/lit.py)

--data is `openmoji`, `shapes`, a local imagefolder (metadata.jsonl with file_name/text) or a hub dataset
name. Every run directory holds the latest model in the public format (ImageTokenizer / TextToImage
`from_pretrained` read it), numbered checkpoints under checkpoints/, and sample grids under samples/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqgpt import data as vdata
from vqgpt import training as T
from vqgpt.checkpoint import CheckpointError, CheckpointManager, claim_run_dir
from vqgpt.cli import DEVICES, HelpFormatter, add_debug_flag, run_or_exit
from vqgpt.loader import StepImages, StreamImages, decode_rows, default_workers, image_batches, stream_rows
from vqgpt.model import PRESETS as GPT_PRESETS
from vqgpt.tokenizer import PRESETS as TOK_PRESETS
from vqgpt.tokenizer import ImageTokenizer, TokenizerConfig, tokenizer_config

# Defaults of the embedded demo, chosen to fit 2 CPU cores: both stages in <= 20 minutes (README, "Two
# commands", says what they reach).
DEMO = {
    "tokenizer": dict(data="openmoji", preset="demo", steps=1200, batch_size=32, lr=2e-3),
    "gpt": dict(data="openmoji", preset="demo", steps=3200, batch_size=32, lr=3e-3, eval_every=800),
    "lit": dict(data="openmoji", preset="small", steps=1500, batch_size=256, lr=1e-3),  # not part of the demo
}  # eval_every: the GPT evaluates (held-out bits, two 8 x 4 sample grids) 4 times, not 7 (bench/demo_levers.py)
# What the demo adds to its GPT stage (README, "Recall on openmoji"). It leaves out the 1,945 skin-tone
# variants, recolourings of other drawings, so that the model memorises 1,907 distinct drawings twice as often
# in its 20 minutes; and it saves sampling defaults near the mode, where a model this small draws the prompted
# drawing more often (guidance did not help that).
DEMO_GPT_ARGS = ["--exclude", "skin tone", "--sample-cfg", "1", "--sample-temperature", "0.3"]


DEFAULT_OUT = {"tokenizer": "tok", "gpt": "t2i", "lit": "lit"}  # run directories under runs/


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="stage")

    def common(sp, stage):
        d = DEMO[stage]
        sp.add_argument("--data", default=d["data"],
                        help="openmoji | shapes | a folder | tar shards ('dir/{00000..00099}.tar') | parquet files | "
                             "a hub dataset name")
        sp.add_argument("--revision", default=None, help="a hub dataset's branch, tag or commit")
        sp.add_argument("--streaming", action="store_true",
                        help="read tar shards, parquet files or a hub set as a stream, file by file, copying "
                             "nothing to the cache (for sets too large to download)")
        sp.add_argument("--image-column", default="image", help="a hub dataset's or parquet file's image column")
        sp.add_argument("--caption-column", default="text", help="a hub dataset's or parquet file's caption column")
        sp.add_argument("--limit", type=int, default=None, help="use at most this many training images (default: all)")
        sp.add_argument("--out", default=None, help=f"run directory (default: --resume's, else runs/"
                        f"{DEFAULT_OUT[stage]})")
        sp.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds")
        presets = TOK_PRESETS if stage == "tokenizer" else GPT_PRESETS
        sp.add_argument("--preset", default=d["preset"], choices=sorted(presets),
                        help="model size (PRESETS in vqgpt/tokenizer.py, vqgpt/model.py)")
        sp.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps in all")
        sp.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch (all ranks)")
        sp.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (per rank)")
        sp.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (cosine decay after warm-up)")
        sp.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of --steps)")
        sp.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
        sp.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
        sp.add_argument("--seed", type=int, default=0, help="initial weights and data order")
        sp.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
        sp.add_argument("--eval-every", type=int, default=d.get("eval_every", 500),
                        help="steps between held-out evaluations and sample grids")
        sp.add_argument("--log-every", type=int, default=25, help="steps between logged losses")
        sp.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
        sp.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when torch sees one, else cpu")
        sp.add_argument("--wandb", default=None, choices=["online", "offline", "disabled"],
                        help="default: online with an account configured, else offline")
        sp.add_argument("--wandb-project", default=None, help="wandb project (default: $WANDB_PROJECT, else vqgpt)")
        sp.add_argument("--wandb-name", default=None,
                        help=f"wandb run name (default: $WANDB_NAME, else {'tok' if stage == 'tokenizer' else 'gpt'}-"
                             "<run directory>); --resume continues the run's own wandb run (runs/<run>/wandb.json)")
        sp.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
        sp.add_argument("--compile", action="store_true", help="torch.compile the model")
        sp.add_argument("--workers", type=int, default=None,
                        help="data loader processes (default: on a GPU one fewer than the cores, at most 8; "
                             "on a CPU none up to 4 cores)")
        sp.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="autocast; auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32")
        add_debug_flag(sp)

    tok = sub.add_parser("tokenizer", help="train the image tokenizer (VQ-VAE)", formatter_class=HelpFormatter)
    common(tok, "tokenizer")
    tok.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    tok.add_argument("--quantizer", choices=["fsq", "vq"], default=None, help="override the preset's")
    tok.add_argument("--norm", choices=["group", "channel"], default=None,
                     help="override the preset's normalisation: GroupNorm over the image, or per position")
    tok.add_argument("--fsq-levels", type=int, nargs="+", default=None, metavar="L",
                     help="override the preset's FSQ levels per latent channel; the codebook is their product")
    tok.add_argument("--gan-weight", type=float, default=0.0, help="PatchGAN hinge loss weight (0 = off)")
    tok.add_argument("--gan-start", type=int, default=None, help="step the GAN loss starts (default half)")
    tok.add_argument("--perceptual-weights", default=None, metavar="VGG16.safetensors",
                     help="local VGG16 features weights; enables the perceptual loss (see vqgpt/perceptual.py)")
    tok.add_argument("--perceptual-weight", type=float, default=0.1, help="weight of the perceptual loss")

    gpt = sub.add_parser("gpt", help="train the text-to-image GPT on a trained tokenizer's codes",
                         formatter_class=HelpFormatter)
    common(gpt, "gpt")
    gpt.add_argument("--tokenizer", default=None, help="image tokenizer directory (stage 1 output; default "
                     "runs/tok, or the --init model's own)")
    gpt.add_argument("--codes", default=None, metavar="DIR",
                     help="the codes store of the data (`python -m vqgpt.encode --out DIR`; made there when "
                          "missing); default: one under the cache, keyed by the data and the tokenizer")
    gpt.add_argument("--crops", type=int, default=1, metavar="N",
                     help="codes of N views of each training image (the centre crop and N-1 random crops, half "
                          "flipped), made when the store is built (`python -m vqgpt.encode --crops N`)")
    gpt.add_argument("--include", default=None, metavar="REGEX", help="train only on captions matching REGEX")
    gpt.add_argument("--exclude", default=None, metavar="REGEX", help="leave out captions matching REGEX")
    ft = gpt.add_argument_group("fine-tuning (see vqgpt/finetune.py)")
    ft.add_argument("--init", default=None, metavar="DIR",
                    help="start from this trained text-to-image model (its image tokenizer stays locked)")
    ft.add_argument("--add-text-tokens", type=int, default=0, metavar="N",
                    help="with --init: give up to N words of the new captions that the old text tokenizer "
                         "spells in pieces their own tokens (default 0: keep the vocabulary)")
    ft.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank only (0: full)")
    ft.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    gpt.add_argument("--text-tokenizer", default=None,
                     help="a transformers tokenizer name or path; default: a BPE trained on the captions")
    gpt.add_argument("--text-vocab", type=int, default=1024, help="vocabulary of the trained BPE")
    gpt.add_argument("--text-len", type=int, default=None, help="text context in tokens (default: fit 99%%)")
    gpt.add_argument("--cfg-dropout", type=float, default=None,
                     help="caption dropout prob, for CFG (default: the preset's)")
    gpt.add_argument("--text-loss-weight", type=float, default=None,
                     help="weight of the next-token loss on the caption (default: the preset's)")
    gpt.add_argument("--fsdp", action="store_true",
                     help="shard parameters, gradients and optimizer state over the ranks (FSDP2) instead of DDP; "
                          "in-training evaluation is then skipped (evaluate the exported model)")
    # Sampling defaults saved with the model; unset ones come from the --init model, else SAMPLING_DEFAULTS.
    gpt.add_argument("--sample-cfg", "--sample-cfg-scale", dest="sample_cfg", type=float, default=None,
                     help="the saved guidance scale (default: 3)")
    gpt.add_argument("--sample-top-k", type=int, default=None, help="the saved top-k (default: none)")
    gpt.add_argument("--sample-top-p", type=float, default=None, help="the saved top-p (default: 1)")
    gpt.add_argument("--sample-temperature", type=float, default=None, help="the saved temperature (default: 1)")
    gpt.add_argument("--sample-cfg-schedule", default=None, choices=["constant", "linear", "interval"],
                     help="the saved guidance schedule (default: constant)")
    gpt.add_argument("--sample-prompts", nargs="*", default=None,
                     help="prompts of the sample grids (default: captions spread over the data)")

    lit_parser(sub, common)
    args = p.parse_args(argv)
    if args.stage in ("tokenizer", "gpt", "lit"):
        check_args(p, args)
        resolve_out(p, args)
    return p, args


def check_args(parser, args) -> None:
    """Numbers that would train nothing, divide by zero or step uphill are refused here, naming the flag."""
    import math

    positive = ["steps", "batch_size", "grad_accum", "save_every", "eval_every", "log_every", "keep", "image_size",
                "text_len", "text_vocab", "crops"]
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name, low in (("lr", 0.0), ("clip", 0.0), ("weight_decay", None), ("gan_weight", None),
                      ("perceptual_weight", None), ("cfg_dropout", None), ("text_loss_weight", None)):
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (low is not None and value <= low):
            parser.error(f"--{name.replace('_', '-')} must be a finite number {'>' if low is not None else '>='} 0, "
                         f"got {value}")
    if getattr(args, "cfg_dropout", None) is not None and args.cfg_dropout > 1:
        parser.error(f"--cfg-dropout is a probability, got {args.cfg_dropout}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.streaming and args.stage == "tokenizer" and args.limit is not None:
        parser.error("--limit does not apply to a streamed tokenizer stage (it reads the files in turn, epoch after "
                     "epoch): pass fewer files")
    if getattr(args, "fsq_levels", None) and min(args.fsq_levels) < 2:
        parser.error(f"--fsq-levels must each be >= 2, got {args.fsq_levels}")


def resolve_out(parser, args) -> None:
    """--out defaults to --resume's directory (a run resumes in place), else runs/tok or runs/t2i."""
    default = f"runs/{DEFAULT_OUT[args.stage]}"
    if args.resume and args.out and Path(args.resume).resolve() != Path(args.out).resolve():
        parser.error(f"--resume {args.resume} and --out {args.out} differ: a run resumes in its own directory")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    args.out = args.out or args.resume or default


# ----------------------------------------------------------------------------------------------------
# Shared pieces


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # No weight decay on norms, biases and embeddings-as-vectors (the usual GPT-2 split).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=False)  # fused: no faster (bench/demo_levers.py)


def wrap_for_training(module: torch.nn.Module, d: T.Dist, compile: bool, shard=None) -> torch.nn.Module:
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


def full_state(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Unsharded (weights, optimizer state) on the CPU; under FSDP a collective that every rank must call."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_sharded(resume, model, optimizer, guard, d: T.Dist) -> int:
    """restore() for an FSDP run: every rank reads the full checkpoint and keeps its shards."""
    if resume is None:
        return 0
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = resume.trainer_state()
    set_state_dict(model, optimizer, model_state_dict=load_file(str(resume.file("model.safetensors"))),
                   optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
    guard.skipped = state["skipped"]
    if d.main:
        print(f"resuming {resume.path.parent.parent} from step {state['step']} (FSDP)", flush=True)
    return state["step"]


class GPTLoss(torch.nn.Module):
    """GPT.loss as a forward(), so that DDP's gradient hooks see the call."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, text_ids, codes):
        return self.gpt.loss(text_ids, codes)


def restore(resume, model, optimizer, guard, d: T.Dist, adapter=None) -> tuple[int, dict]:
    """Load weights (the adapter's only, for LoRA) and optimizer from a verified checkpoint; returns (step to
    start at, trainer state)."""
    if resume is None:
        return 0, {}
    from vqgpt.finetune import load_adapter_state
    from vqgpt.tokenizer import load_state_strict

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


def rank_batch_size(args, d: T.Dist) -> int:
    per_rank = args.batch_size // d.world
    if per_rank * d.world != args.batch_size or per_rank % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} must split evenly over {d.world} ranks x "
                         f"{args.grad_accum} micro-batches")
    return per_rank


def schedule(args, warmup: int) -> T.Schedule:
    return T.Schedule(steps=args.steps, lr=args.lr, warmup=warmup, grad_accum=args.grad_accum, clip=args.clip,
                      seed=args.seed, save_every=args.save_every, eval_every=args.eval_every,
                      log_every=args.log_every)


def trainer_state(step, optimizer, guard, extra=None) -> dict:
    return {"step": step, "optimizer": optimizer.state_dict(), "skipped": guard.skipped, **(extra or {})}


def save_grid(rows: list[torch.Tensor], path: Path, labels: list[str] | None = None) -> Path:
    """Tile image batches (each (n, 3, H, W) in [0, 1]) into one PNG at `path`: one batch per row."""
    from vqgpt.pipeline import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, labels).save(path)
    return path


def progress(total: int, start: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True, unit="step")


# ----------------------------------------------------------------------------------------------------
# Stage 1: the image tokenizer


def patch_discriminator():
    """A small PatchGAN (Isola et al. 2017) for the optional adversarial loss."""
    import torch.nn as nn

    def block(i, o, norm=True):
        return [nn.Conv2d(i, o, 4, 2, 1), *( [nn.GroupNorm(8, o)] if norm else []), nn.LeakyReLU(0.2)]

    return nn.Sequential(*block(3, 64, norm=False), *block(64, 128), *block(128, 256), nn.Conv2d(256, 1, 3, 1, 1))


@torch.no_grad()
def evaluate_tokenizer(model: ImageTokenizer, images: torch.Tensor, batch_size: int = 256) -> dict:
    from vqgpt.metrics import codebook_stats, psnr

    was = model.training
    model.eval()
    x = images.float().div(255)
    codes = torch.cat([model.encode(b.to(model.device)) for b in x.split(batch_size)])
    recon = torch.cat([model.decode(c).cpu() for c in codes.split(batch_size)])
    model.train(was)
    return {"psnr": psnr(recon, x), **codebook_stats(codes, model.codebook_size)}, recon


def tokenizer_data(args, image_size: int, d: T.Dist):
    """(the training images: a map-style set on disk, or a StreamShards with --streaming; uint8 held-out images:
    up to 512 of the test split, spread over it, else the training set's first 64)."""
    kw = dict(image_column=args.image_column, caption_column=args.caption_column, revision=args.revision)
    if args.streaming:
        train_set, test_set = (vdata.stream_shards(args.data, split, **kw) for split in ("train", "test"))
        held_out = stream_rows(test_set, image_size, 512)
        return train_set, held_out if len(held_out) else stream_rows(train_set, image_size, 64)
    with T.rank_zero_first(d):  # one rank renders / converts the data, the others then read its cache
        train_set = vdata.load_captioned(args.data, "train", limit=args.limit, image_size=image_size, **kw)
        test_set = vdata.load_captioned(args.data, "test", image_size=image_size, **kw)
    held_set = test_set if len(test_set) else train_set
    n_held = min(len(held_set), 512 if len(test_set) else 64)
    return train_set, decode_rows(held_set, np.linspace(0, len(held_set) - 1, n_held).round().astype(int), image_size)


def train_tokenizer(args) -> Path:
    d = T.setup_distributed(args.device)
    out = Path(args.out)
    ckpts = CheckpointManager(out, keep=args.keep)
    resume = ckpts.require_latest() if args.resume else None

    # Model: built after the process group exists, so a VQ codebook knows to synchronise across ranks.
    if resume is not None:
        config = TokenizerConfig.from_dict(json.loads(resume.file("tokenizer_config.json").read_text()))
    else:
        overrides = {k: v for k, v in (("image_size", args.image_size), ("quantizer", args.quantizer),
                                       ("fsq_levels", args.fsq_levels and tuple(args.fsq_levels)),
                                       ("norm", args.norm)) if v}
        config = tokenizer_config(args.preset, **overrides)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    model = ImageTokenizer(config).to(d.device)
    model.trained_on = {"data": args.data, "limit": args.limit}  # its model card names the data and its licence

    # Images stay on disk (memory-mapped Arrow); loader workers decode each step's batch (vqgpt/loader.py).
    train_set, held_out = tokenizer_data(args, config.image_size, d)

    disc = patch_discriminator().to(d.device) if args.gan_weight > 0 else None
    perceptual = None
    if args.perceptual_weights:
        from vqgpt.perceptual import PerceptualLoss

        perceptual = PerceptualLoss(args.perceptual_weights).to(d.device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc else None
    guard = T.NonFiniteGuard()
    start, state = restore(resume, model, optimizer, guard, d)
    if disc is not None and "disc" in state:
        disc.load_state_dict(state["disc"])
        disc_opt.load_state_dict(state["disc_optimizer"])
    train_model = wrap_for_training(model, d, args.compile)

    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    gan_start = args.gan_start if args.gan_start is not None else args.steps // 2
    per_rank = rank_batch_size(args, d)
    bf16 = T.use_bf16(d.device, args.precision)
    run_config = {"stage": "tokenizer", "tokenizer": config.to_dict(), "schedule": asdict(schedule(args, warmup)),
                  "args": vars(args), "world": d.world, "params": sum(p.numel() for p in model.parameters())}
    wb = T.init_wandb(args.wandb, args.wandb_project, args.wandb_name, run_config, str(out), enabled=d.main,
                      resume=resume is not None, default_name=f"tok-{out.name}")
    if d.main:
        n_train = f"{train_set.n} streamed files of" if args.streaming else len(train_set)
        print(f"tokenizer: {run_config['params'] / 1e6:.2f}M params, {n_train} train / {len(held_out)} "
              f"held-out images, codes {config.grid_size}x{config.grid_size} of {config.codebook_size}, "
              f"{'bf16' if bf16 else 'fp32'} autocast", flush=True)

    def save(step):
        if not d.main:
            return
        extra = {"disc": disc.state_dict(), "disc_optimizer": disc_opt.state_dict()} if disc else {}
        ckpts.save(step, model.state_dict(), trainer_state(step, optimizer, guard, extra),
                   files={"tokenizer_config.json": json.dumps(config.to_dict())},
                   export=model.save_pretrained)

    use_gan = disc is not None

    def loss(x, step):
        recon, _, aux = train_model(x)
        recon = recon.float()
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        total = rec + aux
        if perceptual is not None:
            total = total + args.perceptual_weight * perceptual(recon, x)
        if use_gan and step >= gan_start:
            total = total - args.gan_weight * disc(recon * 2 - 1).mean()  # hinge generator loss
        return total, {"rec": rec, "recon": recon}

    def discriminator_step(step, x, stats):  # hinge loss on detached reconstructions (after the generator's)
        if use_gan and step >= gan_start:
            disc_opt.zero_grad(set_to_none=True)
            d_loss = F.relu(1 - disc(x * 2 - 1)).mean() + F.relu(1 + disc(stats["recon"].detach() * 2 - 1)).mean()
            d_loss.backward()
            disc_opt.step()

    def evaluate(done):
        if not d.main:
            return
        metrics, recon = evaluate_tokenizer(model, held_out)
        pick = torch.linspace(0, len(held_out) - 1, 8).long()  # spread over the split, not its first rows
        grid = save_grid([held_out[pick].float() / 255, recon[pick]], out / "samples" / f"recon-{done:07d}.png")
        bar.write(f"step {done}: held-out PSNR {metrics['psnr']:.2f} dB, usage {metrics['usage']:.1%}, "
                  f"perplexity {metrics['perplexity']:.0f} -> {grid}")
        if wb:
            import wandb

            wb.log({"eval/psnr": metrics["psnr"], "eval/usage": metrics["usage"],
                    "eval/perplexity": metrics["perplexity"],
                    "eval/recon": wandb.Image(str(grid), caption="top: held-out images, bottom: reconstructions")},
                   step=done)

    # Each step's images, decoded and flipped in loader workers, as floats in [0, 1] on the device.
    if args.streaming:
        step_images = StreamImages(train_set, config.image_size, per_rank=per_rank, rank=d.rank, world=d.world,
                                   seed=args.seed, start=start, steps=args.steps)
    else:
        step_images = StepImages(train_set, config.image_size, global_batch=args.batch_size, per_rank=per_rank,
                                 rank=d.rank, seed=args.seed)
    workers = default_workers(d.device) if args.workers is None else args.workers
    loader = image_batches(step_images, start, args.steps, workers=workers, pin_memory=d.device.type == "cuda")
    batches = (x.to(d.device, non_blocking=True).float().div_(255) for x in loader)
    stage = T.Stage(model=model, optimizer=optimizer, batches=batches, loss=loss, save=save,
                    rate_name="images_per_s", items=len, evaluate=evaluate, after_update=discriminator_step,
                    log_stats=lambda stats: {"train/rec_loss": stats["rec"].item()})
    bar = progress(args.steps, start, d.main)
    T.fit(stage, schedule(args, warmup), start=start, d=d, guard=guard, bf16=bf16, wb=wb, bar=bar)
    bar.close()
    if wb:
        wb.finish()
    return out


# ----------------------------------------------------------------------------------------------------
# Stage 2: the text-to-image GPT

DEFAULT_PROMPTS = {
    "openmoji": ["green apple", "red heart", "grinning face", "dog face", "sun", "rocket", "pizza", "snowman"],
    "shapes": ["a large red circle at the center on a white background",
               "a small blue square at the top left on a black background",
               "a large green triangle at the bottom right on a white background",
               "a small yellow star at the top right on a blue background"],
}


MAX_HELD_OUT = 2048  # held-out images evaluated during training (bits per token), spread over the split
MAX_TEXT_SAMPLE = 100_000  # captions a new BPE and the text context are fitted on, spread over the set


def load_gpt_data(args, image_tok, d: T.Dist):
    """The memory-mapped codes stores of the train and test splits (`vqgpt.encode`: built on the first run for
    this data and tokenizer, each rank encoding its own shards), and the store rows that the stage uses: those
    whose caption passes --include/--exclude, then the first --limit of them; held-out rows at most
    MAX_HELD_OUT, spread over the split."""
    from vqgpt.encode import encode, split_dir

    kw = dict(image_column=args.image_column, caption_column=args.caption_column, revision=args.revision,
              rank=d.rank, world=d.world, progress=d.main, streaming=args.streaming)
    filtered = args.include is not None or args.exclude is not None
    limit_later = filtered or args.streaming  # a stream is encoded whole: --limit then takes its first rows

    def where(split):
        return split_dir(args.codes, split) if args.codes else None

    train = encode(args.data, "train", image_tok, where("train"), limit=None if limit_later else args.limit,
                   crops=args.crops, **kw)
    test = encode(args.data, "test", image_tok, where("test"), **kw)
    cap = None if args.limit is None else args.limit * args.crops  # rows of the first --limit images
    rows, test_rows = np.arange(len(train), dtype=np.int64)[:cap], np.arange(len(test), dtype=np.int64)
    if filtered:
        rows = np.asarray(vdata.caption_filter(train.iter_captions(), args.include, args.exclude)[:cap],
                          dtype=np.int64)
        test_rows = np.asarray(vdata.caption_filter(test.iter_captions(), args.include, args.exclude), dtype=np.int64)
        if not len(rows):
            raise ValueError(f"no training caption of {args.data} passes --include {args.include!r} "
                             f"--exclude {args.exclude!r}")
        if d.main:
            print(f"data: {len(rows)} of {len(train)} training and {len(test_rows)} of {len(test)} held-out "
                  "images pass --include/--exclude", flush=True)
    return train, rows, test, spread(test_rows, MAX_HELD_OUT)


def spread(rows: np.ndarray, n: int) -> np.ndarray:
    """At most n of `rows`, evenly spread over them (all of them when there are fewer)."""
    if len(rows) <= n:
        return rows
    return rows[np.linspace(0, len(rows) - 1, n).round().astype(np.int64)]


def train_gpt(args) -> Path:
    from vqgpt.finetune import (
        Adapter,
        adapter_state,
        add_lora,
        add_text_tokens,
        grow_text_vocab,
        new_words,
        peak_memory_mb,
        trainable_summary,
        weights_fingerprint,
    )
    from vqgpt.generate import SamplingConfig
    from vqgpt.model import GPT, GPTConfig, gpt_config
    from vqgpt.pipeline import TextToImage
    from vqgpt.text import TextTokenizer

    d = T.setup_distributed(args.device)
    out = Path(args.out)
    ckpts = CheckpointManager(out, keep=args.keep)
    resume = ckpts.require_latest() if args.resume else None
    has_ft = resume is not None and resume.file("finetune.json").exists()
    finetune = json.loads(resume.file("finetune.json").read_text()) if has_ft else {}  # the --init run's record
    init = None
    if resume is None and args.init:  # fine-tuning: the init model brings its (locked) image tokenizer
        init = TextToImage.from_pretrained(args.init, device=d.device)
        if args.tokenizer and ImageTokenizer.from_pretrained(args.tokenizer).fingerprint() != \
                init.image_tokenizer.fingerprint():
            raise ValueError(f"--tokenizer {args.tokenizer} is not the image tokenizer of --init {args.init}; "
                             "leave --tokenizer out when fine-tuning (the init model's own is used)")
        image_tok = init.image_tokenizer
    else:
        tok_dir = resume.file("image_tokenizer") if resume is not None else Path(args.tokenizer or "runs/tok")
        image_tok = ImageTokenizer.from_pretrained(tok_dir, device=d.device)
    image_tok.requires_grad_(False)
    store, rows, test_store, test_rows = load_gpt_data(args, image_tok, d)
    captions = store.captions(spread(rows, MAX_TEXT_SAMPLE))  # what a new BPE and the text context are fitted on

    new_ids: dict[int, list[int]] = {}  # new text token id -> the old ids that spelled it
    if resume is not None:
        text_tok = TextTokenizer.from_pretrained(resume.file("text_tokenizer"))
        config = GPTConfig.from_dict(json.loads(resume.file("gpt_config.json").read_text()))
    elif init is not None:
        text_tok = init.text_tokenizer
        if args.add_text_tokens:
            new_ids = add_text_tokens(text_tok, new_words(text_tok, captions, args.add_text_tokens))
            if d.main:
                print(f"text vocabulary: +{len(new_ids)} tokens {text_tok.hf.convert_ids_to_tokens(list(new_ids))}")
        overrides = {k: v for k, v in (("cfg_dropout", args.cfg_dropout),) if v is not None}
        config = replace(init.gpt.config, text_vocab_size=text_tok.vocab_size, **overrides)
        finetune = {"base": str(Path(args.init).resolve()), "base_gpt": weights_fingerprint(init.gpt),
                    "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "new_token_ids": sorted(new_ids)}
    else:
        if args.lora_rank:
            raise ValueError("--lora-rank needs --init: adapters fine-tune a trained model")
        text_tok = (TextTokenizer.from_pretrained(args.text_tokenizer) if args.text_tokenizer
                    else TextTokenizer.train(captions, vocab_size=args.text_vocab))
        text_len = args.text_len or fit_text_len(text_tok, captions, verbose=d.main)
        overrides = {k: v for k, v in (("cfg_dropout", args.cfg_dropout), ("text_loss_weight", args.text_loss_weight))
                     if v is not None}
        config = gpt_config(args.preset, text_vocab_size=text_tok.vocab_size, text_pad_id=text_tok.pad_id,
                            text_len=text_len, image_vocab_size=image_tok.codebook_size,
                            image_grid=(image_tok.grid_size, image_tok.grid_size), **overrides)
    test_ids = text_tok(test_store.captions(test_rows), config.text_len)  # (N_test, T_text)
    test_codes = test_store.codes(test_rows)  # (N_test, h*w)
    del captions

    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    adapter = None
    if finetune.get("lora_rank"):  # LoRA: the base's weights (checked), grown vocabulary, adapters on top
        if args.fsdp:
            raise ValueError("--lora-rank with --fsdp is not supported: LoRA already keeps the optimizer state small")
        base = init.gpt if init is not None else TextToImage.from_pretrained(finetune["base"], device=d.device).gpt
        if weights_fingerprint(base) != finetune["base_gpt"]:
            raise ValueError(f"the base model {finetune['base']} changed since this LoRA run started")
        model = grow_text_vocab(base, config.text_vocab_size, new_ids)
        model.config.cfg_dropout = config.cfg_dropout
        peft_model = add_lora(model, finetune["lora_rank"], finetune["lora_alpha"],
                              new_token_ids=finetune["new_token_ids"])
        adapter = Adapter(peft_model, finetune["base"], finetune["base_gpt"])
    elif init is not None:
        model = grow_text_vocab(init.gpt, config.text_vocab_size, new_ids)
        model.config.cfg_dropout = config.cfg_dropout
    else:
        model = GPT(config).to(d.device)
    model.train()
    guard = T.NonFiniteGuard()
    if args.fsdp:  # shard first, then build the optimizer over the sharded parameters
        loss_fn = wrap_for_training(GPTLoss(model), d, args.compile, shard=model.layers)
        optimizer = make_optimizer(model, args.lr, args.weight_decay)
        start = restore_sharded(resume, model, optimizer, guard, d)
    else:
        optimizer = make_optimizer(model, args.lr, args.weight_decay)
        start, _ = restore(resume, model, optimizer, guard, d, adapter)
        loss_fn = wrap_for_training(GPTLoss(model), d, args.compile)

    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    per_rank = rank_batch_size(args, d)
    bf16 = T.use_bf16(d.device, args.precision)
    prompts = args.sample_prompts or DEFAULT_PROMPTS.get(args.data) or store.captions(rows[:8])
    trainable = trainable_summary(model)
    if d.main:
        print(f"gpt: {model.num_params() / 1e6:.2f}M params ({trainable['trainable_params'] / 1e6:.3f}M trainable), "
              f"{len(rows)} train / {len(test_codes)} held-out images, sequence {config.text_len} text + 1 + "
              f"{config.n_image} image tokens, {'bf16' if bf16 else 'fp32'} autocast", flush=True)
    # The sampling defaults saved with the model (sample.py and TextToImage use them unless told otherwise).
    given = {"cfg_scale": args.sample_cfg, "cfg_schedule": args.sample_cfg_schedule, "top_k": args.sample_top_k,
             "top_p": args.sample_top_p, "temperature": args.sample_temperature}
    sampling = replace(init.sampling if init is not None else SamplingConfig(),
                       **{k: v for k, v in given.items() if v is not None})
    sampling.validate(config.image_vocab_size)
    run_config = {"stage": "gpt", "gpt": config.to_dict(), "schedule": asdict(schedule(args, warmup)),
                  "sampling": asdict(sampling), "args": vars(args), "world": d.world, "params": model.num_params(),
                  "image_tokenizer": image_tok.fingerprint(), **trainable}
    wb = T.init_wandb(args.wandb, args.wandb_project, args.wandb_name, run_config, str(out), enabled=d.main,
                      resume=resume is not None, default_name=f"gpt-{out.name}")

    trained_on = {"data": args.data, "include": args.include, "exclude": args.exclude, "limit": args.limit}

    def pipeline():
        return TextToImage(model, image_tok, text_tok, sampling, adapter, trained_on)

    def save(step):
        if adapter is not None:  # only the adapters (and new token rows): the base is referenced
            weights, optim_state = adapter_state(adapter.peft_model), optimizer.state_dict()
        else:
            weights, optim_state = full_state(model, optimizer, args.fsdp)  # a collective under FSDP: all ranks
        if not d.main:
            return
        files = {"gpt_config.json": json.dumps(config.to_dict())}
        if finetune:
            files["finetune.json"] = json.dumps(finetune)
        ckpts.save(step, weights, {**trainer_state(step, optimizer, guard), "optimizer": optim_state}, files=files,
                   writers={"image_tokenizer": image_tok.save_pretrained, "text_tokenizer": text_tok.save_pretrained},
                   export=lambda run_dir: pipeline().save_pretrained(run_dir, gpt_state=weights))

    def batches():  # this rank's rows of each step's batch, read from the memory-mapped store and tokenised
        for step in range(start, args.steps):
            pos = T.epoch_batch(len(rows), step, args.batch_size, args.seed)[d.rank * per_rank:(d.rank + 1) * per_rank]
            idx = rows[pos.numpy()]
            yield (text_tok(store.captions(idx), config.text_len).to(d.device),  # (B, T_text)
                   store.codes(idx).to(d.device))  # (B, h*w)

    def evaluate(done):
        if not d.main or args.fsdp:
            return
        bits = held_out_bits(model, test_ids, test_codes)
        paths = [sample_grid(pipeline(), prompts, cfg, out / "samples" / f"step-{done:07d}-cfg{cfg:g}.png")
                 for cfg in (1.0, 3.0)]
        bar.write(f"step {done}: held-out {bits:.3f} bits/image token -> {paths[-1]}")
        if wb:
            wb.log({"eval/bits_per_token": bits,
                    **{f"samples/cfg{c:g}": T.wandb_grid(p, prompts) for c, p in zip((1, 3), paths)}}, step=done)

    stage = T.Stage(model=model, optimizer=optimizer, batches=batches(), loss=lambda b, step: loss_fn(*b),
                    save=save, rate_name="tokens_per_s", items=lambda b: b[1].numel(), evaluate=evaluate,
                    log_stats=lambda stats: {"train/image_acc": stats["image_acc"].item()})
    bar = progress(args.steps, start, d.main)
    step_seconds = T.fit(stage, schedule(args, warmup), start=start, d=d, guard=guard, bf16=bf16, wb=wb, bar=bar)
    bar.close()
    if d.main and args.steps > start:  # what this run cost: the full vs LoRA comparison of the README
        report = {**trainable, "step_ms": round(1000 * step_seconds / (args.steps - start), 1),
                  "peak_memory_mb": round(peak_memory_mb(d.device)), "device": d.device.type}
        print("cost: " + json.dumps(report), flush=True)
        if wb:
            wb.summary.update(report)
    if wb:
        wb.finish()
    return out


MAX_TEXT_LEN = 256  # the fitted text context never exceeds this (--text-len may)


def fit_text_len(text_tok, captions: list[str], quantile: float = 0.99, verbose: bool = True) -> int:
    """The text context: long enough for 99% of the captions, rounded up to a multiple of 8, at most
    MAX_TEXT_LEN (one very long caption among a few would otherwise set it, and every step pays for it)."""
    lengths = sorted(len(text_tok.hf(c)["input_ids"]) for c in captions[:5000])
    need = lengths[min(len(lengths) - 1, int(quantile * len(lengths)))]
    text_len = min(MAX_TEXT_LEN, max(8, -(-need // 8) * 8))
    cut = sum(n > text_len for n in lengths)
    if cut and verbose:
        print(f"text context {text_len} tokens: {cut} of {len(lengths)} captions looked at are longer and will be "
              f"truncated (--text-len sets it)", flush=True)
    return text_len


@torch.no_grad()
def held_out_bits(model, text_ids: torch.Tensor, codes: torch.Tensor, batch_size: int = 256) -> float:
    """Mean held-out negative log-likelihood of image tokens, in bits per token (no caption dropout)."""
    was = model.training
    model.eval()
    device = model.head.weight.device
    total, n = 0.0, 0
    for t, c in zip(text_ids.split(batch_size), codes.split(batch_size)):
        logits = model(t.to(device), c.to(device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), c.to(device).flatten(), reduction="sum").item()
        n += c.numel()
    model.train(was)
    return total / max(n, 1) / 0.6931471805599453  # nats -> bits


def sample_grid(pipe, prompts: list[str], cfg_scale: float, path: Path, n: int = 4) -> Path:
    codes = pipe.generate_codes(prompts, num_images=n, seed=0, cfg_scale=cfg_scale)
    images = pipe.image_tokenizer.decode(codes).cpu()  # (P * n, 3, H, W)
    return save_grid(list(images.split(n)), path, labels=prompts)


# ----------------------------------------------------------------------------------------------------
# Stage 3 (optional): the LiT scorer, a text tower trained against the locked image tokenizer (vqgpt/lit.py)


def lit_parser(sub, common) -> None:
    lit = sub.add_parser("lit", help="train an ImageTextScorer: a text tower against the locked image tokenizer",
                         formatter_class=HelpFormatter)
    common(lit, "lit")
    lit.add_argument("--tokenizer", default="runs/tok", help="the (locked) image tokenizer directory")
    lit.add_argument("--codes", default=None, metavar="DIR", help="the codes store of the data (as for gpt)")
    lit.add_argument("--crops", type=int, default=1, metavar="N", help="the codes store's views per image (as for gpt)")
    lit.add_argument("--include", default=None, metavar="REGEX", help="train only on captions matching REGEX")
    lit.add_argument("--exclude", default=None, metavar="REGEX", help="leave out captions matching REGEX")
    lit.add_argument("--text-tokenizer", default=None, help="a transformers tokenizer; default: a BPE on the captions")
    lit.add_argument("--text-vocab", type=int, default=1024, help="vocabulary of the trained BPE")
    lit.add_argument("--text-len", type=int, default=None, help="text context in tokens (default: fit 99%%)")
    lit.add_argument("--readout", default="onehot", choices=["onehot", "latent"],
                     help="the locked image vector: codes one-hot per position, or quantized latents")
    lit.add_argument("--head", default="none", choices=["none", "mlp", "conv"],
                     help="none: the image side is fully locked (LiT); mlp / conv: a small trainable image head "
                          "over the locked grid (conv: 3x3 convolutions shared by the positions)")
    lit.add_argument("--text-dim", type=int, default=128, help="width of the text tower")
    lit.add_argument("--text-layers", type=int, default=2, help="transformer blocks of the text tower")


def train_lit(args) -> Path:
    from vqgpt.lit import ImageTextScorer, LiTConfig, lit_config, retrieval_recall
    from vqgpt.text import TextTokenizer

    d = T.setup_distributed(args.device)
    if d.enabled:
        raise ValueError("train.py lit runs on one process (the contrastive batch is not gathered across ranks)")
    out = Path(args.out)
    ckpts = CheckpointManager(out, keep=args.keep)
    resume = ckpts.require_latest() if args.resume else None
    image_tok = ImageTokenizer.from_pretrained(resume.file("image_tokenizer") if resume else args.tokenizer,
                                               device=d.device).requires_grad_(False)
    store, rows, test_store, test_rows = load_gpt_data(args, image_tok, d)
    if resume is not None:
        text_tok = TextTokenizer.from_pretrained(resume.file("text_tokenizer"))
        config = LiTConfig.from_dict(json.loads(resume.file("lit_config.json").read_text()))
    else:
        captions = store.captions(spread(rows, MAX_TEXT_SAMPLE))
        text_tok = (TextTokenizer.from_pretrained(args.text_tokenizer) if args.text_tokenizer
                    else TextTokenizer.train(captions, vocab_size=args.text_vocab))
        config = lit_config(image_tok, text_tok, readout=args.readout, head=args.head, text_dim=args.text_dim,
                            text_layers=args.text_layers,
                            text_len=args.text_len or fit_text_len(text_tok, captions, verbose=d.main))
    torch.manual_seed(args.seed)
    model = ImageTextScorer(config, image_tok, text_tok).to(d.device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    guard = T.NonFiniteGuard()
    start, _ = restore(resume, model, optimizer, guard, d)
    test_captions = test_store.captions(test_rows)
    test_codes = test_store.codes(test_rows)  # (N_test, h*w)
    bf16 = T.use_bf16(d.device, args.precision)
    n_params = sum(p.numel() for p in model.trainable_parameters())
    run_config = {"stage": "lit", "lit": config.to_dict(), "args": vars(args), "params": n_params,
                  "image_tokenizer": image_tok.fingerprint()}
    wb = T.init_wandb(args.wandb, "vqgpt", f"lit-{out.name}", run_config, str(out), enabled=d.main)
    print(f"lit: {n_params / 1e6:.2f}M trainable params (text tower{' + image head' if model.head else ''}), image "
          f"tower locked ({config.readout} readout, {config.image_dim} dims), {len(rows)} train / {len(test_rows)} "
          f"held-out images", flush=True)

    def save(step):
        ckpts.save(step, model.state_dict(), trainer_state(step, optimizer, guard),
                   files={"lit_config.json": json.dumps(config.to_dict())},
                   writers={"image_tokenizer": image_tok.save_pretrained, "text_tokenizer": text_tok.save_pretrained},
                   export=model.save_pretrained)

    def batches():
        for step in range(start, args.steps):
            idx = rows[T.epoch_batch(len(rows), step, args.batch_size, args.seed).numpy()]
            yield text_tok(store.captions(idx), config.text_len).to(d.device), store.codes(idx).to(d.device)

    def evaluate(done):
        recall = retrieval_recall(model.similarity_codes(test_codes, test_captions), test_captions, test_captions)
        bar.write(f"step {done}: held-out text-to-image R@1 {recall['retrieval_r1']:.3f}, "
                  f"R@5 {recall['retrieval_r5']:.3f}")
        if wb:
            wb.log({f"eval/{k}": v for k, v in recall.items()}, step=done)

    stage = T.Stage(model=model, optimizer=optimizer, batches=batches(), loss=lambda b, step: model.loss(*b),
                    save=save, rate_name="pairs_per_s", items=lambda b: len(b[0]), evaluate=evaluate,
                    log_stats=lambda stats: {"train/acc": stats["acc"].item(), "train/scale": stats["scale"].item()})
    bar = progress(args.steps, start, d.main)
    T.fit(stage, schedule(args, args.warmup if args.warmup is not None else max(1, args.steps // 20)),
          start=start, d=d, guard=guard, bf16=bf16, wb=wb, bar=bar)
    bar.close()
    if wb:
        wb.finish()
    return out


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    parser, args = parse_args(argv)
    # Problems with the user's input or run (bad data, checkpoints, diverged training) end with one readable
    # line rather than a traceback; --debug (or VQGPT_DEBUG=1) shows the traceback too.
    run_or_exit(lambda: run(parser, args, argv), debug=getattr(args, "debug", False),
                oom_hint="lower --batch-size (and raise --grad-accum to keep the batch), or pick a smaller --preset",
                errors=(ValueError, FileNotFoundError, CheckpointError, FloatingPointError, RuntimeError))


def run_stage(args) -> Path:
    """One stage, holding its run directory (rank 0 takes the lock; the other ranks write nothing there)."""
    train = {"tokenizer": train_tokenizer, "gpt": train_gpt, "lit": train_lit}[args.stage]
    if int(os.environ.get("RANK", "0")) != 0:
        return train(args)
    with claim_run_dir(args.out, resume=bool(args.resume), overwrite=args.overwrite):
        return train(args)


def demo_args(argv: list[str]):
    """A demo stage's arguments; a directory the demo already trained into is resumed (a finished stage is
    then a no-op), so an interrupted `python train.py` continues where it stopped."""
    _, args = parse_args(argv)
    if CheckpointManager(args.out).list():
        print(f"{args.out} holds a run: continuing it (delete {args.out} to start the demo over)", flush=True)
        args.resume = args.out
    return args


def run(parser, args, argv):
    if args.stage in ("tokenizer", "gpt", "lit"):
        run_stage(args)
        T.cleanup_distributed()  # after the stage has returned and its models are gone (see the docstring)
    else:  # the embedded demo: stage 1, stage 2, then a sample grid
        if argv or len(sys.argv) > 1:
            parser.error("unknown command; use `tokenizer`, `gpt`, `lit`, or no arguments for the demo")
        tok_args = demo_args(["tokenizer"])
        device = torch.device("cuda" if tok_args.device != "cpu" and torch.cuda.is_available() else "cpu")
        print(f"demo: both stages train in {T.precision_choice(device, tok_args.precision)[1]}", flush=True)
        run_stage(tok_args)
        gpt_args = demo_args(["gpt", *DEMO_GPT_ARGS])
        out = run_stage(gpt_args)
        T.cleanup_distributed()
        print(f"demo done: tokenizer in {tok_args.out}, text-to-image model in {out}; "
              f"samples in {out / 'samples'}. Next: python sample.py --ckpt {out} --prompt 'green apple'")


if __name__ == "__main__":
    main()
