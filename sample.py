"""Sample images from a trained text-to-image model: prompts in, PNGs and a labelled grid out.

    python sample.py --ckpt runs/t2i --prompt "green apple" --n 4 --seed 0 --out apple.png   # the model's defaults
    python sample.py --ckpt runs/t2i --prompts prompts.txt --n 2 --out samples/grid.png
    python sample.py --ckpt runs/t2i --prompt "green apple" --rerank 8 --scorer runs/lit   # best of 8 each
    python sample.py --ckpt owner/name --prompt "green apple" --cfg-scale 3 --negative-prompt "red"   # a hub repo

Each image is written next to the grid as <out stem>-<prompt index>-<image index>.png. The same seed
gives the same images, whatever the batch they are drawn in.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from vqgpt.cli import (
    DEVICES,
    HelpFormatter,
    add_debug_flag,
    add_rerank_flags,
    add_sampling_flags,
    pick_device,
    run_or_exit,
    sampling_overrides,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="a TextToImage directory (train.py gpt --out) or hub repo owner/name")
    p.add_argument("--revision", default=None, help="with a hub repo: its branch, tag or commit")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="the caption guidance pushes away from, instead of the null caption (needs --cfg != 1)",
    )
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    add_sampling_flags(p)
    p.add_argument("--seed", type=int, default=0, help="image j of prompt i is drawn with seed + i * n + j")
    p.add_argument("--batch-size", type=int, default=64, help="images sampled and decoded at once (GPU memory)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when torch sees one, else cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="the GPT's dtype (auto: bf16 on CUDA, fp32 elsewhere); the image decoder runs in fp32",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (CPU; pays off for many images: docs/BENCHMARKS.md)",
    )
    p.add_argument("--cuda-graph", action="store_true", help="replay the decode step as a CUDA graph (GPU)")
    add_rerank_flags(p)
    p.add_argument("--out", default="samples/grid.png", help="the grid's path; single images go beside it")
    add_debug_flag(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    for p in prompts:  # bytes that are not UTF-8 reach Python as lone surrogates, which no tokenizer takes
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            shown = p.encode("utf-8", "backslashreplace").decode()
            raise ValueError(f"--prompt {shown!r} is not UTF-8 text") from None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts file")
    return prompts


GRID_PROMPTS, GRID_IMAGES = 32, 16  # the grid shows at most this many prompts (rows) and images per row


def check_args(args, n_prompts: int) -> Path:
    """Everything that can be checked before sampling is, so that no sampling time is lost to a typo."""
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.rerank < 1:
        raise ValueError(f"--rerank must be >= 1 (candidates per image), got {args.rerank}")
    if not 0 <= args.seed < 2**62 - n_prompts * args.n:
        raise ValueError(f"--seed must be in [0, 2**62), got {args.seed}")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the grid's file name, e.g. {out / 'grid.png'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create {out.parent}: {e.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise OSError(f"--out {out}: {out.parent} is not writable")
    return out


def main(argv=None):
    args = parse_args(argv)
    run_or_exit(
        lambda: sample(args),
        debug=args.debug,
        oom_hint=f"lower --batch-size (now {args.batch_size}): it bounds the images sampled at once",
    )


def sample(args) -> None:
    prompts = read_prompts(args)
    out = check_args(args, len(prompts))
    from vqgpt.pipeline import TextToImage, image_grid

    device = pick_device(args.device)
    pipe = TextToImage.from_pretrained(args.ckpt, device=device, revision=args.revision, torch_dtype=args.dtype)
    sampling = sampling_overrides(args)  # the flags given; the model's saved defaults for the rest
    rerank = {}
    if args.rerank != 1 or args.scorer is not None:
        from vqgpt.rerank import resolve_scorer

        # loaded once, and checked against this model's image tokenizer before any sampling
        rerank = {"rerank": args.rerank, "scorer": resolve_scorer(pipe, args.scorer, device)}
    t0, n_done, grid_rows = time.time(), 0, []
    per_call = max(1, args.batch_size // args.n)  # prompts per call: about --batch-size rows in flight
    for first in range(0, len(prompts), per_call):
        chunk = prompts[first : first + per_call]
        # image j of prompt i has seed + i * n + j, as if all prompts were sampled in one call
        result = pipe(
            chunk,
            num_images=args.n,
            seed=args.seed + first * args.n,
            batch_size=args.batch_size,
            negative_prompt=args.negative_prompt,
            progress=True,
            compile=args.compile,
            cuda_graph=args.cuda_graph,
            **sampling,
            **rerank,
        )
        images, scores = result.images, result.scores
        for k, prompt in enumerate(chunk):
            i = first + k
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "unconditional"
            row = images[k * args.n : (k + 1) * args.n]
            for j, image in enumerate(row):
                path = out.with_name(f"{out.stem}-{i:02d}-{j}-{slug}.png")
                image.save(path)
                print(path if scores is None else f"{path}  score {scores[k * args.n + j]:.4f}")
            if i < GRID_PROMPTS:
                grid_rows.append(row[:GRID_IMAGES])
        n_done += len(images)
    dt = time.time() - t0
    image_grid(grid_rows, labels=prompts[:GRID_PROMPTS]).save(out)
    shown = (
        ""
        if len(prompts) <= GRID_PROMPTS and args.n <= GRID_IMAGES
        else f" (the first {min(len(prompts), GRID_PROMPTS)} prompts, up to {GRID_IMAGES} images each)"
    )
    print(f"grid: {out}{shown}")
    print(f"{n_done} images in {dt:.1f} s ({n_done / dt:.2f} images/s on {device})")


if __name__ == "__main__":
    main()
