"""The training stages: the image tokenizer, the text-to-image GPT and the LiT scorer.

Each stage is its model, its loss and its evaluation, handed to the one loop (`training.fit`), which owns the
schedule, accumulation, clipping, the non-finite guard, logging and checkpoint cadence. `train.py` parses the
flags and calls `STAGES[args.stage](args)`; `args` is its namespace of flags (`python train.py gpt --help`
lists them). Every run directory holds the latest model in the public format (ImageTokenizer / TextToImage /
ImageTextScorer `from_pretrained` read it), numbered checkpoints under checkpoints/, and sample grids under
samples/.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as vdata
from .checkpoint import CheckpointManager
from .loader import StepImages, StreamImages, decode_rows, default_workers, image_batches, stream_rows
from .tokenizer import ImageTokenizer, TokenizerConfig, tokenizer_config
from .training import (
    Dist,
    NonFiniteGuard,
    Schedule,
    Stage,
    epoch_batch,
    fit,
    full_state,
    init_wandb,
    make_optimizer,
    progress,
    rank_batch_size,
    rank_zero_first,
    restore,
    restore_sharded,
    setup_distributed,
    trainer_state,
    use_bf16,
    wandb_grid,
    wrap_for_training,
)

DEFAULT_PROMPTS = {  # the GPT's sample grids, unless --sample-prompts (else the first 8 captions)
    "openmoji": ["green apple", "red heart", "grinning face", "dog face", "sun", "rocket", "pizza", "snowman"],
    "shapes": [
        "a large red circle at the center on a white background",
        "a small blue square at the top left on a black background",
        "a large green triangle at the bottom right on a white background",
        "a small yellow star at the top right on a blue background",
    ],
}
MAX_HELD_OUT = 2048  # held-out images evaluated during training (bits per token), spread over the split
MAX_TEXT_SAMPLE = 100_000  # captions a new BPE and the text context are fitted on, spread over the set
MAX_TEXT_LEN = 256  # the fitted text context never exceeds this (--text-len may)


def schedule(args: argparse.Namespace) -> Schedule:
    """The loop's schedule from the flags; the warm-up defaults to 5% of the steps."""
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    return Schedule(
        steps=args.steps,
        lr=args.lr,
        warmup=warmup,
        grad_accum=args.grad_accum,
        clip=args.clip,
        seed=args.seed,
        save_every=args.save_every,
        eval_every=args.eval_every,
        log_every=args.log_every,
    )


def save_grid(rows: list[torch.Tensor], path: Path, labels: list[str] | None = None) -> Path:
    """Tile image batches (each (n, 3, H, W) in [0, 1]) into one PNG at `path`: one batch per row."""
    from .pipeline import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, labels).save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Stage 1: the image tokenizer


def patch_discriminator() -> torch.nn.Sequential:
    """A small PatchGAN (Isola et al. 2017) for the optional adversarial loss."""
    import torch.nn as nn

    def block(i, o, norm=True):
        return [nn.Conv2d(i, o, 4, 2, 1), *([nn.GroupNorm(8, o)] if norm else []), nn.LeakyReLU(0.2)]

    return nn.Sequential(*block(3, 64, norm=False), *block(64, 128), *block(128, 256), nn.Conv2d(256, 1, 3, 1, 1))


class TokenizerLoss:
    """L1 + MSE reconstruction plus the quantizer's auxiliary loss; optionally a perceptual loss and, from step
    `gan_start`, a PatchGAN hinge loss, whose discriminator steps after each generator update."""

    def __init__(
        self,
        model,
        *,
        perceptual=None,
        perceptual_weight: float = 0.0,
        disc=None,
        disc_opt=None,
        gan_weight: float = 0.0,
        gan_start: int = 0,
    ):
        self.model, self.perceptual, self.perceptual_weight = model, perceptual, perceptual_weight
        self.disc, self.disc_opt, self.gan_weight, self.gan_start = disc, disc_opt, gan_weight, gan_start

    def _adversarial(self, step: int) -> bool:
        return self.disc is not None and step >= self.gan_start

    def __call__(self, x: torch.Tensor, step: int):
        recon, _, aux = self.model(x)
        recon = recon.float()
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        total = rec + aux
        if self.perceptual is not None:
            total = total + self.perceptual_weight * self.perceptual(recon, x)
        if self._adversarial(step):
            total = total - self.gan_weight * self.disc(recon * 2 - 1).mean()  # hinge generator loss
        return total, {"rec": rec, "recon": recon}

    def discriminator_step(self, step: int, x: torch.Tensor, stats: dict) -> None:
        """Hinge loss on the detached reconstructions, after the generator's update."""
        if self._adversarial(step):
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss = (
                F.relu(1 - self.disc(x * 2 - 1)).mean() + F.relu(1 + self.disc(stats["recon"].detach() * 2 - 1)).mean()
            )
            d_loss.backward()
            self.disc_opt.step()


