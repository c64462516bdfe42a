"""Sampling speed: vqgpt's decode loop against HF transformers `generate` on a model of the same shape.

    python bench/sample.py                          # a CUDA GPU: the config of record (GPT-L, 16384 codes, bf16)
    python bench/sample.py --device cpu             # the demo GPT on a CPU: about two minutes
    python bench/sample.py --device cpu --batches 1 --reps 3 --json /tmp/quick.json

Config of record (GPU): a LlamaGen-L-sized GPT (dim 1024, 24 layers, 16 heads), codebook 16384, 64 text
tokens, a 16x16 grid (256 image tokens), CFG scale 3 (2 rows per image), top-k 1000, bf16; 1, 8 and 32
images. CPU: the "demo" GPT preset, codebook 1000, 32 text tokens, an 8x8 grid (64 image tokens), top-k 100,
float32, 1 and 16 images, one intra-op thread (see --threads).

The peer is `LlamaForCausalLM.generate` with the same weight shapes: layers, width, heads, KV heads, SwiGLU
width, and a vocabulary equal to the image codebook, so its LM head is the same matmul as vqgpt's image head
(prompt ids are drawn below the codebook size; an embedding lookup costs the same whatever the table size).
vqgpt's weights are copied into it (HF's RoPE is 1D where vqgpt's is 2D on the image, so the logits differ,
not the work). Both run the same rows, two per image (the prompt and its null caption), the same prefix of
text_len + 1 tokens (text + BOI) and h * w new tokens: a prefill, then a KV-cache decode loop. HF samples
through a logits processor that mixes CFG on the B conditional rows, keeps the top k, draws with
torch.multinomial and gives the token to both rows of the pair (scores 0 there, -inf elsewhere, decoded
greedily), the work of vqgpt's sampler. Contenders:
- vqgpt: a plain `vqgpt.generate.generate` call, attn_backend "auto" (Triton kernels on a GPU, PyTorch on a
  CPU), and its accelerated variant: on a GPU vqgpt_graph (cuda_graph=True: one decode step captured as a
  CUDA graph in each call, then replayed), on a CPU vqgpt_compiled (compile=True: the step through
  torch.compile, compiled before timing, once per batch size);
- hf_generate: HF eager `generate` (dynamic cache, SDPA attention);
- hf_static_compile (GPU): `cache_implementation="static"`, with which `generate` compiles the decode forward
  (torch.compile, mode "reduce-overhead": CUDA graphs).
Floors, the time a decode step cannot go below:
- GPU, bandwidth_floor: (weight bytes + live K/V bytes at the mean live length) / the device-to-device copy
  bandwidth measured in this run;
- CPU, matmul_floor: the step's weight matmuls alone (every linear layer and the head on the same rows),
  timed in this run; at a few rows they stream every weight from memory.

Each contender runs whole generations (prefill + h * w tokens); after --warmup runs each they alternate
(A, B, ..., then ..., B, A) for --reps rounds so machine noise hits all of them alike, and the medians are
reported: ms per token = median seconds / (h * w) * 1e3, images/s = images / median seconds. The table goes
to stdout, then one JSON line (also written to --json) with device, versions, config, the figures and
"ratios": name -> vqgpt speed / the other's speed (above 1: vqgpt is faster; against a floor, the fraction
of the floor's speed vqgpt reaches).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Python puts this script's folder first on sys.path, and there bench/triton_kernels.py would shadow the `kernels`
# package (hub kernels) that transformers probes for and imports: drop the folder before importing it.
BENCH_DIR = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
try:
    import vqgpt
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(BENCH_DIR.parent))
    import vqgpt

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
)

from vqgpt.generate import SamplingConfig, generate  # noqa: E402
from vqgpt.model import GPT, gpt_config  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
parser.add_argument("--preset", default=None, help="GPT preset (default: L on a GPU, demo on a CPU)")
parser.add_argument("--codebook", type=int, default=None, help="image codebook size (default: 16384 / 1000)")
parser.add_argument("--text-len", type=int, default=None, help="text tokens (default: 64 / 32)")
parser.add_argument("--grid", type=int, nargs=2, default=None, help="code grid h w (default: 16 16 / 8 8)")
parser.add_argument("--top-k", type=int, default=None, help="default: 1000 / 100")
parser.add_argument("--cfg-scale", type=float, default=3.0)
parser.add_argument("--batches", type=int, nargs="+", default=None, help="images per batch (default: 1 8 32 / 1 16)")
parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bf16 / fp32")
parser.add_argument(
    "--peers",
    nargs="+",
    default=None,
    choices=["hf_generate", "hf_static_compile"],
    help="default: both on a GPU, hf_generate on a CPU",
)
parser.add_argument(
    "--plain-only",
    action="store_true",
    help="time only the plain vqgpt call (no CUDA graph on a GPU, no torch.compile on a CPU)",
)
parser.add_argument("--warmup", type=int, default=None, help="untimed runs per contender (default: 3 / 2)")
parser.add_argument("--reps", type=int, default=None, help="timed rounds, medians reported (default: 5 / 7)")
parser.add_argument(
    "--threads",
    type=int,
    default=None,
    help="CPU intra-op threads (default 1: a step of the demo model is latency-bound, and on a "
    "shared machine more threads spin-wait on each other; 0 = torch's default)",
)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--json", default=None, help="where to write the JSON (default: bench/results-<device>.json)")
args = parser.parse_args()

on_gpu = args.device == "cuda"
if on_gpu and not torch.cuda.is_available():
    sys.exit("no CUDA device: run `python bench/sample.py --device cpu` for the CPU config")
device = torch.device(args.device)
preset = args.preset or ("L" if on_gpu else "demo")
codebook = args.codebook or (16384 if on_gpu else 1000)
text_len = args.text_len or (64 if on_gpu else 32)
grid = tuple(args.grid or ((16, 16) if on_gpu else (8, 8)))
top_k = args.top_k or (1000 if on_gpu else 100)
batches = args.batches or ([1, 8, 32] if on_gpu else [1, 16])
dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
dtype = getattr(torch, dtype_name)
peers = args.peers or (["hf_generate", "hf_static_compile"] if on_gpu else ["hf_generate"])
if "hf_static_compile" in peers and not on_gpu:
    sys.exit("hf_static_compile needs a GPU: transformers compiles the static-cache forward on CUDA only")
variant = None if args.plain_only else ("graph" if on_gpu else "compiled")  # vqgpt's accelerated variant
warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 2)
reps = args.reps or (5 if on_gpu else 7)
if not on_gpu:
    threads = 1 if args.threads is None else args.threads
    if threads > 0:
        torch.set_num_threads(threads)
json_path = Path(args.json or BENCH_DIR / f"results-{args.device}.json")
torch.manual_seed(args.seed)

# ----------------------------------------------------------------------------------------------------
# The two models: vqgpt's GPT and a LlamaForCausalLM of the same shapes holding the same weights

cfg = gpt_config(preset, text_vocab_size=1024, text_len=text_len, image_vocab_size=codebook, image_grid=grid)
with device:
    model = GPT(cfg)
# The real init zeros the head (uniform logits); random weights give top-k distinct values, as after training.
torch.nn.init.normal_(model.head.weight, std=0.02)
model = model.to(dtype).eval()
N = cfg.n_image  # new tokens per image


def hf_twin(model: GPT) -> LlamaForCausalLM:
    """A LlamaForCausalLM with vqgpt's shapes (vocabulary = the image codebook) and its weights."""
    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.image_vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf_config._attn_implementation = "sdpa"
    with device:
        hf = LlamaForCausalLM(hf_config).to(dtype)
    nh, nkv, hd = c.n_head, c.n_kv_head, c.head_dim
    state = {
        "model.embed_tokens.weight": model.image_emb.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.head.weight,
    }
    for i, layer in enumerate(model.layers):
        q, k, v = layer.attn.wqkv.weight.split([nh * hd, nkv * hd, nkv * hd])
        names = {
            "self_attn.q_proj": q,
            "self_attn.k_proj": k,
            "self_attn.v_proj": v,
            "self_attn.o_proj": layer.attn.wo.weight,
            "mlp.gate_proj": layer.mlp.w1.weight,
            "mlp.up_proj": layer.mlp.w3.weight,
            "mlp.down_proj": layer.mlp.w2.weight,
            "input_layernorm": layer.attn_norm.weight,
            "post_attention_layernorm": layer.mlp_norm.weight,
        }
        state.update({f"model.layers.{i}.{name}.weight": w for name, w in names.items()})
    hf.load_state_dict(state, strict=True)  # strict: every HF weight has its vqgpt counterpart, same shape
    return hf.eval()


