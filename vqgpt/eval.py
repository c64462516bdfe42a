"""Evaluate trained models; each command prints one JSON object as the last line of stdout.

    python -m vqgpt.eval tokenizer --ckpt runs/tok --data openmoji        # psnr, ssim, usage, perplexity
    python -m vqgpt.eval adherence --ckpt runs/shapes-t2i --cfg 1 1.5 3    # per-attribute accuracy on shapes
    python -m vqgpt.eval recall --ckpt runs/t2i --data openmoji            # do samples show their prompt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


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
                   repeat: int = 1, **sampling) -> dict:
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
            images = _pipeline_images(pipe, prompts, seed, cfg_scale=scale, **sampling)
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
                       for b in x.split(128)])
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
                grid: str | None = None, **sampling) -> dict:
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
    samples = _pipeline_images(pipe, prompts, seed, **sampling)  # (n, 3, H, W)
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
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--cfg-schedule", default=None, choices=["constant", "linear", "interval"])
    p.add_argument("--cfg-interval", type=int, default=None)


def _sampling_kwargs(args) -> dict:
    keys = ("top_k", "top_p", "temperature", "cfg_schedule", "cfg_interval")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


# ----------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tokenizer", help="PSNR, SSIM, code usage and perplexity on held-out images")
    t.add_argument("--ckpt", required=True)
    t.add_argument("--data", default="openmoji")
    t.add_argument("--split", default="test", choices=["train", "test"])
    t.add_argument("--limit", type=int, default=None)
    t.add_argument("--image-column", default="image")
    t.add_argument("--caption-column", default="text")
    t.add_argument("--device", default="auto")
    a = sub.add_parser("adherence", help="per-attribute accuracy on held-out and seen shapes combinations")
    a.add_argument("--ckpt", required=True)
    a.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--grid", default=None, help="write a PNG of samples per CFG scale here")
    a.add_argument("--device", default="auto")
    a.add_argument("--include", default=None, metavar="REGEX", help="score only captions matching REGEX")
    a.add_argument("--exclude", default=None, metavar="REGEX", help="leave out captions matching REGEX")
    a.add_argument("--repeat", type=int, default=1, help="images per combination")
    _sampling_args(a)
    r = sub.add_parser("recall", help="fraction of fixed training captions whose sample's nearest image is theirs")
    r.add_argument("--ckpt", required=True)
    r.add_argument("--data", default=None, help="default: the data the model was trained on (else openmoji)")
    r.add_argument("--n", type=int, default=16)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--grid", default=None, help="write a PNG of samples and their nearest images here")
    r.add_argument("--device", default="auto")
    r.add_argument("--cfg", type=float, default=None)
    _sampling_args(r)
    args = p.parse_args(argv)

    try:
        result = run(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:  # the user's input: one line, no traceback
        if os.environ.get("VQGPT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


def run(args) -> dict:
    device = _device(args.device)
    if args.what == "tokenizer":
        result = eval_tokenizer(args.ckpt, args.data, args.split, args.limit, device,
                                image_column=args.image_column, caption_column=args.caption_column)
    elif args.what == "adherence":
        result = eval_adherence(args.ckpt, args.cfg, args.seed, device, args.grid, args.include, args.exclude,
                                args.repeat, **_sampling_kwargs(args))
    else:
        extra = {"cfg_scale": args.cfg} if args.cfg is not None else {}
        result = eval_recall(args.ckpt, args.data, args.n, args.seed, device, args.grid,
                             **_sampling_kwargs(args), **extra)
    return result


if __name__ == "__main__":
    main()
