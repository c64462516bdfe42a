"""Sample images from a trained text-to-image model: prompts in, PNGs and a labelled grid out.

    python sample.py --ckpt runs/t2i --prompt "green apple" --n 4 --seed 0 --out apple.png   # the model's defaults
    python sample.py --ckpt runs/t2i --prompts prompts.txt --n 2 --out samples/grid.png

Each image is written next to the grid as <out stem>-<prompt index>-<image index>.png. The same seed
gives the same images, whatever the batch they are drawn in.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a TextToImage directory (train.py gpt --out)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear", "interval"], default=None)
    p.add_argument("--cfg-interval", type=int, default=None, help="image tokens guided, with --cfg-schedule interval")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images decoded per batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CPU; pays off for many images: docs/BENCHMARKS.md)")
    p.add_argument("--cuda-graph", action="store_true", help="replay the decode step as a CUDA graph (GPU)")
    p.add_argument("--out", default="samples/grid.png", help="the grid's path; single images go beside it")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    for p in prompts:  # bytes that are not UTF-8 reach Python as lone surrogates, which no tokenizer takes
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            shown = p.encode("utf-8", "backslashreplace").decode()
            raise SystemExit(f"error: --prompt {shown!r} is not UTF-8 text") from None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SystemExit(f"--prompts {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: --prompts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("give at least one --prompt or a --prompts file")
    return prompts


GRID_PROMPTS, GRID_IMAGES = 32, 16  # the grid shows at most this many prompts (rows) and images per row


def check_args(args, n_prompts: int) -> Path:
    """Everything that can be checked before sampling is, so that no sampling time is lost to a typo."""
    if args.n < 1:
        raise SystemExit(f"error: --n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed < 2**62 - n_prompts * args.n:
        raise SystemExit(f"error: --seed must be in [0, 2**62), got {args.seed}")
    out = Path(args.out)
    if out.is_dir():
        raise SystemExit(f"error: --out {out} is a directory; give the grid's file name, e.g. {out / 'grid.png'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create {out.parent}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise SystemExit(f"error: --out {out}: {out.parent} is not writable")
    return out


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args)
    out = check_args(args, len(prompts))
    from vqgpt.pipeline import TextToImage, image_grid

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but torch sees no CUDA device")
    try:
        pipe = TextToImage.from_pretrained(args.ckpt, device=device)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    sampling = {k: v for k, v in {"cfg_scale": args.cfg, "cfg_schedule": args.cfg_schedule,
                                  "cfg_interval": args.cfg_interval, "top_k": args.top_k, "top_p": args.top_p,
                                  "temperature": args.temperature}.items() if v is not None}
    t0, n_done, grid_rows = time.time(), 0, []
    per_call = max(1, args.batch_size // args.n)  # prompts per call: about --batch-size rows in flight
    for first in range(0, len(prompts), per_call):
        chunk = prompts[first:first + per_call]
        try:  # image j of prompt i has seed + i * n + j, as if all prompts were sampled in one call
            images = pipe(chunk, num_images=args.n, seed=args.seed + first * args.n, batch_size=args.batch_size,
                          progress=True, compile=args.compile, cuda_graph=args.cuda_graph, **sampling)
        except ValueError as e:  # invalid sampling arguments: say which, without a traceback
            raise SystemExit(f"error: {e}") from None
        for k, prompt in enumerate(chunk):
            i = first + k
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "unconditional"
            row = images[k * args.n:(k + 1) * args.n]
            for j, image in enumerate(row):
                path = out.with_name(f"{out.stem}-{i:02d}-{j}-{slug}.png")
                image.save(path)
                print(path)
            if i < GRID_PROMPTS:
                grid_rows.append(row[:GRID_IMAGES])
        n_done += len(images)
    dt = time.time() - t0
    image_grid(grid_rows, labels=prompts[:GRID_PROMPTS]).save(out)
    shown = "" if len(prompts) <= GRID_PROMPTS and args.n <= GRID_IMAGES else \
        f" (the first {min(len(prompts), GRID_PROMPTS)} prompts, up to {GRID_IMAGES} images each)"
    print(f"grid: {out}{shown}")
    print(f"{n_done} images in {dt:.1f} s ({n_done / dt:.2f} images/s on {device})")


if __name__ == "__main__":
    main()
