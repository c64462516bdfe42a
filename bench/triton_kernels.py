"""Kernel speed against PyTorch peers timed in the same process, at the config of record.

    python bench/triton_kernels.py                         # a CUDA GPU: Triton kernels vs SDPA / torch sampling
    python bench/triton_kernels.py --device cpu            # the CPU fallbacks (the references) vs the same peers, small
    python bench/triton_kernels.py --rows 2 16 --reps 20   # a subset

Config of record: model dim 1024 = 16 heads x head_dim 64, codebook 16384, 64 text + 256 image tokens
(S_max = 320), top-k 1000, CFG scale 3; 1, 8 and 32 images per batch = 2, 16 and 64 rows with CFG.
- decode: one step of decode attention per layer over a static bf16 cache with `--live` live positions,
  against SDPA over the whole static cache with a length mask (what a static-cache model runs) and SDPA
  over the live slice (only possible when every row has the same length). The caches of `--layers` layers
  are cycled, as in a real step, so the working set is far larger than L2 and the GB/s are HBM figures;
  they count the live K/V bytes and are compared with the device-to-device copy bandwidth measured here.
- prefill: causal attention over the 320-token prompt + image, against SDPA (is_causal).
- sample: the fused CFG + top-k + draw kernel against torch: CFG mix, /T, topk, mask, softmax, multinomial.
Times are CUDA-event medians over --reps samples of --inner back-to-back calls, after warm-up.

The table goes to stdout, then one JSON line (also written to --json) with device, versions, config,
every timing, and "ratios": name -> peer time / vqgpt time (above 1: vqgpt is faster).
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # kernels/ installs as vqgpt.kernels (`pip install -e .`); there is no top-level `kernels` to fall back to
    from vqgpt import kernels
except ImportError as err:
    sys.exit(f"bench/triton_kernels.py needs vqgpt.kernels ({err}): pip install -e . in this checkout")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
parser.add_argument("--rows", type=int, nargs="+", default=None, help="batch rows (2 per image with CFG)")
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--text-len", type=int, default=64)
parser.add_argument("--image-len", type=int, default=256)
parser.add_argument("--live", type=int, default=None, help="live cache positions in decode (default: mid-image)")
parser.add_argument("--layers", type=int, default=None, help="layers of KV cache cycled per decode step")
parser.add_argument("--vocab", type=int, default=16384)
parser.add_argument("--top-k", type=int, default=1000)
parser.add_argument("--cfg-scale", type=float, default=3.0)
parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bf16 on a GPU")
parser.add_argument("--reps", type=int, default=None, help="timed samples (median reported)")
parser.add_argument("--inner", type=int, default=None, help="calls per timed sample")
parser.add_argument("--json", default="runs/bench/kernels.json", help="where to write the JSON result")
args = parser.parse_args()

on_gpu = args.device == "cuda"
if on_gpu and not torch.cuda.is_available():
    reason = "no CUDA device: the Triton kernels need a GPU (run with --device cpu to time the CPU fallbacks)"
    print(f"SKIP bench/triton_kernels.py: {reason}")
    print(json.dumps({"skipped": reason, "ratios": {}}))
    sys.exit(0)
if on_gpu and not kernels.HAS_TRITON:
    reason = "triton is not installed: the kernels would run their references"
    print(f"SKIP bench/triton_kernels.py: {reason}")
    print(json.dumps({"skipped": reason, "ratios": {}}))
    sys.exit(0)

device = torch.device(args.device)
dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
dtype = getattr(torch, dtype_name)
rows_list = args.rows or ([2, 16, 64] if on_gpu else [2])
s_max = args.text_len + args.image_len
live = args.live or args.text_len + args.image_len // 2
layers = args.layers or (24 if on_gpu else 2)
reps = args.reps or (30 if on_gpu else 5)
inner = args.inner or (5 if on_gpu else 1)
vocab = args.vocab if on_gpu else min(args.vocab, 4096)
backend = "triton" if on_gpu else "torch"  # on a CPU "auto" is the reference: time what users get
H, D = args.heads, args.head_dim


def timed(fn, warmup: int = 3) -> float:
    """Median seconds per call of fn (CUDA events on a GPU, perf_counter on a CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    if on_gpu:
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the practical HBM ceiling."""
    n = (1 << 30) if on_gpu else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src))
    return 2 * n / seconds


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


results, ratios = [], {}


def record(name: str, rows: int, ours: float, peers: dict, **extra) -> None:
    for peer, t in peers.items():
        ratios[f"{name}_rows{rows}_vs_{peer}"] = round(t / ours, 3)
    results.append(
        dict(
            name=name,
            rows=rows,
            vqgpt_us=round(ours * 1e6, 2),
            peers_us={p: round(t * 1e6, 2) for p, t in peers.items()},
            **extra,
        )
    )


def bench_decode(rows: int, bw: float) -> None:
    q = torch.randn(rows, H, D, device=device, dtype=dtype)
    caches = [
        (
            torch.randn(rows, H, s_max, D, device=device, dtype=dtype),
            torch.randn(rows, H, s_max, D, device=device, dtype=dtype),
        )
        for _ in range(layers)
    ]
    cache_len = torch.full((rows,), live, device=device)
    mask = (torch.arange(s_max, device=device) < cache_len[:, None])[:, None, None, :]  # (B, 1, 1, S_max)
    q4 = q[:, :, None]  # (B, H, 1, D)

    def ours():
        for k, v in caches:
            kernels.decode_attention(q, k, v, cache_len, backend=backend)

    def sdpa_static_cache():
        for k, v in caches:
            F.scaled_dot_product_attention(q4, k, v, attn_mask=mask)

    def sdpa_live_slice():
        for k, v in caches:
            F.scaled_dot_product_attention(q4, k[:, :, :live], v[:, :, :live])

    k, v = caches[0]
    err = max_err(
        kernels.decode_attention(q, k, v, cache_len, backend=backend),
        F.scaled_dot_product_attention(q4, k[:, :, :live], v[:, :, :live])[:, :, 0],
    )
    t_ours = timed(ours) / layers
    peers = {"sdpa_static_cache": timed(sdpa_static_cache) / layers, "sdpa_live_slice": timed(sdpa_live_slice) / layers}
    live_bytes = 2 * rows * H * live * D * q.element_size()
    record(
        "decode",
        rows,
        t_ours,
        peers,
        live=live,
        s_max=s_max,
        max_abs_err=err,
        vqgpt_gbps=round(live_bytes / t_ours / 1e9, 1),
        frac_of_copy_bw=round(live_bytes / t_ours / bw, 3) if on_gpu else None,
    )


def bench_prefill(rows: int) -> None:
    q, k, v = (torch.randn(rows, H, s_max, D, device=device, dtype=dtype) for _ in range(3))
    err = max_err(
        kernels.attention(q, k, v, causal=True, backend=backend),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
    )
    t_ours = timed(lambda: kernels.attention(q, k, v, causal=True, backend=backend))
    t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    flops = 4 * rows * H * D * s_max * (s_max + 1) / 2  # QK^T and PV over the causal triangle
    record("prefill", rows, t_ours, {"sdpa": t_sdpa}, max_abs_err=err, vqgpt_tflops=round(flops / t_ours / 1e12, 2))


def torch_sample(logits: torch.Tensor, cfg_scale: float, temperature: float, top_k: int) -> torch.Tensor:
    """The usual PyTorch sampler (gpt-fast / LlamaGen style), the peer of cfg_sample."""
    cond, uncond = logits.float().chunk(2)
    z = (uncond + cfg_scale * (cond - uncond)) / temperature
    kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
    z = z.masked_fill(z < kth, float("-inf"))
    return torch.multinomial(torch.softmax(z, dim=-1), 1).squeeze(-1)


def bench_sample(rows: int) -> None:
    logits = torch.randn(2 * rows, vocab, device=device).mul(3).to(dtype)
    seeds = torch.arange(rows, device=device)
    step = torch.tensor(0, device=device)
    kw = dict(cfg_scale=args.cfg_scale, temperature=1.0, top_k=args.top_k, seeds=seeds, step=step, backend=backend)
    t_ours = timed(lambda: kernels.cfg_sample(logits, **kw))
    t_top_p = timed(lambda: kernels.cfg_sample(logits, top_p=0.95, **kw))
    t_torch = timed(lambda: torch_sample(logits, args.cfg_scale, 1.0, args.top_k))
    record(
        "sample",
        rows,
        t_ours,
        {"torch_topk_multinomial": t_torch},
        vocab=vocab,
        vqgpt_with_top_p_0_95_us=round(t_top_p * 1e6, 2),
    )


torch.manual_seed(0)
bw = copy_bandwidth()
for rows in rows_list:
    bench_decode(rows, bw)
    bench_prefill(rows)
    bench_sample(rows)

NOTES = ("vqgpt_gbps", "frac_of_copy_bw", "vqgpt_tflops", "vqgpt_with_top_p_0_95_us", "max_abs_err")
print(f"{'kernel':<8} {'rows':>4} {'vqgpt us':>10}  {'peer':<24} {'peer us':>10} {'ratio':>7}  notes")
for r in results:
    notes = ", ".join(f"{key}={r[key]}" for key in NOTES if r.get(key) is not None)
    for i, (peer, peer_us) in enumerate(r["peers_us"].items()):
        ratio = ratios[f"{r['name']}_rows{r['rows']}_vs_{peer}"]
        head = f"{r['name']:<8} {r['rows']:>4} {r['vqgpt_us']:>10}" if i == 0 else " " * 24
        print(f"{head}  {peer:<24} {peer_us:>10} {ratio:>7.2f}  {notes if i == 0 else ''}")
print(f"copy bandwidth {bw / 1e9:.0f} GB/s; ratio = peer time / vqgpt time (above 1: vqgpt is faster)")

triton_version = None
if kernels.HAS_TRITON:
    import triton

    triton_version = triton.__version__
out = {
    "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
    "versions": {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    },
    "config": {
        "dim": H * D,
        "n_head": H,
        "head_dim": D,
        "text_len": args.text_len,
        "image_len": args.image_len,
        "s_max": s_max,
        "live": live,
        "layers_cycled": layers,
        "vocab": vocab,
        "top_k": args.top_k,
        "cfg_scale": args.cfg_scale,
        "dtype": dtype_name,
        "rows": rows_list,
        "backend": backend,
        "reps": reps,
        "inner": inner,
    },
    "copy_bandwidth_gbps": round(bw / 1e9, 1),
    "results": results,
    "ratios": ratios,
    "geomean_ratio": round(math.exp(statistics.fmean(math.log(x) for x in ratios.values())), 3),
}
Path(args.json).parent.mkdir(parents=True, exist_ok=True)
Path(args.json).write_text(json.dumps(out, indent=2))
print(json.dumps(out))
