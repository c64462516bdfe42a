"""Train vqgpt: stage 1 the image tokenizer, stage 2 the text-to-image GPT (the stages: vqgpt/stages.py).

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
import os
import sys
from pathlib import Path

import torch

from vqgpt import training
from vqgpt.checkpoint import CheckpointError, CheckpointManager, claim_run_dir
from vqgpt.cli import HelpFormatter, add_run_flags, add_sampling_flags, run_or_exit
from vqgpt.model import PRESETS as GPT_PRESETS
from vqgpt.stages import STAGES
from vqgpt.tokenizer import PRESETS as TOK_PRESETS

# Defaults of the embedded demo, chosen to fit 2 CPU cores: both stages in <= 20 minutes (README, "Two
# commands", says what they reach).
DEMO = {
    "tokenizer": dict(data="openmoji", preset="demo", steps=1400, batch_size=16, lr=3e-3),
    "gpt": dict(data="openmoji", preset="demo", steps=3200, batch_size=16, lr=1e-3, eval_every=800),
    "lit": dict(data="openmoji", preset="small", steps=1500, batch_size=256, lr=1e-3),  # not part of the demo
}  # eval_every: the GPT evaluates (held-out bits, two 8 x 4 sample grids) 4 times, not 7 (bench/demo_levers.py)
# Batches of 16 (docs/RESULTS.md, "the demo in 20 minutes"): at a higher rate the tokenizer clears 21 dB on 58%
# of the earlier recipe's images; at a lower rate the GPT memorises enough for recall 12 / 16 in half the work.
# What the demo adds to its GPT stage (docs/RESULTS.md, "Recall on openmoji"). It leaves out the 1,945 skin-tone
# variants, recolourings of other drawings, so that the model memorises 1,907 distinct drawings more often;
# a 12-token text context (8 of the 2,015 such captions are longer); and sampling defaults near the mode,
# where a model this small draws the prompted drawing more often (guidance did not help that).
DEMO_GPT_ARGS = ["--exclude", "skin tone", "--text-len", "12", "--sample-cfg", "1", "--sample-temperature", "0.2"]


DEFAULT_OUT = {"tokenizer": "tok", "gpt": "t2i", "lit": "lit"}  # run directories under runs/


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="stage")
    add_tokenizer_parser(sub)
    add_gpt_parser(sub)
    add_lit_parser(sub)
    args = p.parse_args(argv)
    if args.stage in STAGES:
        check_args(p, args)
        resolve_out(p, args)
    return p, args


def add_tokenizer_parser(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train the image tokenizer (VQ-VAE)", formatter_class=HelpFormatter)
    add_run_flags(tok, DEMO["tokenizer"], TOK_PRESETS, DEFAULT_OUT["tokenizer"], wandb_prefix="tok")
    tok.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    tok.add_argument("--quantizer", choices=["fsq", "vq"], default=None, help="override the preset's")
    tok.add_argument(
        "--norm",
        choices=["group", "channel"],
        default=None,
        help="override the preset's normalisation: GroupNorm over the image, or per position",
    )
    tok.add_argument(
        "--fsq-levels",
        type=int,
        nargs="+",
        default=None,
        metavar="L",
        help="override the preset's FSQ levels per latent channel; the codebook is their product",
    )
    tok.add_argument("--gan-weight", type=float, default=0.0, help="PatchGAN hinge loss weight (0 = off)")
    tok.add_argument("--gan-start", type=int, default=None, help="step the GAN loss starts (default half)")
    tok.add_argument(
        "--perceptual-weights",
        default=None,
        metavar="VGG16.safetensors",
        help="local VGG16 features weights; enables the perceptual loss (see vqgpt/perceptual.py)",
    )
    tok.add_argument("--perceptual-weight", type=float, default=0.1, help="weight of the perceptual loss")


def add_gpt_parser(sub) -> None:
    gpt = sub.add_parser(
        "gpt", help="train the text-to-image GPT on a trained tokenizer's codes", formatter_class=HelpFormatter
    )
    add_run_flags(gpt, DEMO["gpt"], GPT_PRESETS, DEFAULT_OUT["gpt"], wandb_prefix="gpt")
    gpt.add_argument(
        "--tokenizer",
        default=None,
        help="image tokenizer directory (stage 1 output; default runs/tok, or the --init model's own)",
    )
    gpt.add_argument(
        "--codes",
        default=None,
        metavar="DIR",
        help="the codes store of the data (`python -m vqgpt.encode --out DIR`; made there when "
        "missing); default: one under the cache, keyed by the data and the tokenizer",
    )
    gpt.add_argument(
        "--crops",
        type=int,
        default=1,
        metavar="N",
        help="codes of N views of each training image (the centre crop and N-1 random crops, half "
        "flipped), made when the store is built (`python -m vqgpt.encode --crops N`)",
    )
    gpt.add_argument("--include", default=None, metavar="REGEX", help="train only on captions matching REGEX")
    gpt.add_argument("--exclude", default=None, metavar="REGEX", help="leave out captions matching REGEX")
    ft = gpt.add_argument_group("fine-tuning (see vqgpt/finetune.py)")
    ft.add_argument(
        "--init",
        default=None,
        metavar="DIR",
        help="start from this trained text-to-image model (its image tokenizer stays locked)",
    )
    ft.add_argument(
        "--add-text-tokens",
        type=int,
        default=0,
        metavar="N",
        help="with --init: give up to N words of the new captions that the old text tokenizer "
        "spells in pieces their own tokens (default 0: keep the vocabulary)",
    )
    ft.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank only (0: full)")
    ft.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: the rank)")
    gpt.add_argument(
        "--text-tokenizer",
        default=None,
        help="a transformers tokenizer name or path; default: a BPE trained on the captions",
    )
    gpt.add_argument("--text-vocab", type=int, default=1024, help="vocabulary of the trained BPE")
    gpt.add_argument("--text-len", type=int, default=None, help="text context in tokens (default: fit 99%%)")
    gpt.add_argument(
        "--cfg-dropout", type=float, default=None, help="caption dropout prob, for CFG (default: the preset's)"
    )
    gpt.add_argument(
        "--text-loss-weight",
        type=float,
        default=None,
        help="weight of the next-token loss on the caption (default: the preset's)",
    )
    gpt.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state over the ranks (FSDP2) instead of DDP; "
        "in-training evaluation is then skipped (evaluate the exported model)",
    )
    # The sampling defaults saved with the model: --sample-cfg, --sample-top-k, ... (vqgpt/cli.py)
    add_sampling_flags(gpt, saved=True)
    gpt.add_argument(
        "--sample-prompts",
        nargs="*",
        default=None,
        help="prompts of the sample grids (default: captions spread over the data)",
    )


def add_lit_parser(sub) -> None:
    lit = sub.add_parser(
        "lit",
        help="train an ImageTextScorer: a text tower against the locked image tokenizer",
        formatter_class=HelpFormatter,
    )
    add_run_flags(lit, DEMO["lit"], GPT_PRESETS, DEFAULT_OUT["lit"], wandb_prefix="gpt")
    lit.add_argument("--tokenizer", default="runs/tok", help="the (locked) image tokenizer directory")
    lit.add_argument("--codes", default=None, metavar="DIR", help="the codes store of the data (as for gpt)")
    lit.add_argument("--crops", type=int, default=1, metavar="N", help="the codes store's views per image (as for gpt)")
    lit.add_argument("--include", default=None, metavar="REGEX", help="train only on captions matching REGEX")
    lit.add_argument("--exclude", default=None, metavar="REGEX", help="leave out captions matching REGEX")
    lit.add_argument("--text-tokenizer", default=None, help="a transformers tokenizer; default: a BPE on the captions")
    lit.add_argument("--text-vocab", type=int, default=1024, help="vocabulary of the trained BPE")
    lit.add_argument("--text-len", type=int, default=None, help="text context in tokens (default: fit 99%%)")
    lit.add_argument(
        "--readout",
        default="onehot",
        choices=["onehot", "latent"],
        help="the locked image vector: codes one-hot per position, or quantized latents",
    )
    lit.add_argument(
        "--head",
        default="none",
        choices=["none", "mlp", "conv"],
        help="none: the image side is fully locked (LiT); mlp / conv: a small trainable image head over the "
        "locked grid (conv: 3x3 convolutions shared by the positions)",
    )
    lit.add_argument("--text-dim", type=int, default=128, help="width of the text tower")
    lit.add_argument("--text-layers", type=int, default=2, help="transformer blocks of the text tower")


def check_args(parser, args) -> None:
    """Numbers that would train nothing, divide by zero or step uphill are refused here, naming the flag."""
    import math

    positive = [
        "steps",
        "batch_size",
        "grad_accum",
        "save_every",
        "eval_every",
        "log_every",
        "keep",
        "image_size",
        "text_len",
        "text_vocab",
        "crops",
    ]
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name, low in (
        ("lr", 0.0),
        ("clip", 0.0),
        ("weight_decay", None),
        ("gan_weight", None),
        ("perceptual_weight", None),
        ("cfg_dropout", None),
        ("text_loss_weight", None),
    ):
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (low is not None and value <= low):
            parser.error(
                f"--{name.replace('_', '-')} must be a finite number {'>' if low is not None else '>='} 0, got {value}"
            )
    if getattr(args, "cfg_dropout", None) is not None and args.cfg_dropout > 1:
        parser.error(f"--cfg-dropout is a probability, got {args.cfg_dropout}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.streaming and args.stage == "tokenizer" and args.limit is not None:
        parser.error(
            "--limit does not apply to a streamed tokenizer stage (it reads the files in turn, epoch after "
            "epoch): pass fewer files"
        )
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


def main(argv=None):
    parser, args = parse_args(argv)
    # Problems with the user's input or run (bad data, checkpoints, diverged training) end with one readable
    # line rather than a traceback; --debug (or VQGPT_DEBUG=1) shows the traceback too.
    run_or_exit(
        lambda: run(parser, args, argv),
        debug=getattr(args, "debug", False),
        oom_hint="lower --batch-size (and raise --grad-accum to keep the batch), or pick a smaller --preset",
        errors=(ValueError, FileNotFoundError, CheckpointError, FloatingPointError, RuntimeError),
    )


def run_stage(args) -> Path:
    """One stage, holding its run directory (rank 0 takes the lock; the other ranks write nothing there)."""
    train = STAGES[args.stage]
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
    if args.stage in STAGES:
        run_stage(args)
        training.cleanup_distributed()  # after the stage has returned and its models are gone (see its docstring)
    else:  # the embedded demo: stage 1, stage 2, then a sample grid
        if argv or len(sys.argv) > 1:
            parser.error("unknown command; use `tokenizer`, `gpt`, `lit`, or no arguments for the demo")
        tok_args = demo_args(["tokenizer"])
        device = torch.device("cuda" if tok_args.device != "cpu" and torch.cuda.is_available() else "cpu")
        print(f"demo: both stages train in {training.precision_choice(device, tok_args.precision)[1]}", flush=True)
        run_stage(tok_args)
        gpt_args = demo_args(["gpt", *DEMO_GPT_ARGS])
        out = run_stage(gpt_args)
        training.cleanup_distributed()
        print(
            f"demo done: tokenizer in {tok_args.out}, text-to-image model in {out}; "
            f"samples in {out / 'samples'}. Next: python sample.py --ckpt {out} --prompt 'green apple'"
        )


if __name__ == "__main__":
    main()
