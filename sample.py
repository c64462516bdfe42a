"""Sample images from a trained text-to-image model: prompts in, PNGs and a labelled grid out.

    python sample.py --ckpt runs/t2i --prompt "green apple" --n 4 --cfg 3 --top-k 100 --seed 0 --out apple.png
    python sample.py --ckpt runs/t2i --prompts prompts.txt --n 2 --out samples/grid.png

Each image is written next to the grid as <out stem>-<prompt index>-<image index>.png. The same seed
gives the same images, whatever the batch they are drawn in.
"""

from __future__ import annotations

import argparse
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
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SystemExit(f"--prompts {path}: no such file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("give at least one --prompt or a --prompts file")
    return prompts


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args)
    from vqgpt.pipeline import TextToImage, image_grid

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = TextToImage.from_pretrained(args.ckpt, device=device)
    sampling = {k: v for k, v in {"cfg_scale": args.cfg, "cfg_schedule": args.cfg_schedule,
                                  "cfg_interval": args.cfg_interval, "top_k": args.top_k, "top_p": args.top_p,
                                  "temperature": args.temperature}.items() if v is not None}
    t0 = time.time()
    try:
        images = pipe(prompts, num_images=args.n, seed=args.seed, batch_size=args.batch_size, progress=True,
                      compile=args.compile, cuda_graph=args.cuda_graph, **sampling)
    except ValueError as e:  # invalid sampling arguments: say which, without a traceback
        raise SystemExit(f"error: {e}") from None
    dt = time.time() - t0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(prompts):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "unconditional"
        for j in range(args.n):
            path = out.with_name(f"{out.stem}-{i:02d}-{j}-{slug}.png")
            images[i * args.n + j].save(path)
            print(path)
    image_grid([images[i * args.n:(i + 1) * args.n] for i in range(len(prompts))], labels=prompts).save(out)
    print(f"grid: {out}")
    print(f"{len(images)} images in {dt:.1f} s ({len(images) / dt:.2f} images/s on {device})")


if __name__ == "__main__":
    main()
