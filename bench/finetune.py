"""Fine-tuning cost: full fine-tuning against LoRA on the same model, batch and data shapes.

    python bench/finetune.py                      # GPU: GPT-B (111M), 256 image tokens, bf16 autocast
    python bench/finetune.py --device cpu         # CPU: GPT-B, 8x8 codes, a few steps (about two minutes)

Each mode runs in a fresh process (so peak memory is its own): the model is built, wrapped (LoRA: peft
adapters of --rank on every attention and MLP projection, the rest frozen), and trained for --steps AdamW
steps on random token data after one warm-up step. Reported per mode: trainable parameters, the median step
time, and peak memory: CUDA's peak allocation on a GPU; on a CPU the process's peak resident set, and
`training_mb`, its growth over the resident set once the model is built (gradients, optimizer state,
activations), measured in a second run with glibc's mmap threshold fixed (see `child`). The JSON (last line
of stdout, and --json) has "ratios": full's figure over LoRA's (above 1: LoRA is cheaper).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_mode(args) -> dict:
    from vqgpt.finetune import add_lora, trainable_summary
    from vqgpt.model import GPT, gpt_config

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = gpt_config(
        args.preset,
        text_vocab_size=1024,
        text_pad_id=0,
        text_len=args.text_len,
        image_vocab_size=args.codebook,
        image_grid=(args.grid, args.grid),
    )
    gpt = GPT(config).to(device)
    if args.mode == "lora":
        add_lora(gpt, args.rank)
    params = [p for p in gpt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    text = torch.randint(1, 1024, (args.batch_size, args.text_len), device=device)
    codes = torch.randint(0, args.codebook, (args.batch_size, args.grid * args.grid), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    built_mb = current_rss_mb()
    times = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = gpt.loss(text, codes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step allocates optimizer state and warms kernels up
            times.append(time.perf_counter() - t0)
    out = {**trainable_summary(gpt), "step_ms": round(1000 * statistics.median(times), 1)}
    if device.type == "cuda":
        out["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    else:
        out["peak_mb"] = round(rss_mb())
        out["training_mb"] = round(rss_mb() - built_mb)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="B")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on a GPU, 8 on a CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on a GPU, 3 on a CPU)")
    p.add_argument("--grid", type=int, default=None, help="code grid side (default: 16 on a GPU, 8 on a CPU)")
    p.add_argument("--codebook", type=int, default=None, help="default: 16384 on a GPU, 1000 on a CPU")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--mode", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)  # one child run
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    for name, on_gpu, on_cpu in (("batch_size", 32, 8), ("steps", 20, 3), ("grid", 16, 8), ("codebook", 16384, 1000)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return

    def child(mode: str, env: dict) -> dict:
        flags = [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("device", "preset", "rank", "batch_size", "steps", "grid", "codebook", "text_len")
        ]
        proc = subprocess.run(
            [sys.executable, __file__, *flags, f"--mode={mode}"],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        if proc.returncode:
            sys.exit(f"the {mode} run failed:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results = {}
    for mode in ("full", "lora"):
        results[mode] = child(mode, {})
        if not gpu:
            # glibc raises its mmap threshold as large blocks are freed, after which freed activations stay in
            # the heap and the peak resident set depends on allocation order more than on live tensors. A
            # second run with a fixed threshold measures memory; the first (default allocator) gives the time.
            memory = child(mode, {"MALLOC_MMAP_THRESHOLD_": "65536"})
            results[mode].update(peak_mb=memory["peak_mb"], training_mb=memory["training_mb"])
    full, lora = results["full"], results["lora"]
    print(f"{'mode':6} {'trainable':>14} {'step ms':>10} {'peak MB':>10}" + ("" if gpu else f" {'training MB':>12}"))
    for mode, r in results.items():
        print(
            f"{mode:6} {r['trainable_params']:>14,} {r['step_ms']:>10.1f} {r['peak_mb']:>10,}"
            + ("" if gpu else f" {r['training_mb']:>12,}")
        )
    ratios = {
        "full_over_lora_step_time": round(full["step_ms"] / lora["step_ms"], 2),
        "full_over_lora_peak_memory": round(full["peak_mb"] / lora["peak_mb"], 2),
        "full_over_lora_trainable_params": round(full["trainable_params"] / lora["trainable_params"], 1),
    }
    if not gpu:
        ratios["full_over_lora_training_memory"] = round(full["training_mb"] / max(lora["training_mb"], 1), 2)
    device = torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()
    import peft

    report = {
        "bench": "finetune",
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version()},
        "config": {
            k: getattr(args, k)
            for k in ("preset", "rank", "batch_size", "steps", "grid", "codebook", "text_len", "device")
        },
        "results": results,
        "ratios": ratios,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