@torch.no_grad()
def evaluate_tokenizer(model: ImageTokenizer, images: torch.Tensor, batch_size: int = 256) -> tuple[dict, torch.Tensor]:
    """(PSNR, code usage and perplexity on uint8 `images`; their reconstructions in [0, 1])."""
    from .metrics import codebook_stats, psnr

    was = model.training
    model.eval()
    x = images.float().div(255)
    codes = torch.cat([model.encode(b.to(model.device)) for b in x.split(batch_size)])
    recon = torch.cat([model.decode(c).cpu() for c in codes.split(batch_size)])
    model.train(was)
    return {"psnr": psnr(recon, x), **codebook_stats(codes, model.codebook_size)}, recon


def report_tokenizer(model: ImageTokenizer, held_out: torch.Tensor, out: Path, done: int, wb, bar) -> None:
    """The in-training evaluation: held-out figures on the progress bar and wandb, a grid of reconstructions."""
    metrics, recon = evaluate_tokenizer(model, held_out)
    pick = torch.linspace(0, len(held_out) - 1, 8).long()  # spread over the split, not its first rows
    grid = save_grid([held_out[pick].float() / 255, recon[pick]], out / "samples" / f"recon-{done:07d}.png")
    bar.write(
        f"step {done}: held-out PSNR {metrics['psnr']:.2f} dB, usage {metrics['usage']:.1%}, "
        f"perplexity {metrics['perplexity']:.0f} -> {grid}"
    )
    if wb:
        import wandb

        wb.log(
            {
                "eval/psnr": metrics["psnr"],
                "eval/usage": metrics["usage"],
                "eval/perplexity": metrics["perplexity"],
                "eval/recon": wandb.Image(str(grid), caption="top: held-out images, bottom: reconstructions"),
            },
            step=done,
        )


def tokenizer_data(args: argparse.Namespace, image_size: int, d: Dist):
    """(the training images: a map-style set on disk, or a StreamShards with --streaming; uint8 held-out images:
    up to 512 of the test split, spread over it, else the training set's first 64)."""
    kw = dict(image_column=args.image_column, caption_column=args.caption_column, revision=args.revision)
    if args.streaming:
        train_set, test_set = (vdata.stream_shards(args.data, split, **kw) for split in ("train", "test"))
        held_out = stream_rows(test_set, image_size, 512)
        return train_set, held_out if len(held_out) else stream_rows(train_set, image_size, 64)
    with rank_zero_first(d):  # one rank renders / converts the data, the others then read its cache
        train_set = vdata.load_captioned(args.data, "train", limit=args.limit, image_size=image_size, **kw)
        test_set = vdata.load_captioned(args.data, "test", image_size=image_size, **kw)
    held_set = test_set if len(test_set) else train_set
    n_held = min(len(held_set), 512 if len(test_set) else 64)
    return train_set, decode_rows(held_set, np.linspace(0, len(held_set) - 1, n_held).round().astype(int), image_size)


def tokenizer_batches(args: argparse.Namespace, train_set, image_size: int, per_rank: int, start: int, d: Dist):
    """Each step's images from `start` on, decoded and flipped in loader workers, as floats in [0, 1] on the
    device."""
    if args.streaming:
        step_images = StreamImages(
            train_set,
            image_size,
            per_rank=per_rank,
            rank=d.rank,
            world=d.world,
            seed=args.seed,
            start=start,
            steps=args.steps,
        )
    else:
        step_images = StepImages(
            train_set, image_size, global_batch=args.batch_size, per_rank=per_rank, rank=d.rank, seed=args.seed
        )
    workers = default_workers(d.device) if args.workers is None else args.workers
    loader = image_batches(step_images, start, args.steps, workers=workers, pin_memory=d.device.type == "cuda")
    return (x.to(d.device, non_blocking=True).float().div_(255) for x in loader)


