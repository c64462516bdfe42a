"""Evaluate trained models; each command prints one JSON object as the last line of stdout.

    python -m vqgpt.eval tokenizer --ckpt runs/tok --data openmoji        # psnr, ssim, usage, perplexity
    python -m vqgpt.eval adherence --ckpt runs/shapes-t2i --cfg 1 1.5 3    # per-attribute accuracy on shapes
    python -m vqgpt.eval recall --ckpt runs/t2i --data openmoji            # do samples show their prompt
    python -m vqgpt.eval alignment --ckpt runs/t2i --scorer runs/lit        # LiT agreement, retrieval R@1/R@5
    python -m vqgpt.eval diversity --ckpt runs/shapes-t2i --scorer runs/lit  # variety of unsaid attributes
    python -m vqgpt.eval adherence --ckpt runs/shapes-t2i --cfg 1.5 --rerank 8 --scorer runs/lit  # best of 8
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

from .cli import (
    DEVICES,
    HelpFormatter,
    add_debug_flag,
    add_rerank_flags,
    add_sampling_flags,
    pick_device,
    run_or_exit,
    sampling_overrides,
)
from .records import record_evaluation


# ----------------------------------------------------------------------------------------------------
def eval_tokenizer(
    ckpt: str,
    data: str,
    split: str = "test",
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = 128,
    image_column: str = "image",
    caption_column: str = "text",
) -> dict:
    """Reconstruction quality and code usage of an ImageTokenizer on a split (held out by default)."""
    from . import data as vdata
    from .metrics import codebook_stats, psnr, ssim
    from .tokenizer import ImageTokenizer

    tok = ImageTokenizer.from_pretrained(ckpt, device=device)
    images, _ = vdata.load_image_tensors(
        data, split, tok.image_size, image_column=image_column, caption_column=caption_column, limit=limit
    )
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
def _pipeline_codes(
    pipe, prompts: list[str], seed: int, batch_size: int = 128, rerank: int = 1, scorer=None, **sampling
) -> torch.Tensor:
    """Codes (len(prompts), h, w): one sample per prompt, image i drawn with seed + i; with rerank > 1 (or a
    scorer), the best of `rerank` candidates (vqgpt/rerank.py: candidate 0 is the plain sample)."""
    if rerank > 1 or scorer is not None:
        from .rerank import rerank_codes

        return rerank_codes(
            pipe, prompts, 1, seed=seed, rerank=rerank, scorer=scorer, batch_size=batch_size, **sampling
        )[0]
    return torch.cat(
        [
            pipe.generate_codes(prompts[i : i + batch_size], 1, seed + i, **sampling).cpu()
            for i in range(0, len(prompts), batch_size)
        ]
    )


def _pipeline_images(pipe, prompts: list[str], seed: int, batch_size: int = 128, **kw) -> torch.Tensor:
    """float (len(prompts), 3, H, W) in [0, 1], from _pipeline_codes (kw: rerank, scorer, sampling)."""
    codes = _pipeline_codes(pipe, prompts, seed, batch_size, **kw)
    return torch.cat([pipe.image_tokenizer.decode(c).cpu() for c in codes.split(batch_size)])


def _scorer(pipe, scorer, rerank: int = 1, required: bool = False):
    """The --scorer of a command: None, 'self' or a LiT scorer loaded and checked against the pipeline."""
    if scorer is None and rerank <= 1 and not required:
        return None
    from .rerank import SELF, resolve_scorer

    scorer = resolve_scorer(pipe, scorer)
    if required and scorer == SELF:
        raise ValueError("this evaluation needs a LiT scorer: pass --scorer DIR (`python train.py lit`)")
    return scorer


def _judge_and_ceiling(judge, image_tokenizer, device, batch_size: int) -> dict:
    """The judge's accuracy on fresh true shapes, and on the tokenizer's reconstructions of the held-out test
    images: the ceiling, the best a perfect GPT could score with this tokenizer."""
    from . import data as vdata

    fresh = judge.accuracy_on_fresh()
    true, captions = vdata.load_image_tensors("shapes", "test", image_tokenizer.image_size)
    x = true.float().div(255)
    recon = torch.cat([image_tokenizer.decode(image_tokenizer.encode(b.to(device))).cpu() for b in x.split(batch_size)])
    ceiling = judge.score(recon, [vdata.parse_shape_caption(c) for c in captions])
    return {
        "judge_accuracy": round(sum(fresh.values()) / len(fresh), 4),
        "judge": {k: round(v, 4) for k, v in fresh.items()},
        "ceiling": round(ceiling["mean"], 4),
        "ceiling_by_attribute": {k: round(v, 4) for k, v in ceiling.items()},
    }


def eval_adherence(
    ckpt: str,
    cfg_scales: list[float],
    seed: int = 0,
    device: str = "cpu",
    grid: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    repeat: int = 1,
    rerank: int = 1,
    scorer=None,
    batch_size: int = 128,
    **sampling,
) -> dict:
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
    scorer = _scorer(pipe, scorer, rerank)
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
    result = {"cfg": {}, "seen": {}, "seconds_per_image": {}}
    rows, labels = [], []
    shown = torch.linspace(0, len(held) - 1, min(10, len(held))).long()  # grid columns: spread over the combinations
    for scale in cfg_scales:
        for name, specs in (("cfg", held), ("seen", seen)):
            prompts = [vdata.shape_caption(s) for s in specs]
            t0 = time.perf_counter()
            images = _pipeline_images(
                pipe, prompts, seed, batch_size, rerank=rerank, scorer=scorer, cfg_scale=scale, **sampling
            )
            if name == "cfg":
                result["seconds_per_image"][f"{scale:g}"] = round((time.perf_counter() - t0) / len(specs), 4)
            result[name][f"{scale:g}"] = {k: round(v, 4) for k, v in judge.score(images, specs).items()}
            if name == "cfg":
                rows.append(images[shown])
                labels.append(f"cfg {scale:g}")
    result.update(_judge_and_ceiling(judge, pipe.image_tokenizer, device, batch_size))
    result["sampling"] = {**{k: v for k, v in vars(pipe.sampling).items() if k != "cfg_scale"}, **sampling}
    result["images"] = {"cfg": len(held), "seen": len(seen)}
    if scorer is not None:
        result["rerank"] = {"n": rerank, "scorer": _scorer_name(scorer)}
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


def eval_recall(
    ckpt: str,
    data: str | None = None,
    n: int = 16,
    seed: int = 0,
    device: str = "cpu",
    grid: str | None = None,
    rerank: int = 1,
    scorer=None,
    batch_size: int = 128,
    **sampling,
) -> dict:
    """Do samples show their prompt? For n fixed training captions, sample one image each (the
    checkpoint's default settings) and find the nearest training image in pixel space (MSE): a hit when
    that image carries the prompted caption.

    The training set is the model's own (config.json "trained_on", written by train.py): its data, and the
    captions its --include/--exclude/--limit kept. `data` (default: that record's, else openmoji) names
    another dataset; the record's caption filter then still applies only if it is the same dataset."""
    from . import data as vdata
    from .pipeline import TextToImage, image_grid

    pipe = TextToImage.from_pretrained(ckpt, device=device)
    scorer = _scorer(pipe, scorer, rerank)
    own = pipe.trained_on or {}
    data = data or own.get("data") or "openmoji"
    rule = own if own.get("data") == data else {}
    include, exclude, limit = rule.get("include"), rule.get("exclude"), rule.get("limit")
    filtered = include is not None or exclude is not None
    images, captions = vdata.load_image_tensors(
        data, "train", pipe.image_tokenizer.image_size, limit=None if filtered else limit
    )
    if filtered:  # as train.py: filter, then the first `limit`
        keep = vdata.caption_filter(captions, include, exclude)[:limit]
        images, captions = images[keep], [captions[i] for i in keep]
    prompts = recall_prompts(captions, n)
    samples = _pipeline_images(pipe, prompts, seed, batch_size, rerank=rerank, scorer=scorer, **sampling)
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
        **({"rerank": {"n": rerank, "scorer": _scorer_name(scorer)}} if scorer is not None else {}),
    }


def _scorer_name(scorer) -> str:
    return scorer if isinstance(scorer, str) else f"lit:{scorer.config.readout}/{scorer.config.head}"


# ----------------------------------------------------------------------------------------------------
def _spread(n_total: int, n: int | None) -> torch.Tensor:
    """Indices of at most n of n_total items, evenly spread (all of them when n is None or larger)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    return torch.linspace(0, n_total - 1, n).round().long()


def _encode(tok, images_u8: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    return torch.cat([tok.encode(b.float().div(255)).cpu() for b in images_u8.split(batch_size)])


def eval_alignment(
    ckpt: str,
    scorer: str,
    data: str | None = None,
    n: int | None = 512,
    seed: int = 0,
    device: str = "cpu",
    rerank: int = 1,
    **sampling,
) -> dict:
    """How well images agree with captions in the LiT scorer's space, on held-out data (the test split):
    "samples" (one per held-out caption, the checkpoint's sampling defaults; reranked with rerank > 1),
    "true" (the true images: the ceiling) and "shuffled" (true images against other images' captions: the
    floor), mean cosines; text-to-image retrieval R@1/R@5 among the held-out images. On shapes also the
    scorer's zero-shot reading of each attribute of the held-out combinations, beside the shapes judge's."""
    from . import data as vdata
    from .lit import retrieval_recall
    from .pipeline import TextToImage
    from .rerank import score_codes

    pipe = TextToImage.from_pretrained(ckpt, device=device)
    lit = _scorer(pipe, scorer, required=True)
    data = data or (pipe.trained_on or {}).get("data") or "openmoji"
    images, captions = vdata.load_image_tensors(data, "test", pipe.image_tokenizer.image_size)
    if not len(captions):
        raise ValueError(f"{data} has no held-out images to align")
    pick = _spread(len(captions), n)
    images, captions = images[pick], [captions[i] for i in pick.tolist()]
    true_codes = _encode(pipe.image_tokenizer, images)  # (n, h, w)
    shift = max(1, len(captions) // 2)
    other = captions[shift:] + captions[:shift]
    differ = torch.tensor([a != b for a, b in zip(captions, other)])
    t0 = time.perf_counter()
    sample_codes = _pipeline_codes(pipe, captions, seed, rerank=rerank, scorer=lit if rerank > 1 else None, **sampling)
    seconds = time.perf_counter() - t0
    result = {
        "samples": score_codes(pipe, lit, sample_codes, captions).mean().item(),
        "true": lit.score_codes(true_codes, captions).mean().item(),
        "shuffled": lit.score_codes(true_codes[differ], [c for c, d in zip(other, differ) if d]).mean().item(),
        **retrieval_recall(lit.similarity_codes(true_codes, captions), captions, captions),
    }
    result = {k: round(v, 4) for k, v in result.items()}
    if data == "shapes":
        from .metrics import load_judge, zero_shot_attributes

        specs = [vdata.parse_shape_caption(c) for c in captions]
        judge = load_judge(pipe.image_tokenizer.image_size, device=device)
        result["zero_shot"] = {k: round(v, 4) for k, v in zero_shot_attributes(lit, true_codes, specs).items()}
        result["judge"] = {k: round(v, 4) for k, v in judge.score(images.float() / 255, specs).items()}
    result.update(
        {
            "images": len(captions),
            "distinct_captions": len(set(captions)),
            "data": data,
            "split": "test",
            "scorer": _scorer_name(lit),
            "rerank": rerank,
            "seconds_per_sample": round(seconds / len(pick), 4),
            "sampling": {**vars(pipe.sampling), **sampling},
        }
    )
    return result


# Prompts that leave attributes unsaid (data.UNSAID_PROB of the training captions are like them): several
# right answers each, so their samples should vary the unsaid attributes as the training data does.
DIVERSITY_PROMPTS = (
    "a red circle",
    "a large star at the top left",
    "a small blue square",
    "a triangle on a black background",
    "a green cross in the center",
    "a white star on a gray background",
    "a large yellow circle at the bottom right",
    "a purple square at the top right on a white background",
)


def _diversity_row(pipe, judge, lit, prompts, per_prompt, seed, train_specs, **kw) -> dict:
    """Judge per_prompt samples of each prompt; entropy of every unsaid attribute over them against the data's."""
    from . import data as vdata
    from .metrics import data_entropy, entropy

    texts = [p for p in prompts for _ in range(per_prompt)]
    t0 = time.perf_counter()
    codes = _pipeline_codes(pipe, texts, seed, **kw)  # (P * n, h, w)
    seconds = time.perf_counter() - t0
    images = torch.cat([pipe.image_tokenizer.decode(c).cpu() for c in codes.split(128)])
    judged = judge.predict(images)
    ratios, plugin, said_right, said_total, by_attr = [], [], 0, 0, {}
    for i, prompt in enumerate(prompts):
        said = vdata.parse_partial_caption(prompt)
        mine = judged[i * per_prompt : (i + 1) * per_prompt]
        said_right += sum(p[k] == v for p in mine for k, v in said.items())
        said_total += len(said) * len(mine)
        for attr in [a for a in vdata.UNSAID_ATTRS if a not in said]:
            h_data = data_entropy(said, attr, train_specs)
            if h_data == 0:
                continue
            values = [p[attr] for p in mine]
            ratios.append(entropy(values, miller_madow=True) / h_data)
            plugin.append(entropy(values) / h_data)
            by_attr.setdefault(attr, []).append(ratios[-1])
    row = {
        "unsaid_entropy_ratio": sum(ratios) / len(ratios),
        "unsaid_entropy_ratio_plugin": sum(plugin) / len(plugin),
        "said_accuracy": said_right / max(said_total, 1),
        "by_attribute": {a: round(sum(v) / len(v), 4) for a, v in by_attr.items()},
        "seconds_per_image": seconds / len(texts),
    }
    if lit is not None:
        row["pairwise"] = _pairwise(lit, codes, per_prompt)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def _pairwise(lit, codes: torch.Tensor, per_group: int) -> float:
    """Mean pairwise cosine distance (1 - cos) between the scorer embeddings of each group's images."""
    with torch.no_grad():
        emb = lit.embed_codes(codes).reshape(-1, per_group, lit.config.embed_dim)  # (G, n, D)
        sim = emb @ emb.transpose(1, 2)  # (G, n, n)
    off = ~torch.eye(per_group, dtype=torch.bool)
    return (1 - sim[:, off]).mean().item()


def eval_diversity(
    ckpt: str,
    scorer: str | None = None,
    cfg_scales: list[float] | None = None,
    temperatures: list[float] | None = None,
    reranks: list[int] | None = None,
    per_prompt: int = 32,
    seed: int = 0,
    device: str = "cpu",
    prompts: list[str] | None = None,
    **sampling,
) -> dict:
    """Diversity on shapes prompts that leave attributes unsaid: for each setting (CFG x temperature x rerank),
    the entropy of each unsaid attribute over per_prompt judged samples (Miller-Madow corrected; the plug-in
    value beside it) over its entropy in the training data given what is said (1 = as varied as the data),
    the accuracy of the said attributes, and with a LiT scorer the mean pairwise distance of a prompt's samples
    in its space (beside that of true images of the prompt). The top level is the checkpoint's defaults."""
    import random

    from . import data as vdata
    from .metrics import load_judge
    from .pipeline import TextToImage

    pipe = TextToImage.from_pretrained(ckpt, device=device)
    lit = _scorer(pipe, scorer)
    lit = None if lit == "self" else lit
    judge = load_judge(pipe.image_tokenizer.image_size, device=device)
    prompts = list(prompts or DIVERSITY_PROMPTS)
    held = set(vdata.held_out_specs())
    train_specs = [s for s in vdata.all_specs() if s not in held]
    default_cfg, default_t = pipe.sampling.cfg_scale, pipe.sampling.temperature
    settings = []
    for scale in cfg_scales or [default_cfg]:
        for temp in temperatures or [default_t]:
            for n in reranks or [1]:
                kw = {**sampling, "cfg_scale": scale, "temperature": temp}
                rer = {"rerank": n, "scorer": (lit or "self") if n > 1 else None}
                row = _diversity_row(pipe, judge, lit, prompts, per_prompt, seed, train_specs, **rer, **kw)
                settings.append({"cfg": scale, "temperature": temp, "rerank": n, **row})
    result = {
        "settings": settings,
        "prompts": prompts,
        "per_prompt": per_prompt,
        "scorer": _scorer_name(lit) if lit is not None else None,
        "rerank_scorer": _scorer_name(lit or "self"),
    }
    default = [r for r in settings if r["cfg"] == default_cfg and r["temperature"] == default_t]
    base = next((r for r in default if r["rerank"] == 1), (default or settings)[0])
    result["unsaid_entropy_ratio"] = base["unsaid_entropy_ratio"]
    result["pairwise"] = base.get("pairwise")
    result["default"] = {"cfg": base["cfg"], "temperature": base["temperature"], "rerank": base["rerank"]}
    if lit is not None:  # the same distance among true images of each prompt, drawn from the training combinations
        rng = random.Random(seed)
        size = pipe.image_tokenizer.image_size
        true = []
        for prompt in prompts:
            said = vdata.parse_partial_caption(prompt)
            fits = [s for s in train_specs if all(getattr(s, k) == v for k, v in said.items())]
            true += [
                vdata.square_tensor(vdata.render_shape(rng.choice(fits), size, rng), size) for _ in range(per_prompt)
            ]
        result["pairwise_data"] = round(_pairwise(lit, _encode(pipe.image_tokenizer, torch.stack(true)), per_prompt), 4)
    return result


def _common_args(p, what: str):
    p.add_argument("--ckpt", required=True, help=f"the {what} directory, or a hub repo owner/name")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when torch sees one, else cpu")
    p.add_argument("--batch-size", type=int, default=128, help="images encoded, sampled or decoded at once")
    p.add_argument(
        "--record", action="store_true", help="also keep the figures in --ckpt's config.json and model card (README.md)"
    )
    add_debug_flag(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser(
        "tokenizer", help="PSNR, SSIM, code usage and perplexity on held-out images", formatter_class=HelpFormatter
    )
    _common_args(t, "ImageTokenizer")
    t.add_argument("--data", default="openmoji", help="the images: a --data spec as in train.py")
    t.add_argument("--split", default="test", choices=["train", "test"], help="the split to reconstruct")
    t.add_argument("--limit", type=int, default=None, help="at most this many images (default: all)")
    t.add_argument("--image-column", default="image", help="a hub dataset's image column")
    t.add_argument("--caption-column", default="text", help="a hub dataset's caption column")
    a = sub.add_parser(
        "adherence",
        help="per-attribute accuracy on held-out and seen shapes combinations",
        formatter_class=HelpFormatter,
    )
    _common_args(a, "TextToImage (trained on shapes)")
    a.add_argument(
        "--cfg", "--cfg-scale", dest="cfg", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales to score"
    )
    a.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i")
    a.add_argument("--grid", default=None, help="write a PNG of samples per CFG scale here (default: none)")
    a.add_argument("--include", default=None, metavar="REGEX", help="score only captions matching REGEX (default: all)")
    a.add_argument("--exclude", default=None, metavar="REGEX", help="leave out captions matching REGEX (default: none)")
    a.add_argument("--repeat", type=int, default=1, help="images per combination")
    add_rerank_flags(a)
    add_sampling_flags(a, cfg_flag=False)
    r = sub.add_parser(
        "recall",
        help="fraction of fixed training captions whose sample's nearest image is theirs",
        formatter_class=HelpFormatter,
    )
    _common_args(r, "TextToImage")
    r.add_argument("--data", default=None, help="default: the data the model was trained on (else openmoji)")
    r.add_argument("--n", type=int, default=16, help="training captions sampled")
    r.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i")
    r.add_argument("--grid", default=None, help="write a PNG of samples and their nearest images here (default: none)")
    add_sampling_flags(r)
    add_rerank_flags(r)
    al = sub.add_parser(
        "alignment",
        help="LiT scorer agreement of samples and true held-out images, retrieval",
        formatter_class=HelpFormatter,
    )
    _common_args(al, "TextToImage")
    al.add_argument("--scorer", required=True, metavar="DIR", help="an ImageTextScorer (`train.py lit --out DIR`)")
    al.add_argument("--data", default=None, help="default: the data the model was trained on (else openmoji)")
    al.add_argument("--n", type=int, default=512, help="held-out images (spread over the test split)")
    al.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i")
    al.add_argument("--rerank", type=int, default=1, help="score the best of N samples per caption")
    add_sampling_flags(al)
    dv = sub.add_parser(
        "diversity", help="variety of the unsaid attributes of partial shapes prompts", formatter_class=HelpFormatter
    )
    _common_args(dv, "TextToImage (trained on shapes)")
    dv.add_argument(
        "--scorer",
        default=None,
        metavar="DIR",
        help="a LiT scorer: pairwise distances in its space, and the reranking scorer (default: none)",
    )
    dv.add_argument(
        "--cfg",
        "--cfg-scale",
        dest="cfg",
        type=float,
        nargs="+",
        default=None,
        help="guidance scales (default: the checkpoint's)",
    )
    dv.add_argument("--temperatures", type=float, nargs="+", default=None, help="default: the checkpoint's")
    dv.add_argument("--rerank", type=int, nargs="+", default=[1], help="candidates per image, e.g. 1 8")
    dv.add_argument("--per-prompt", type=int, default=32, help="samples of each prompt")
    dv.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i")
    add_sampling_flags(dv, cfg_flag=False)
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
        return eval_tokenizer(
            args.ckpt,
            args.data,
            args.split,
            args.limit,
            device,
            args.batch_size,
            image_column=args.image_column,
            caption_column=args.caption_column,
        )
    # adherence and diversity score several --cfg scales; recall and alignment take one, an override as --top-k
    sampling = sampling_overrides(args, cfg_flag=args.what in ("recall", "alignment"))
    if args.what == "adherence":
        return eval_adherence(
            args.ckpt,
            args.cfg,
            args.seed,
            device,
            args.grid,
            args.include,
            args.exclude,
            args.repeat,
            args.rerank,
            args.scorer,
            args.batch_size,
            **sampling,
        )
    if args.what == "alignment":
        return eval_alignment(args.ckpt, args.scorer, args.data, args.n, args.seed, device, args.rerank, **sampling)
    if args.what == "diversity":
        temps = args.temperatures or ([sampling.pop("temperature")] if "temperature" in sampling else None)
        return eval_diversity(
            args.ckpt, args.scorer, args.cfg, temps, args.rerank, args.per_prompt, args.seed, device, **sampling
        )
    return eval_recall(
        args.ckpt,
        args.data,
        args.n,
        args.seed,
        device,
        args.grid,
        args.rerank,
        args.scorer,
        args.batch_size,
        **sampling,
    )


if __name__ == "__main__":
    main()
