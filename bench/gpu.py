"""The GPU script of record: one run on one H100 or H200 gives every GPU figure vqgpt reports.

    python bench/gpu.py                     # a CUDA GPU, cold compile cache: ends within about 8 minutes
    python bench/gpu.py --only tests train  # some of the steps
    python bench/gpu.py --dry-run           # the same code paths at toy sizes on a CPU (tests/test_bench_gpu.py)

A GPU machine that lacks packages gets them from `bash ../shared/device/wheels.sh` (run on the CPU machine,
then install the carried .whl/ as that script says). Steps, each a subprocess with its own time limit:
1. versions: GPU, driver, CUDA, torch, Triton, Python;
2. tests: the tests that run natively on a GPU (kernels in bf16 included, CUDA-graph capture, no host sync);
3. kernels: bench/triton_kernels.py at the config of record (decode, prefill, sampler against PyTorch peers);
4. sample: bench/sample.py at the config of record (GPT-L, 16384 codes, bf16, CUDA graph on) against HF eager,
   HF static cache + compile and the bandwidth floor;
5. decoder: the image decoder in bf16 against fp32 (PSNR; of an untrained f16-vq tokenizer unless --tokenizer);
6. train: 200 bf16 steps of preset B on generated data (shapes, an untrained f16-vq tokenizer): tokens/s and
   model FLOPs utilisation (PaLM's 6N + 12 L d T per token over the GPU's dense bf16 peak).
It prints a markdown table for docs/BENCHMARKS.md and, last, one JSON line (also in --out/gpu.json).
"""

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("versions", "tests", "kernels", "sample", "decoder", "train")
# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM parts, no sparsity) for the MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
GPU_TESTS = ["tests/test_kernels.py", "tests/test_inference_dtype.py"]  # the tests with GPU-only cases

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--dry-run", action="store_true", help="toy sizes on a CPU: checks the script, measures nothing")
parser.add_argument("--only", nargs="+", choices=STEPS, default=None, help="run only these steps")
parser.add_argument("--out", default="runs/gpu", help="directory for the steps' JSON files and the run")
parser.add_argument("--tokenizer", default=None, help="a trained image tokenizer for the decoder step")
parser.add_argument("--budget", type=float, default=480, help="seconds; steps that would start later are skipped")
args = parser.parse_args()

dry = args.dry_run
if not dry and not torch.cuda.is_available():
    sys.exit("error: bench/gpu.py needs a CUDA GPU (or --dry-run for the CPU check of the script)")
out_dir = Path(args.out)
out_dir.mkdir(parents=True, exist_ok=True)
steps = args.only or list(STEPS)
env = dict(os.environ, PYTHONUNBUFFERED="1")
if dry:
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
t_start = time.time()


def run(cmd: list[str], timeout: float) -> dict:
    """Run a command from the repo root; its exit status, seconds, last JSON line and the tail of its output."""
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, text, rc = proc.stdout, proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        partial = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        stdout, text, rc = "", "".join(partial) + f"\n[timed out after {timeout:.0f} s]", None
    last_json = None
    for line in stdout.splitlines()[::-1]:
        if line.startswith("{"):
            try:
                last_json = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    return {
        "ok": rc == 0,
        "rc": rc,
        "seconds": round(time.time() - t0, 1),
        "json": last_json,
        "tail": text[-3000:],
        "cmd": " ".join(cmd),
    }


def versions() -> dict:
    sys.path.insert(0, str(ROOT))
    from vqgpt.kernels.selfcheck import driver_version

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "triton": triton_version,
        "driver": driver_version(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(
            gpu=torch.cuda.get_device_name(),
            capability=f"sm_{major}{minor}",
            gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return {"ok": True, "json": info, "seconds": 0.0}


def tests() -> dict:
    select = ["tests/test_inference_dtype.py::test_resolve_dtype"] if dry else GPU_TESTS
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select], timeout=60 if dry else 240)
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s", r["tail"], re.M)
    r["json"] = {"summary": summary[-1] if summary else None}
    return r


def kernels() -> dict:
    cmd = [sys.executable, "bench/triton_kernels.py", "--json", str(out_dir / "kernels.json")]
    if dry:
        cmd += [
            "--device",
            "cpu",
            "--rows",
            "2",
            "--reps",
            "1",
            "--inner",
            "1",
            "--layers",
            "1",
            "--vocab",
            "256",
            "--top-k",
            "16",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--text-len",
            "8",
            "--image-len",
            "16",
        ]
    return run(cmd, timeout=60 if dry else 150)


def sample() -> dict:
    cmd = [sys.executable, "bench/sample.py", "--json", str(out_dir / "sample.json")]
    if dry:
        cmd += [
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--codebook",
            "64",
            "--text-len",
            "8",
            "--grid",
            "4",
            "4",
            "--top-k",
            "8",
            "--batches",
            "1",
            "--warmup",
            "0",
            "--reps",
            "1",
            "--plain-only",
        ]
    return run(cmd, timeout=90 if dry else 240)