def start_wandb(args, run_config: dict, out: Path, d, resumed: bool, prefix: str):
    """The stage's wandb run (None where tracking is off or on ranks other than 0), named PREFIX-<run dir>."""
    return init_wandb(
        args.wandb,
        args.wandb_project,
        args.wandb_name,
        run_config,
        str(out),
        enabled=d.main,
        resume=resumed,
        default_name=f"{prefix}-{out.name}",
    )


def tokenizer_run_config(args, resume) -> TokenizerConfig:
    """The resumed run's tokenizer config, or --preset with the architecture flags given."""
    if resume is not None:
        return TokenizerConfig.from_dict(json.loads(resume.file("tokenizer_config.json").read_text()))
    overrides = {
        k: v
        for k, v in (
            ("image_size", args.image_size),
            ("quantizer", args.quantizer),
            ("fsq_levels", args.fsq_levels and tuple(args.fsq_levels)),
            ("norm", args.norm),
        )
        if v
    }
    return tokenizer_config(args.preset, **overrides)


def tokenizer_loss(args, model, optimizer, guard, resume, d) -> tuple[TokenizerLoss, int]:
    """The tokenizer's loss (reconstruction, then the optional perceptual and PatchGAN terms, the discriminator
    with its own optimizer), with the run's state restored from RESUME; returns it and the first step."""
    disc = patch_discriminator().to(d.device) if args.gan_weight > 0 else None
    perceptual = None
    if args.perceptual_weights:
        from .perceptual import PerceptualLoss

        perceptual = PerceptualLoss(args.perceptual_weights).to(d.device)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc else None
    start, state = restore(resume, model, optimizer, guard, d)
    if disc is not None and "disc" in state:
        disc.load_state_dict(state["disc"])
        disc_opt.load_state_dict(state["disc_optimizer"])
    loss = TokenizerLoss(
        wrap_for_training(model, d, args.compile),
        perceptual=perceptual,
        perceptual_weight=args.perceptual_weight,
        disc=disc,
        disc_opt=disc_opt,
        gan_weight=args.gan_weight,
        gan_start=args.gan_start if args.gan_start is not None else args.steps // 2,
    )
    return loss, start


def train_tokenizer(args: argparse.Namespace) -> Path:
    """Stage 1: the image tokenizer (VQ-VAE) on the images of --data, into --out; returns the run directory."""
    d = setup_distributed(args.device)
    out = Path(args.out)
    ckpts = CheckpointManager(out, keep=args.keep)
    resume = ckpts.require_latest() if args.resume else None

    # Model: built after the process group exists, so a VQ codebook knows to synchronise across ranks.
    config = tokenizer_run_config(args, resume)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    model = ImageTokenizer(config).to(d.device)
    model.trained_on = {"data": args.data, "limit": args.limit}  # its model card names the data and its licence

    # Images stay on disk (memory-mapped Arrow); loader workers decode each step's batch (vqgpt/loader.py).
    train_set, held_out = tokenizer_data(args, config.image_size, d)

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    guard = NonFiniteGuard()
    loss, start = tokenizer_loss(args, model, optimizer, guard, resume, d)
    disc, disc_opt = loss.disc, loss.disc_opt

    per_rank = rank_batch_size(args.batch_size, args.grad_accum, d)
    bf16 = use_bf16(d.device, args.precision)
    run_config = {
        "stage": "tokenizer",
        "tokenizer": config.to_dict(),
        "schedule": asdict(schedule(args)),
        "args": vars(args),
        "world": d.world,
        "params": sum(p.numel() for p in model.parameters()),
    }
    wb = start_wandb(args, run_config, out, d, resumed=resume is not None, prefix="tok")
    if d.main:
        n_train = f"{train_set.n} streamed files of" if args.streaming else len(train_set)
        print(
            f"tokenizer: {run_config['params'] / 1e6:.2f}M params, {n_train} train / {len(held_out)} "
            f"held-out images, codes {config.grid_size}x{config.grid_size} of {config.codebook_size}, "
            f"{'bf16' if bf16 else 'fp32'} autocast",
            flush=True,
        )

    def save(step):
        if not d.main:
            return
        extra = {"disc": disc.state_dict(), "disc_optimizer": disc_opt.state_dict()} if disc else {}
        ckpts.save(
            step,
            model.state_dict(),
            trainer_state(step, optimizer, guard, extra),
            files={"tokenizer_config.json": json.dumps(config.to_dict())},
            export=model.save_pretrained,
        )

    batches = tokenizer_batches(args, train_set, config.image_size, per_rank, start, d)
    bar = progress(args.steps, start, d.main)
    evaluate = (lambda done: report_tokenizer(model, held_out, out, done, wb, bar)) if d.main else None
    stage = Stage(
        model=model,
        optimizer=optimizer,
        batches=batches,
        loss=loss,
        save=save,
        rate_name="images_per_s",
        items=len,
        evaluate=evaluate,
        after_update=loss.discriminator_step,
        log_stats=lambda stats: {"train/rec_loss": stats["rec"].item()},
    )
    fit(stage, schedule(args), start=start, d=d, guard=guard, bf16=bf16, wb=wb, bar=bar)
    bar.close()
    if wb:
        wb.finish()
    return out