class CFGTopKSampler(LogitsProcessor):
    """Classifier-free guidance + top-k sampling for HF generate over 2B rows (prompts, then null captions).

    Mixes u + s * (c - u) on the B conditional rows, draws each pair's token from the top k with
    torch.multinomial and returns scores that are 0 at that token and -inf elsewhere for both rows of the
    pair, so greedy decoding emits it: both rows continue with the same token, as in vqgpt.
    """

    def __init__(self, cfg_scale: float, top_k: int):
        self.cfg_scale, self.top_k = cfg_scale, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cond, uncond = scores.float().chunk(2)
        mixed = uncond + self.cfg_scale * (cond - uncond)  # (B, V)
        vals, idx = mixed.topk(self.top_k, dim=-1)
        token = idx.gather(-1, torch.multinomial(torch.softmax(vals, dim=-1), 1))  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token.repeat(2, 1), 0.0)


hf = hf_twin(model)
sampling = SamplingConfig(cfg_scale=args.cfg_scale, top_k=top_k)
hf_processors = LogitsProcessorList([CFGTopKSampler(args.cfg_scale, top_k)])
linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def hf_generation_config(static: bool) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=N,
        do_sample=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        cache_implementation="static" if static else None,
    )


def sync() -> None:
    if on_gpu:
        torch.cuda.synchronize()


