"""Evaluate trained models; each command prints one JSON object as the last line of stdout.

    python -m vqgpt.eval tokenizer --ckpt runs/tok --data openmoji        # psnr, ssim, usage, perplexity
    python -m vqgpt.eval adherence --ckpt runs/shapes-t2i --cfg 1 1.5 3    # per-attribute accuracy on shapes
    python -m vqgpt.eval recall --ckpt runs/t2i --data openmoji            # do samples show their prompt
    python -m vqgpt.eval recall --ckpt runs/t2i --record                   # and keep the figures in its model card

Errors in the input are one line on stderr with exit code 2 (--debug or VQGPT_DEBUG=1: the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

from .cli import DEVICES, HelpFormatter, add_debug_flag, pick_device, run_or_exit
from .hub import record_evaluation


# ----------------------------------------------------------------------------------------------------
def eval_tokenizer(ckpt: str, data: str, split: str = "test", limit: int | None = None, device: str = "cpu",
                   batch_size: int = 128, image_column: str = "image", caption_column: str = "text") -> dict:
    """Reconstruction quality and code usage of an ImageTokenizer on a split (held out by default)."""
    from . import data as vdata
    from .metrics import codebook_stats, psnr, ssim
    from .tokenizer import ImageTokenizer

    tok = ImageTokenizer.from_pretrained(ckpt, device=device)
    images, _ = vdata.load_image_tensors(data, split, tok.image_size, image_column=image_column,
                                         caption_column=caption_column, limit=limit)
    x = images.float().div(255)
    t0 = time.perf_counter()
    codes = torch.cat([tok.encode(b.to(device)).cpu() for b in x.split(batch_size)])
    t1 = time.perf_counter()
    recon = torch.cat([tok.decode(c.to(device)).cpu() for c in codes.split(batch_size)])
    t2 = time.perf_counter()
    return {
        "psnr": round(psnr(recon, x), 3),
        "ssim": round(ssim(recon, x), 4),
        **{k: round(v, 4) for k, v in codebook_stats(codes, tok.codebook_size).items()},
        "codebook_size": tok.codebook_size,
        "grid": [tok.grid_size, tok.grid_size],
        "images": len(x),
        "split": split,
        "encode_images_per_s": round(len(x) / (t1 - t0), 1),
        "decode_images_per_s": round(len(x) / (t2 - t1), 1),
        "device": device,
    }


# ----------------------------------------------------------------------------------------------------
def _pipeline_images(pipe, prompts: list[str], seed: int, batch_size: int = 128, **sampling) -> torch.Tensor:
    """float (len(prompts), 3, H, W) in [0, 1]: one sample per prompt, image i drawn with seed + i."""
    out = []
    for i in range(0, len(prompts), batch_size):
        codes = pipe.generate_codes(prompts[i : i + batch_size], 1, seed + i, **sampling)
        out.append(pipe.image_tokenizer.decode(codes).cpu())
    return torch.cat(out)


def eval_adherence(ckpt: str, cfg_scales: list[float], seed: int = 0, device: str = "cpu",
                   grid: str | None = None, include: str | None = None, exclude: str | None = None,
                   repeat: int = 1, batch_size: int = 128, **sampling) -> dict:
    """Per-attribute accuracy of samples on `shapes` prompts, judged by ShapesJudge.

    "cfg": on the held-out attribute combinations (never seen in training), `repeat` images per combination;
    "seen": on as many combinations drawn from the training split. "ceiling": the judge on tokenizer
    reconstructions of true held-out images, the best a perfect GPT could score with this tokenizer.
    include / exclude: regular expressions on the captions, to score a subset (e.g. some colours only).
    """
    import random
    import re

    from . import data as vdata
    from .metrics import load_judge
    from .pipeline import TextToImage, image_grid

    pipe = TextToImage.from_pretrained(ckpt, device=device)
    judge = load_judge(pipe.image_tokenizer.image_size, device=device)
    def wanted(spec) -> bool:
        caption = vdata.shape_caption(spec)
        return (include is None or re.search(include, caption)) and not (exclude and re.search(exclude, caption))

    held = list(vdata.held_out_specs())
    train_specs = sorted(set(vdata.all_specs()) - set(held), key=vdata.shape_caption)
    held, train_specs = [s for s in held if wanted(s)], [s for s in train_specs if wanted(s)]
    if not held:
        raise ValueError(f"no held-out combination passes include={include!r} exclude={exclude!r}")
    seen = random.Random(seed).sample(train_specs, min(len(held), len(train_specs))) * repeat
    held = held * repeat
    result = {"cfg": {}, "seen": {}}
    rows, labels = [], []
    shown = torch.linspace(0, len(held) - 1, min(10, len(held))).long()  # grid columns: spread over the combinations
    for scale in cfg_scales:
        for name, specs in (("cfg", held), ("seen", seen)):
            prompts = [vdata.shape_caption(s) for s in specs]
            images = _pipeline_images(pipe, prompts, seed, batch_size, cfg_scale=scale, **sampling)
            result[name][f"{scale:g}"] = {k: round(v, 4) for k, v in judge.score(images, specs).items()}
            if name == "cfg":
                rows.append(images[shown])
                labels.append(f"cfg {scale:g}")
    fresh = judge.accuracy_on_fresh()
    result["judge_accuracy"] = round(sum(fresh.values()) / len(fresh), 4)
    result["judge"] = {k: round(v, 4) for k, v in fresh.items()}
    true, captions = vdata.load_image_tensors("shapes", "test", pipe.image_tokenizer.image_size)
    x = true.float().div(255)
    recon = torch.cat([pipe.image_tokenizer.decode(pipe.image_tokenizer.encode(b.to(device))).cpu()
                       for b in x.split(batch_size)])
    specs = [vdata.parse_shape_caption(c) for c in captions]
    ceiling = judge.score(recon, specs)
    result["ceiling"] = round(ceiling["mean"], 4)
    result["ceiling_by_attribute"] = {k: round(v, 4) for k, v in ceiling.items()}
    result["sampling"] = {**{k: v for k, v in vars(pipe.sampling).items() if k != "cfg_scale"}, **sampling}
    result["images"] = {"cfg": len(held), "seen": len(seen)}
    if include or exclude:
        result["subset"] = {"include": include, "exclude": exclude}
    if grid:
        size = pipe.image_tokenizer.image_size  # the prompts of the sample rows, drawn true
        true_row = torch.stack([vdata.square_tensor(vdata.render_shape(held[i], size), size) for i in shown])
        image_grid([true_row.float() / 255] + rows, labels=["true"] + labels).save(grid)
        result["grid"] = grid
    return result


def recall_prompts(captions: list[str], n: int = 16) -> list[str]:
    """n fixed training captions, evenly spaced over the sorted distinct captions."""
    distinct = sorted(set(captions))
    return [distinct[int(i * len(distinct) / n)] for i in range(n)]


def eval_recall(ckpt: str, data: str | None = None, n: int = 16, seed: int = 0, device: str = "cpu",
                grid: str | None = None, batch_size: int = 128, **sampling) -> dict:
    """Do samples show their prompt? For n fixed training captions, sample one image each (the
    checkpoint's default settings) and find the nearest training image in pixel space (MSE): a hit when
    that image carries the prompted caption.

    The training set is the model's own (config.json "trained_on", written by train.py): its data, and the
    captions its --include/--exclude/--limit kept. `data` (default: that record's, else openmoji) names
    another dataset; the record's caption filter then still applies only if it is the same dataset."""
    from . import data as vdata
    from .pipeline import TextToImage, image_grid

    pipe = TextToImage.from_pretrained(ckpt, device=device)
    own = pipe.trained_on or {}
    data = data or own.get("data") or "openmoji"
    rule = own if own.get("data") == data else {}
    include, exclude, limit = rule.get("include"), rule.get("exclude"), rule.get("limit")
    filtered = include is not None or exclude is not None
    images, captions = vdata.load_image_tensors(data, "train", pipe.image_tokenizer.image_size,
                                                limit=None if filtered else limit)
    if filtered:  # as train.py: filter, then the first `limit`
        keep = vdata.caption_filter(captions, include, exclude)[:limit]
        images, captions = images[keep], [captions[i] for i in keep]
    prompts = recall_prompts(captions, n)
    samples = _pipeline_images(pipe, prompts, seed, batch_size, **sampling)  # (n, 3, H, W)
    train = images.float().div(255).flatten(1)  # (N, 3*H*W)
    dist = torch.cdist(samples.flatten(1), train)  # (n, N)
    nearest = dist.argmin(1).tolist()
    hits = [captions[j] == p for j, p in zip(nearest, prompts)]
    if grid:
        rows = [samples, images[nearest].float().div(255)]
        image_grid(rows, labels=["sample", "nearest"]).save(grid)
    return {
        "recall": sum(hits) / n,
        "hits": sum(hits),
        "n": n,
        "data": data,
        "train_images": len(captions),
        **({"caption_filter": {"include": include, "exclude": exclude}} if filtered else {}),
        "prompts": prompts,
        "nearest": [captions[j] for j in nearest],
        "sampling": {**vars(pipe.sampling), **sampling},
        **({"grid": grid} if grid else {}),
    }


def _sampling_args(p):
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest codes (default: the model's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass, 1 = off (default: the model's)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    p.add_argument("--cfg-schedule", default=None, choices=["constant", "linear", "interval"],
                   help="how guidance varies over the image (default: the model's)")
    p.add_argument("--cfg-interval", type=int, default=None, help="image tokens guided, with --cfg-schedule interval")


def _sampling_kwargs(args) -> dict:
    keys = ("top_k", "top_p", "temperature", "cfg_schedule", "cfg_interval")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _common_args(p, what: str):
    p.add_argument("--ckpt", required=True, help=f"the {what} directory, or a hub repo owner/name")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when torch sees one, else cpu")
    p.add_argument("--batch-size", type=int, default=128, help="images encoded, sampled or decoded at once")
    p.add_argument("--record", action="store_true",
                   help="also keep the figures in --ckpt's config.json and model card (README.md)")
    add_debug_flag(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tokenizer", help="PSNR, SSIM, code usage and perplexity on held-out images",
                       formatter_class=HelpFormatter)
    _common_args(t, "ImageTokenizer")
    t.add_argument("--data", default="openmoji", help="the images: a --data spec as in train.py")
    t.add_argument("--split", default="test", choices=["train", "test"], help="the split to reconstruct")
    t.add_argument("--limit", type=int, default=None, help="at most this many images (default: all)")
    t.add_argument("--image-column", default="image", help="a hub dataset's image column")
    t.add_argument("--caption-column", default="text", help="a hub dataset's caption column")
    a = sub.add_parser("adherence", help="per-attribute accuracy on held-out and seen shapes combinations",
                       formatter_class=HelpFormatter)
    _common_args(a, "TextToImage (trained on shapes)")
    a.add_argument("--cfg", "--cfg-scale", dest="cfg", type=float, nargs="+", default=[1.0, 3.0],
                   help="guidance scales to score")
    a.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i")
    a.add_argument("--grid", default=None, help="write a PNG of samples per CFG scale here (default: none)")
    a.add_argument("--include", default=None, metavar="REGEX", help="score only captions matching REGEX (default: all)")
    a.add_argument("--exclude", default=None, metavar="REGEX", help="leave out captions matching REGEX (default: none)")
    a.add_argument("--repeat", type=int, default=1, help="images per combination")
    _sampling_args(a)
    r = sub.add_parser("recall", help="fraction of fixed training captions whose sample's nearest image is theirs",
                       formatter_class=HelpFormatter)
    _common_args(r, "TextToImage")
    r.add_argument("--data", default=None, help="default: the data the model was trained on (else openmoji)")
    r.add_argument("--n", type=int, default=16, help="training captions sampled")
    r.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i")
    r.add_argument("--grid", default=None, help="write a PNG of samples and their nearest images here (default: none)")
    r.add_argument("--cfg", "--cfg-scale", dest="cfg", type=float, default=None,
                   help="guidance scale (default: the model's)")
    _sampling_args(r)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    def evaluate():
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.record and not os.path.isfile(os.path.join(args.ckpt, "config.json")):
            raise ValueError(f"--record writes into a local model directory; {args.ckpt} is not one")
        result = run(args)
        if args.record:
            shown = [a for a in (sys.argv[1:] if argv is None else list(map(str, argv))) if a != "--record"]
            record_evaluation(args.ckpt, args.what, result, shlex.join(["python", "-m", "vqgpt.eval", *shown]))
        return result

    result = run_or_exit(evaluate, debug=args.debug, oom_hint=f"lower --batch-size (now {args.batch_size})")
    print(json.dumps(result))


def run(args) -> dict:
    device = pick_device(args.device)
    if args.what == "tokenizer":
        result = eval_tokenizer(args.ckpt, args.data, args.split, args.limit, device, args.batch_size,
                                image_column=args.image_column, caption_column=args.caption_column)
    elif args.what == "adherence":
        result = eval_adherence(args.ckpt, args.cfg, args.seed, device, args.grid, args.include, args.exclude,
                                args.repeat, args.batch_size, **_sampling_kwargs(args))
    else:
        extra = {"cfg_scale": args.cfg} if args.cfg is not None else {}
        result = eval_recall(args.ckpt, args.data, args.n, args.seed, device, args.grid, args.batch_size,
                             **_sampling_kwargs(args), **extra)
    return result


if __name__ == "__main__":
    main()