# ----------------------------------------------------------------------------------------------------
# What the GPT and LiT stages share: the codes stores of the data, and the text context


def load_gpt_data(args: argparse.Namespace, image_tok: ImageTokenizer, d: Dist):
    """The memory-mapped codes stores of the train and test splits (`vqgpt.encode`: built on the first run for
    this data and tokenizer, each rank encoding its own shards), and the store rows that the stage uses: those
    whose caption passes --include/--exclude, then the first --limit of them; held-out rows at most
    MAX_HELD_OUT, spread over the split."""
    from .encode import encode, split_dir

    kw = dict(
        image_column=args.image_column,
        caption_column=args.caption_column,
        revision=args.revision,
        rank=d.rank,
        world=d.world,
        progress=d.main,
        streaming=args.streaming,
    )
    filtered = args.include is not None or args.exclude is not None
    limit_later = filtered or args.streaming  # a stream is encoded whole: --limit then takes its first rows

    def where(split):
        return split_dir(args.codes, split) if args.codes else None

    train = encode(
        args.data, "train", image_tok, where("train"), limit=None if limit_later else args.limit, crops=args.crops, **kw
    )
    test = encode(args.data, "test", image_tok, where("test"), **kw)
    cap = None if args.limit is None else args.limit * args.crops  # rows of the first --limit images
    rows, test_rows = np.arange(len(train), dtype=np.int64)[:cap], np.arange(len(test), dtype=np.int64)
    if filtered:
        rows = np.asarray(vdata.caption_filter(train.iter_captions(), args.include, args.exclude)[:cap], dtype=np.int64)
        test_rows = np.asarray(vdata.caption_filter(test.iter_captions(), args.include, args.exclude), dtype=np.int64)
        if not len(rows):
            raise ValueError(
                f"no training caption of {args.data} passes --include {args.include!r} --exclude {args.exclude!r}"
            )
        if d.main:
            print(
                f"data: {len(rows)} of {len(train)} training and {len(test_rows)} of {len(test)} held-out "
                "images pass --include/--exclude",
                flush=True,
            )
    return train, rows, test, spread(test_rows, MAX_HELD_OUT)


def spread(rows: np.ndarray, n: int) -> np.ndarray:
    """At most n of `rows`, evenly spread over them (all of them when there are fewer)."""
    if len(rows) <= n:
        return rows
    return rows[np.linspace(0, len(rows) - 1, n).round().astype(np.int64)]