def seconds(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def matmul_floor(rows: int):
    """N decode steps' worth of weight matmuls alone: every linear layer and the head, on `rows` rows."""
    inputs = {w.shape[1]: torch.randn(rows, 1, w.shape[1], device=device, dtype=dtype) for w in linears}

    @torch.inference_mode()
    def run():
        for _ in range(N):
            for w in linears:
                F.linear(inputs[w.shape[1]], w)

    return run


def contenders(B: int) -> tuple[dict, dict]:
    """(name -> a function running one whole generation of B images (2B rows) from fixed prompts, or N
    decode steps' worth of matmuls for the floor; checks made on the outputs)."""
    g = torch.Generator().manual_seed(args.seed + B)
    text = torch.randint(1, min(cfg.text_vocab_size, codebook), (B, text_len), generator=g).to(device)
    seeds = torch.arange(B, device=device)
    boi = torch.full((B, 1), codebook - 1, device=device)  # any id: BOI is one more prefix token for HF
    hf_ids = torch.cat([torch.cat([text, boi], 1), torch.cat([torch.zeros_like(text), boi], 1)])  # (2B, T + 1)
    mask = torch.ones_like(hf_ids)
    fns = {"vqgpt": lambda: generate(model, text, sampling, seeds)}
    if variant is not None:
        option = {"graph": "cuda_graph", "compiled": "compile"}[variant]
        fns[f"vqgpt_{variant}"] = lambda: generate(model, text, sampling, seeds, **{option: True})
    for peer in peers:
        gen_cfg = hf_generation_config(static=peer == "hf_static_compile")
        fns[peer] = lambda gen_cfg=gen_cfg: hf.generate(
            hf_ids, attention_mask=mask, generation_config=gen_cfg, logits_processor=hf_processors
        )
    fns["matmul_floor"] = matmul_floor(2 * B) if not on_gpu else None
    fns = {name: fn for name, fn in fns.items() if fn is not None}
    # Same number of tokens on both sides, and HF's rows of a pair share theirs (the CFG contract).
    codes = fns["vqgpt"]()
    assert codes.shape == (B, *grid), codes.shape
    out = fns[peers[0]]()
    assert out.shape == (2 * B, text_len + 1 + N), out.shape
    assert torch.equal(out[:B, text_len + 1 :], out[B:, text_len + 1 :])
    # The variant runs the same computation, but its rounding can differ (inductor's kernels; cuBLAS may pick
    # other GEMM algorithms on the capture stream), which can flip a near-tie draw: reported, not asserted.
    checks = {}
    if variant is not None:  # compiles (CPU) here, untimed
        checks[f"{variant}_codes_equal_plain"] = torch.equal(fns[f"vqgpt_{variant}"](), codes)
    return fns, checks


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the practical HBM ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return 2 * src.numel() / statistics.median(seconds(lambda: dst.copy_(src)) for _ in range(10))


def decode_step_bytes(rows: int) -> float:
    """Bytes a decode step must read: every weight but the embedding tables (a few rows are gathered), plus
    the live K/V at the mean live length over the image (text_len + 1 + N / 2 positions)."""
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "emb" not in name)
    live = cfg.image_start + N / 2
    kv = 2 * cfg.n_layer * rows * cfg.n_kv_head * live * cfg.head_dim * dtype.itemsize
    return weights + kv


