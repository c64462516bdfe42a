"""Evaluate trained models; each command prints one JSON object as the last line of stdout.

    python -m vqgpt.eval tokenizer --ckpt runs/tok --data openmoji        # psnr, ssim, usage, perplexity
    python -m vqgpt.eval adherence --ckpt runs/shapes-t2i --cfg 1 1.5 3    # per-attribute accuracy on shapes
    python -m vqgpt.eval recall --ckpt runs/t2i --data openmoji            # do samples show their prompt
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _device(name: str) -> str:
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
    args = p.parse_args(argv)

    if args.what == "tokenizer":
        result = eval_tokenizer(args.ckpt, args.data, args.split, args.limit, _device(args.device),
                                image_column=args.image_column, caption_column=args.caption_column)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