def fit_text_len(text_tok, captions: list[str], given: int | None = None, verbose: bool = True) -> int:
    """The text context: `given` (--text-len), else long enough for 99% of the captions, rounded up to a multiple
    of 8, at most MAX_TEXT_LEN (one very long caption among a few would otherwise set it, and every step pays
    for it). How many captions it truncates is said here, once, not by every batch."""
    lengths = sorted(len(text_tok.hf(c)["input_ids"]) for c in captions[:5000])
    if given:
        text_len = given
    else:
        need = lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))]
        text_len = min(MAX_TEXT_LEN, max(8, -(-need // 8) * 8))
    cut = sum(n > text_len for n in lengths)
    if cut and verbose:
        print(
            f"text context {text_len} tokens: {cut} of {len(lengths)} captions looked at are longer and will be "
            f"truncated (--text-len sets it)",
            flush=True,
        )
    return text_len


def caption_batches(
    args: argparse.Namespace, store, rows: np.ndarray, text_tok, text_len: int, start: int, d: Dist, per_rank: int
):
    """This rank's rows of each step's batch from `start` on, read from the memory-mapped store: (text ids
    (B, T_text), codes (B, h*w)) on the device. Truncated captions were counted once, at the start."""
    for step in range(start, args.steps):
        pos = epoch_batch(len(rows), step, args.batch_size, args.seed)[d.rank * per_rank : (d.rank + 1) * per_rank]
        idx = rows[pos.numpy()]
        yield text_tok(store.captions(idx), text_len, warn=False).to(d.device), store.codes(idx).to(d.device)


# ----------------------------------------------------------------------------------------------------
# Stage 2: the text-to-image GPT


class GPTLoss(torch.nn.Module):
    """GPT.loss as a forward(), so that DDP's gradient hooks see the call."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, text_ids, codes):
        return self.gpt.loss(text_ids, codes)


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
    """n samples of each prompt (seed 0) at guidance `cfg_scale`, one prompt per row, as a PNG at `path`."""
    codes = pipe.generate_codes(prompts, num_images=n, seed=0, cfg_scale=cfg_scale)
    images = pipe.image_tokenizer.decode(codes).cpu()  # (P * n, 3, H, W)
    return save_grid(list(images.split(n)), path, labels=prompts)


def report_gpt(
    pipe, test_ids: torch.Tensor, test_codes: torch.Tensor, prompts: list[str], out: Path, done: int, wb, bar
) -> None:
    """The in-training evaluation: held-out bits per image token and sample grids without and with guidance."""
    bits = held_out_bits(pipe.gpt, test_ids, test_codes)
    scales = (1.0, 3.0)
    paths = [sample_grid(pipe, prompts, s, out / "samples" / f"step-{done:07d}-cfg{s:g}.png") for s in scales]
    bar.write(f"step {done}: held-out {bits:.3f} bits/image token -> {paths[-1]}")
    if wb:
        wb.log(
            {
                "eval/bits_per_token": bits,
                **{f"samples/cfg{s:g}": wandb_grid(p, prompts) for s, p in zip(scales, paths)},
            },
            step=done,
        )


def gpt_image_tokenizer(args: argparse.Namespace, resume, d: Dist):
    """(the --init model or None; the image tokenizer, locked): the resumed run's, the --init model's own, or
    --tokenizer's."""
    from .pipeline import TextToImage

    init = None
    if resume is None and args.init:  # fine-tuning: the init model brings its (locked) image tokenizer
        init = TextToImage.from_pretrained(args.init, device=d.device)
        if (
            args.tokenizer
            and ImageTokenizer.from_pretrained(args.tokenizer).fingerprint() != init.image_tokenizer.fingerprint()
        ):
            raise ValueError(
                f"--tokenizer {args.tokenizer} is not the image tokenizer of --init {args.init}; "
                "leave --tokenizer out when fine-tuning (the init model's own is used)"
            )
        image_tok = init.image_tokenizer
    else:
        tok_dir = resume.file("image_tokenizer") if resume is not None else Path(args.tokenizer or "runs/tok")
        image_tok = ImageTokenizer.from_pretrained(tok_dir, device=d.device)
    return init, image_tok.requires_grad_(False)


def gpt_text_and_config(
    args: argparse.Namespace, resume, init, image_tok: ImageTokenizer, captions: list[str], finetune: dict, d: Dist
):
    """(text tokenizer, GPTConfig, new text token id -> the old ids that spelled it, fine-tuning record): the
    resumed run's, the --init model's (grown by --add-text-tokens), or new ones fitted on `captions`."""
    from .finetune import add_text_tokens, new_words, weights_fingerprint
    from .model import GPTConfig, gpt_config
    from .text import TextTokenizer

    new_ids: dict[int, list[int]] = {}
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
        finetune = {
            "base": str(Path(args.init).resolve()),
            "base_gpt": weights_fingerprint(init.gpt),
            "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha,
            "new_token_ids": sorted(new_ids),
        }
        fit_text_len(text_tok, captions, config.text_len, verbose=d.main)  # says how many the model's context cuts
    else:
        if args.lora_rank:
            raise ValueError("--lora-rank needs --init: adapters fine-tune a trained model")
        text_tok = (
            TextTokenizer.from_pretrained(args.text_tokenizer)
            if args.text_tokenizer
            else TextTokenizer.train(captions, vocab_size=args.text_vocab)
        )
        text_len = fit_text_len(text_tok, captions, args.text_len, verbose=d.main)
        overrides = {
            k: v
            for k, v in (("cfg_dropout", args.cfg_dropout), ("text_loss_weight", args.text_loss_weight))
            if v is not None
        }
        config = gpt_config(
            args.preset,
            text_vocab_size=text_tok.vocab_size,
            text_pad_id=text_tok.pad_id,
            text_len=text_len,
            image_vocab_size=image_tok.codebook_size,
            image_grid=(image_tok.grid_size, image_tok.grid_size),
            **overrides,
        )
    return text_tok, config, new_ids, finetune


def gpt_model(args: argparse.Namespace, config, init, finetune: dict, new_ids: dict[int, list[int]], d: Dist):
    """(the GPT to train, its LoRA adapter or None): new, the --init model's (its vocabulary grown), or for LoRA
    the base's weights (checked against the record) with adapters on top."""
    from .finetune import Adapter, add_lora, grow_text_vocab, weights_fingerprint
    from .model import GPT
    from .pipeline import TextToImage

    if finetune.get("lora_rank"):
        if args.fsdp:
            raise ValueError("--lora-rank with --fsdp is not supported: LoRA already keeps the optimizer state small")
        base = init.gpt if init is not None else TextToImage.from_pretrained(finetune["base"], device=d.device).gpt
        if weights_fingerprint(base) != finetune["base_gpt"]:
            raise ValueError(f"the base model {finetune['base']} changed since this LoRA run started")
        model = grow_text_vocab(base, config.text_vocab_size, new_ids)
        model.config.cfg_dropout = config.cfg_dropout
        peft_model = add_lora(
            model, finetune["lora_rank"], finetune["lora_alpha"], new_token_ids=finetune["new_token_ids"]
        )
        return model, Adapter(peft_model, finetune["base"], finetune["base_gpt"])
    if init is not None:
        model = grow_text_vocab(init.gpt, config.text_vocab_size, new_ids)
        model.config.cfg_dropout = config.cfg_dropout
        return model, None
    return GPT(config).to(d.device), None


def gpt_optimizer(args: argparse.Namespace, model, resume, adapter, guard: NonFiniteGuard, d: Dist):
    """(the loss module to call, wrapped for the ranks; the optimizer; the step to start at), restored from
    `resume`. Under --fsdp the model is sharded first and the optimizer built over the shards."""
    if args.fsdp:
        loss_fn = wrap_for_training(GPTLoss(model), d, args.compile, shard=model.layers)
        optimizer = make_optimizer(model, args.lr, args.weight_decay)
        return loss_fn, optimizer, restore_sharded(resume, model, optimizer, guard, d)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    start, _ = restore(resume, model, optimizer, guard, d, adapter)
    return wrap_for_training(GPTLoss(model), d, args.compile), optimizer, start


def saved_sampling(args: argparse.Namespace, init, config):
    """The sampling defaults saved with the model (sample.py and TextToImage use them unless told otherwise):
    the --sample-* flags given, the rest the --init model's, else SamplingConfig's."""
    from .cli import sampling_overrides
    from .generate import SamplingConfig

    sampling = replace(init.sampling if init is not None else SamplingConfig(), **sampling_overrides(args, saved=True))
    sampling.validate(config.image_vocab_size)
    return sampling


def gpt_saver(args, ckpts, model, optimizer, guard, adapter, config, finetune, image_tok, text_tok, pipeline, d):
    """The GPT stage's save(step): a checkpoint (the whole model, or under LoRA only the adapters and new token
    rows, the base being referenced) that also exports the pipeline; under FSDP every rank joins the gather."""
    from .adapters import adapter_state

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
        ckpts.save(
            step,
            weights,
            {**trainer_state(step, optimizer, guard), "optimizer": optim_state},
            files=files,
            writers={"image_tokenizer": image_tok.save_pretrained, "text_tokenizer": text_tok.save_pretrained},
            export=lambda run_dir: pipeline().save_pretrained(run_dir, gpt_state=weights),
        )

    return save


def report_cost(trainable: dict, step_seconds: float, d, wb) -> None:
    """The run's `cost:` line (trainable parameters, step time without evaluation, peak memory), also in wandb."""
    from .metrics import peak_memory_mb

    report = {
        **trainable,
        "step_ms": round(1000 * step_seconds, 1),
        "peak_memory_mb": round(peak_memory_mb(d.device)),
        "device": d.device.type,
    }
    print("cost: " + json.dumps(report), flush=True)
    if wb:
        wb.summary.update(report)


def train_gpt(args: argparse.Namespace) -> Path:
    """Stage 2: the text-to-image GPT on the codes of --data under a locked image tokenizer (new, or fine-tuning
    --init, fully or with LoRA adapters), into --out; returns the run directory."""
    from .metrics import trainable_summary
    from .pipeline import TextToImage

    d = setup_distributed(args.device)
    out = Path(args.out)
    ckpts = CheckpointManager(out, keep=args.keep)
    resume = ckpts.require_latest() if args.resume else None
    has_ft = resume is not None and resume.file("finetune.json").exists()
    finetune = json.loads(resume.file("finetune.json").read_text()) if has_ft else {}  # the --init run's record
    init, image_tok = gpt_image_tokenizer(args, resume, d)
    store, rows, test_store, test_rows = load_gpt_data(args, image_tok, d)
    captions = store.captions(spread(rows, MAX_TEXT_SAMPLE))  # what a new BPE and the text context are fitted on
    text_tok, config, new_ids, finetune = gpt_text_and_config(args, resume, init, image_tok, captions, finetune, d)
    test_ids = text_tok(test_store.captions(test_rows), config.text_len)  # (N_test, T_text)
    test_codes = test_store.codes(test_rows)  # (N_test, h*w)
    del captions

    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    model, adapter = gpt_model(args, config, init, finetune, new_ids, d)
    model.train()
    guard = NonFiniteGuard()
    loss_fn, optimizer, start = gpt_optimizer(args, model, resume, adapter, guard, d)
    per_rank = rank_batch_size(args.batch_size, args.grad_accum, d)
    bf16 = use_bf16(d.device, args.precision)
    prompts = args.sample_prompts or DEFAULT_PROMPTS.get(args.data) or store.captions(rows[:8])
    trainable = trainable_summary(model)
    if d.main:
        print(
            f"gpt: {model.num_params() / 1e6:.2f}M params ({trainable['trainable_params'] / 1e6:.3f}M trainable), "
            f"{len(rows)} train / {len(test_codes)} held-out images, sequence {config.text_len} text + 1 + "
            f"{config.n_image} image tokens, {'bf16' if bf16 else 'fp32'} autocast",
            flush=True,
        )
    sampling = saved_sampling(args, init, config)
    run_config = {
        "stage": "gpt",
        "gpt": config.to_dict(),
        "schedule": asdict(schedule(args)),
        "sampling": asdict(sampling),
        "args": vars(args),
        "world": d.world,
        "params": model.num_params(),
        "image_tokenizer": image_tok.fingerprint(),
        **trainable,
    }
    wb = start_wandb(args, run_config, out, d, resumed=resume is not None, prefix="gpt")
    trained_on = {"data": args.data, "include": args.include, "exclude": args.exclude, "limit": args.limit}

    def pipeline():
        return TextToImage(model, image_tok, text_tok, sampling, adapter, trained_on)

    save = gpt_saver(args, ckpts, model, optimizer, guard, adapter, config, finetune, image_tok, text_tok, pipeline, d)

    bar = progress(args.steps, start, d.main)
    evaluate = (
        None
        if not d.main or args.fsdp
        else (lambda done: report_gpt(pipeline(), test_ids, test_codes, prompts, out, done, wb, bar))
    )
    stage = Stage(
        model=model,
        optimizer=optimizer,
        loss=lambda b, step: loss_fn(*b),
        save=save,
        batches=caption_batches(args, store, rows, text_tok, config.text_len, start, d, per_rank),
        rate_name="tokens_per_s",
        items=lambda b: b[1].numel(),
        evaluate=evaluate,
        log_stats=lambda stats: {"train/image_acc": stats["image_acc"].item()},
    )
    step_seconds = fit(stage, schedule(args), start=start, d=d, guard=guard, bf16=bf16, wb=wb, bar=bar)
    bar.close()
    if d.main and args.steps > start:
        report_cost(trainable, step_seconds / (args.steps - start), d, wb)
    if wb:
        wb.finish()
    return out


# ----------------------------------------------------------------------------------------------------
# Stage 3 (optional): the LiT scorer, a text tower trained against the locked image tokenizer (vqgpt/lit.py)


def lit_text_and_config(args: argparse.Namespace, resume, image_tok: ImageTokenizer, store, rows: np.ndarray, d: Dist):
    """(text tokenizer, LiTConfig): the resumed run's, or new ones fitted on the training captions."""
    from .lit import LiTConfig, lit_config
    from .text import TextTokenizer

    if resume is not None:
        text_tok = TextTokenizer.from_pretrained(resume.file("text_tokenizer"))
        return text_tok, LiTConfig.from_dict(json.loads(resume.file("lit_config.json").read_text()))
    captions = store.captions(spread(rows, MAX_TEXT_SAMPLE))
    text_tok = (
        TextTokenizer.from_pretrained(args.text_tokenizer)
        if args.text_tokenizer
        else TextTokenizer.train(captions, vocab_size=args.text_vocab)
    )
    config = lit_config(
        image_tok,
        text_tok,
        readout=args.readout,
        head=args.head,
        text_dim=args.text_dim,
        text_layers=args.text_layers,
        text_len=fit_text_len(text_tok, captions, args.text_len, verbose=d.main),
    )
    return text_tok, config


def train_lit(args: argparse.Namespace) -> Path:
    """Stage 3 (optional): a LiT scorer, a text tower trained contrastively against the locked image tokenizer;
    one process (the contrastive batch is not gathered across ranks). Returns the run directory."""
    from .lit import ImageTextScorer, retrieval_recall

    d = setup_distributed(args.device)
    if d.enabled:
        raise ValueError("train.py lit runs on one process (the contrastive batch is not gathered across ranks)")
    out = Path(args.out)
    ckpts = CheckpointManager(out, keep=args.keep)
    resume = ckpts.require_latest() if args.resume else None
    image_tok = ImageTokenizer.from_pretrained(
        resume.file("image_tokenizer") if resume else args.tokenizer, device=d.device
    ).requires_grad_(False)
    store, rows, test_store, test_rows = load_gpt_data(args, image_tok, d)
    text_tok, config = lit_text_and_config(args, resume, image_tok, store, rows, d)
    torch.manual_seed(args.seed)
    model = ImageTextScorer(config, image_tok, text_tok).to(d.device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    guard = NonFiniteGuard()
    start, _ = restore(resume, model, optimizer, guard, d)
    test_captions = test_store.captions(test_rows)
    test_codes = test_store.codes(test_rows)  # (N_test, h*w)
    bf16 = use_bf16(d.device, args.precision)
    n_params = sum(p.numel() for p in model.trainable_parameters())
    run_config = {
        "stage": "lit",
        "lit": config.to_dict(),
        "args": vars(args),
        "params": n_params,
        "image_tokenizer": image_tok.fingerprint(),
    }
    wb = init_wandb(args.wandb, "vqgpt", f"lit-{out.name}", run_config, str(out), enabled=d.main)
    print(
        f"lit: {n_params / 1e6:.2f}M trainable params (text tower{' + image head' if model.head else ''}), image "
        f"tower locked ({config.readout} readout, {config.image_dim} dims), {len(rows)} train / {len(test_rows)} "
        f"held-out images",
        flush=True,
    )

    def save(step):
        ckpts.save(
            step,
            model.state_dict(),
            trainer_state(step, optimizer, guard),
            files={"lit_config.json": json.dumps(config.to_dict())},
            writers={"image_tokenizer": image_tok.save_pretrained, "text_tokenizer": text_tok.save_pretrained},
            export=model.save_pretrained,
        )

    def evaluate(done):
        recall = retrieval_recall(model.similarity_codes(test_codes, test_captions), test_captions, test_captions)
        bar.write(
            f"step {done}: held-out text-to-image R@1 {recall['retrieval_r1']:.3f}, R@5 {recall['retrieval_r5']:.3f}"
        )
        if wb:
            wb.log({f"eval/{k}": v for k, v in recall.items()}, step=done)

    batches = caption_batches(args, store, rows, text_tok, config.text_len, start, d, per_rank=args.batch_size)
    stage = Stage(
        model=model,
        optimizer=optimizer,
        batches=batches,
        loss=lambda b, step: model.loss(*b),
        save=save,
        rate_name="pairs_per_s",
        items=lambda b: len(b[0]),
        evaluate=evaluate,
        log_stats=lambda stats: {"train/acc": stats["acc"].item(), "train/scale": stats["scale"].item()},
    )
    bar = progress(args.steps, start, d.main)
    fit(stage, schedule(args), start=start, d=d, guard=guard, bf16=bf16, wb=wb, bar=bar)
    bar.close()
    if wb:
        wb.finish()
    return out


STAGES = {"tokenizer": train_tokenizer, "gpt": train_gpt, "lit": train_lit}