# ----------------------------------------------------------------------------------------------------
# Timing: warm-up, then interleaved rounds, medians

bandwidth = copy_bandwidth() if on_gpu else None
results, ratios = [], {}
for B in batches:
    fns, checks = contenders(B)
    times = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for r in range(reps):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:  # alternate who goes first
            times[name].append(seconds(fns[name]))
    ms = {name: statistics.median(ts) / N * 1e3 for name, ts in times.items()}  # per token
    row = {"images": B, "rows": 2 * B, "new_tokens": N, **checks}
    for name, ts in times.items():
        row[name] = {"ms_per_token": round(ms[name], 3), "samples_s": [round(t, 4) for t in ts]}
        if name != "matmul_floor":
            row[name]["images_per_s"] = round(B / statistics.median(ts), 3)
    if bandwidth is not None:
        ms["bandwidth_floor"] = decode_step_bytes(2 * B) / bandwidth * 1e3
        row["bandwidth_floor"] = {
            "ms_per_token": round(ms["bandwidth_floor"], 3),
            "bytes_per_step": decode_step_bytes(2 * B),
        }
    # "vs_hf_generate_b1": the plain call's speed / HF's; "graph_vs_..." / "compiled_vs_...": the variant's.
    for mine in [name for name in ms if name.startswith("vqgpt")]:
        prefix = "" if mine == "vqgpt" else mine.removeprefix("vqgpt_") + "_"
        for other in [name for name in ms if not name.startswith("vqgpt")]:
            ratios[f"{prefix}vs_{other}_b{B}"] = round(ms[other] / ms[mine], 3)
    results.append(row)

# ----------------------------------------------------------------------------------------------------
# Report

mine = ["vqgpt"] + ([f"vqgpt_{variant}"] if variant else [])
print(
    f"{'images':>6} {'rows':>5}  {'contender':<18} {'ms/token':>9} {'images/s':>9}"
    + "".join(f" {name + ' speedup':>24}" for name in mine)
)
for row in results:
    B = row["images"]
    for name in [name for name in row if isinstance(row[name], dict)]:
        speedups = [ratios.get(f"{'' if o == 'vqgpt' else o.removeprefix('vqgpt_') + '_'}vs_{name}_b{B}") for o in mine]
        print(
            f"{B:>6} {row['rows']:>5}  {name:<18} {row[name]['ms_per_token']:>9.3f} "
            f"{row[name].get('images_per_s', ''):>9}" + "".join(f" {x if x else '':>24}" for x in speedups)
        )
print(
    f"ms/token: a whole generation (prefill + {N} tokens) / {N}, or one decode step for the floors; "
    "speedup: its time / that vqgpt's time (against a floor: the fraction of the floor's speed reached)"
)

triton_version = None
try:
    import triton

    triton_version = triton.__version__
except ImportError:
    pass


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


out = {
    "bench": "sample",
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "device": torch.cuda.get_device_name(device) if on_gpu else cpu_name(),
    "cpu_count": os.cpu_count(),
    "cpu_threads": None if on_gpu else torch.get_num_threads(),
    "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine while this ran
    "versions": {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "vqgpt": vqgpt.__version__,
    },
    "config": {
        "preset": preset,
        "gpt": cfg.to_dict(),
        "params": model.num_params(),
        "dtype": dtype_name,
        "cfg_scale": args.cfg_scale,
        "top_k": top_k,
        "temperature": 1.0,
        "new_tokens": N,
        "prefix_len": cfg.image_start,
        "batches": batches,
        "peers": peers,
        "vqgpt_variant": variant,
        "warmup": warmup,
        "reps": reps,
        "hf_vocab_size": codebook,
        "hf_attn_implementation": "sdpa",
    },
    "copy_bandwidth_gbps": round(bandwidth / 1e9, 1) if bandwidth else None,
    "results": results,
    "ratios": ratios,
}
json_path.parent.mkdir(parents=True, exist_ok=True)
json_path.write_text(json.dumps(out, indent=2))
print(json.dumps(out))
