"""What train.py, sample.py and `python -m vqgpt.eval` share on the command line: help that shows every
default, the --device choice, the sampling and reranking flags, and user errors as one line (exit 2) with
--debug for the traceback.

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_debug_flag(p)
    args = p.parse_args()
    run_or_exit(lambda: main(args), debug=args.debug, oom_hint="lower --batch-size")
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .generate import CFG_SCHEDULES, SamplingConfig

DEVICES = ("auto", "cpu", "cuda", "mps")
# Errors that are the user's input or run (a bad path, a bad value, a model that does not fit): one line.
USER_ERRORS = (ValueError, FileNotFoundError, OSError, RuntimeError)


def add_run_flags(sp: argparse.ArgumentParser, d: dict, presets: dict, out: str, wandb_prefix: str) -> None:
    """The flags every training stage takes (data, run directory, model size, schedule, device, tracking), with
    the defaults D (the demo's: data, preset, steps, batch_size, lr, eval_every), the model PRESETS, the default
    run directory runs/OUT and wandb runs named WANDB_PREFIX-<run directory>."""
    sp.add_argument(
        "--data",
        default=d["data"],
        help="openmoji | shapes | a folder | tar shards ('dir/{00000..00099}.tar') | parquet files | "
        "a hub dataset name",
    )
    sp.add_argument("--revision", default=None, help="a hub dataset's branch, tag or commit")
    sp.add_argument(
        "--streaming",
        action="store_true",
        help="read tar shards, parquet files or a hub set as a stream, file by file, copying "
        "nothing to the cache (for sets too large to download)",
    )
    sp.add_argument("--image-column", default="image", help="a hub dataset's or parquet file's image column")
    sp.add_argument("--caption-column", default="text", help="a hub dataset's or parquet file's caption column")
    sp.add_argument("--limit", type=int, default=None, help="use at most this many training images (default: all)")
    sp.add_argument("--out", default=None, help=f"run directory (default: --resume's, else runs/{out})")
    sp.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds")
    sp.add_argument(
        "--preset",
        default=d["preset"],
        choices=sorted(presets),
        help="model size (PRESETS in vqgpt/tokenizer.py, vqgpt/model.py)",
    )
    sp.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps in all")
    sp.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch (all ranks)")
    sp.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (per rank)")
    sp.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (cosine decay after warm-up)")
    sp.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of --steps)")
    sp.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    sp.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    sp.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    sp.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    sp.add_argument(
        "--eval-every",
        type=int,
        default=d.get("eval_every", 500),
        help="steps between held-out evaluations and sample grids",
    )
    sp.add_argument("--log-every", type=int, default=25, help="steps between logged losses")
    sp.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    sp.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when torch sees one, else cpu")
    sp.add_argument(
        "--wandb",
        default=None,
        choices=["online", "offline", "disabled"],
        help="default: online with an account configured, else offline",
    )
    sp.add_argument("--wandb-project", default=None, help="wandb project (default: $WANDB_PROJECT, else vqgpt)")
    sp.add_argument(
        "--wandb-name",
        default=None,
        help=f"wandb run name (default: $WANDB_NAME, else {wandb_prefix}-"
        "<run directory>); --resume continues the run's own wandb run (runs/<run>/wandb.json)",
    )
    sp.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    sp.add_argument("--compile", action="store_true", help="torch.compile the model")
    sp.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data loader processes (default: on a GPU one fewer than the cores, at most 8; "
        "on a CPU none up to 4 cores)",
    )
    sp.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="autocast; auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32",
    )
    add_debug_flag(sp)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written (example commands), and "(default: X)" after every flag's help,
    unless the help already says what its default is (e.g. "default: the model's" for a None)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (also VQGPT_DEBUG=1) instead of one line",
    )


# The sampling flags, one per SamplingConfig field: (flags, type, what it is called, what it does). sample.py and
# `vqgpt.eval` take them as overrides of the model's saved defaults (--top-k); `train.py gpt` takes them as the
# defaults it saves with the model (--sample-top-k), which TextToImage then uses unless told otherwise.
SAMPLING_FLAGS = {
    "cfg_scale": (("cfg", "cfg-scale"), float, "guidance scale", "guidance scale; 1 = no guidance"),
    "cfg_schedule": (("cfg-schedule",), str, "guidance schedule", "how guidance varies over the image"),
    "cfg_interval": (("cfg-interval",), int, "guidance interval", "image tokens guided, with --cfg-schedule interval"),
    "top_k": (("top-k",), int, "top-k", "sample among the k likeliest codes"),
    "top_p": (("top-p",), float, "top-p", "nucleus mass, 1 = off"),
    "temperature": (("temperature",), float, "temperature", "0 = greedy"),
}


def add_sampling_flags(parser: argparse.ArgumentParser, *, cfg_flag: bool = True, saved: bool = False) -> None:
    """The sampling flags (SAMPLING_FLAGS); unset ones are None, and `sampling_overrides` reads the set ones.

    cfg_flag=False leaves --cfg out, for a command whose --cfg takes several scales. saved=True: `train.py gpt`'s
    --sample-* flags, the defaults saved with the model (unset: the --init model's, else SamplingConfig's)."""
    defaults = SamplingConfig()
    for field, (names, kind, called, does) in _sampling_flags(cfg_flag):
        if saved:
            default = getattr(defaults, field)
            shown = "none" if default is None else f"{default:g}" if isinstance(default, float) else default
            text = f"the saved {called} (default: {shown})"
        else:
            text = f"{does} (default: the model's)"
        parser.add_argument(
            *(f"--{'sample-' if saved else ''}{name}" for name in names),
            dest=_dest(names[0], saved),
            type=kind,
            default=None,
            choices=CFG_SCHEDULES if field == "cfg_schedule" else None,
            help=text,
        )


def sampling_overrides(args: argparse.Namespace, *, cfg_flag: bool = True, saved: bool = False) -> dict:
    """{SamplingConfig field: value} for the sampling flags that were given (the same cfg_flag and saved as
    `add_sampling_flags`)."""
    values = {field: getattr(args, _dest(names[0], saved)) for field, (names, *_) in _sampling_flags(cfg_flag)}
    return {field: value for field, value in values.items() if value is not None}


def _sampling_flags(cfg_flag: bool):
    return [(field, flag) for field, flag in SAMPLING_FLAGS.items() if cfg_flag or field != "cfg_scale"]


def _dest(name: str, saved: bool) -> str:
    return ("sample_" if saved else "") + name.replace("-", "_")


def add_rerank_flags(parser: argparse.ArgumentParser) -> None:
    """--rerank N and --scorer, of sample.py and `vqgpt.eval adherence|recall` (vqgpt/rerank.py)."""
    parser.add_argument("--rerank", type=int, default=1, metavar="N", help="keep the best of N candidates per image")
    parser.add_argument(
        "--scorer",
        default=None,
        metavar="DIR|self",
        help="with --rerank: a LiT scorer directory (train.py lit) or 'self' (the GPT's own "
        "evidence); default: the model's saved scorer, else self",
    )


def pick_device(name: str) -> str:
    """--device auto | cpu | cuda | mps -> the device to use; one that torch does not see is a ValueError."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            "--device mps was asked for but torch sees no MPS device (Apple silicon, a macOS build of torch)"
        )
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA out-of-memory error, or the MPS backend's (a plain RuntimeError that says so)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


def run_or_exit(fn, *, debug: bool = False, oom_hint: str, errors: tuple = USER_ERRORS):
    """fn(), with a user error printed as one line on stderr and exit code 2 (the traceback with --debug or
    VQGPT_DEBUG=1). Out of memory says which flag to lower (oom_hint), not torch's allocator report."""
    try:
        return fn()
    except errors as e:
        if debug or os.environ.get("VQGPT_DEBUG"):
            raise
        if is_out_of_memory(e):
            print(f"error: out of memory ({str(e).strip().splitlines()[0][:120]}): {oom_hint}", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