def _tokenizer(preset: str):
    from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

    if args.tokenizer:
        return ImageTokenizer.from_pretrained(args.tokenizer), "trained: " + args.tokenizer
    torch.manual_seed(0)
    return ImageTokenizer(tokenizer_config(preset)), f"untrained {preset}"


def decoder() -> dict:
    """PSNR of the bf16 decode against the fp32 decode of the same random codes: is bf16 accurate enough?"""
    t0 = time.time()
    device = "cpu" if dry else "cuda"
    tok, which = _tokenizer("tiny" if dry else "f16-vq")
    tok = tok.to(device).eval()
    g = tok.grid_size
    codes = torch.randint(0, tok.codebook_size, (2 if dry else 16, g, g), generator=torch.Generator().manual_seed(0))
    ref = tok.decode(codes)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        low = tok.decode(codes).float()
    mse = (low - ref).pow(2).mean().item()
    psnr = 10 * math.log10(1.0 / max(mse, 1e-20))
    return {
        "ok": True,
        "seconds": round(time.time() - t0, 1),
        "json": {"tokenizer": which, "psnr_bf16_vs_fp32_db": round(psnr, 2), "images": len(codes)},
    }


def train() -> dict:
    tok, which = _tokenizer("tiny" if dry else "f16-vq")
    tok_dir = out_dir / "train-tokenizer"
    tok.save_pretrained(tok_dir)
    preset, steps, batch = ("tiny", 2, 4) if dry else ("B", 200, 64)
    cmd = [
        sys.executable,
        "train.py",
        "gpt",
        "--data",
        "shapes",
        "--tokenizer",
        str(tok_dir),
        "--preset",
        preset,
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--limit",
        "16" if dry else "4096",
        "--precision",
        "fp32" if dry else "bf16",
        "--device",
        "cpu" if dry else "cuda",
        "--out",
        str(out_dir / "train"),
        "--overwrite",
        "--wandb",
        "disabled",
        "--save-every",
        "100000",
        "--eval-every",
        "100000",
        "--log-every",
        "50",
        "--text-len",
        "16" if dry else "64",
    ]
    r = run(cmd, timeout=120 if dry else 300)
    cost = re.findall(r"^cost: (\{.*\})$", r["tail"], re.M)
    if not r["ok"] or not cost:
        r["ok"] = False
        return r
    cost = json.loads(cost[-1])
    gpt_config = json.loads((out_dir / "train" / "config.json").read_text())["gpt"]
    grid = gpt_config["image_grid"]
    T = gpt_config["text_len"] + 1 + grid[0] * grid[1]  # the tokens of one training row
    tokens_per_s = batch * T / (cost["step_ms"] / 1e3)
    flops_per_token = 6 * cost["total_params"] + 12 * gpt_config["n_layer"] * gpt_config["dim"] * T
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    r["json"] = {
        **cost,
        "preset": preset,
        "steps": steps,
        "batch": batch,
        "seq_len": T,
        "tokenizer": which,
        "tokens_per_s": round(tokens_per_s),
        "mfu": round(tokens_per_s * flops_per_token / peak, 3) if peak and not dry else None,
    }
    return r


def headline(name: str, r: dict) -> str:
    j = r.get("json") or {}
    if name == "versions":
        return ", ".join(f"{k} {v}" for k, v in j.items() if v is not None)
    if name == "tests":
        return j.get("summary") or ""
    if name in ("kernels", "sample"):
        ratios = j.get("ratios") or {}
        return "; ".join(f"{k} {v}" for k, v in list(ratios.items())[:6]) + (" ..." if len(ratios) > 6 else "")
    if name == "decoder":
        return f"{j.get('psnr_bf16_vs_fp32_db')} dB ({j.get('tokenizer')})"
    if name == "train":
        return (
            f"{j.get('tokens_per_s')} tokens/s, MFU {j.get('mfu')}, {j.get('step_ms')} ms/step, "
            f"preset {j.get('preset')}"
        )
    return ""


RUNNERS = {
    "versions": versions,
    "tests": tests,
    "kernels": kernels,
    "sample": sample,
    "decoder": decoder,
    "train": train,
}
results = {}
for name in steps:
    if time.time() - t_start > args.budget:
        results[name] = {"ok": False, "skipped": f"over the {args.budget:.0f} s budget", "seconds": 0.0}
        continue
    print(f"[{time.time() - t_start:6.1f} s] {name} ...", flush=True)
    results[name] = RUNNERS[name]()
    if not results[name]["ok"]:
        print(results[name].get("tail", results[name].get("skipped", "")), flush=True)

print("\n| step | ok | s | result |\n| --- | --- | --- | --- |")
for name, r in results.items():
    print(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r['seconds']} | {headline(name, r) or r.get('skipped', '')} |")
summary = {
    "dry_run": dry,
    "seconds": round(time.time() - t_start, 1),
    "ok": all(r["ok"] for r in results.values()),
    "steps": {n: {k: v for k, v in r.items() if k != "tail"} for n, r in results.items()},
}
(out_dir / "gpu.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary))
sys.exit(0 if summary["ok"] else 1)
