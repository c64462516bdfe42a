"""Speed levers of the demo's training steps, as A/B ratios measured in one process.

    OMP_NUM_THREADS=2 python bench/demo_levers.py                       # both stages, 2 threads, fp32
    python bench/demo_levers.py --stage gpt --rounds 5 --steps 10 --threads 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/demo_levers.py
    OMP_NUM_THREADS=1 python bench/demo_levers.py --threads 1 --steps 3 --rounds 6   # a CPU shared with other jobs

The demo's own shapes: the GPT `demo` preset (dim 192, 4 layers, a 1,000-code codebook, 8x8 codes, text vocab
1,024, --text-len tokens of text) at batch 32, the tokenizer `demo` preset (64 px) at batch 32, random batches
(the step's cost does not depend on the values). Each variant gets its own model, built from the same seed; the
variants then take turns, --steps steps each per round for --rounds rounds after one warm-up round, so that load
from other processes on a shared machine falls on all of them alike. Reported per variant: the median ms a step
over the rounds and its ratio to the baseline's (the same round's), and whether two replicas of the variant, run 4
steps from the same weights and batches, end bit-for-bit equal (a lever must keep a seeded run reproducible).
A step is what `vqgpt.training.fit` does: zero_grad, loss, backward, clip_grad_norm_, the guard's host sync,
AdamW. Also timed: the GPT stage's in-training evaluation (held-out bits on 108 drawings and the two 8 x 4 sample
grids), which the demo runs 7 times, and torch.compile's compile time where it is a variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_optimizer(model, impl: str):
    """vqgpt.training.make_optimizer's AdamW (the same groups and betas), with its implementation picked."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kw = {"loop": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), **kw)


class Runner:
    """One variant: its model, optimizer and step function."""

    def __init__(self, name, model, loss_fn, opt_impl, clip_foreach=None):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.opt = make_optimizer(model, opt_impl)
        self.clip_foreach = clip_foreach

    def step(self, batch):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(*batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=self.clip_foreach)
        bool((torch.isfinite(loss.detach()) & torch.isfinite(norm)).item())  # NonFiniteGuard's sync
        self.opt.step()


def gpt_variants(args):
    from vqgpt.model import GPT, gpt_config

    def build(text_len):
        torch.manual_seed(0)
        cfg = gpt_config("demo", text_vocab_size=1024, text_len=text_len, image_vocab_size=1000, image_grid=(8, 8))
        model = GPT(cfg).train()
        return model, lambda t, c: model.loss(t, c)[0]

    def batch(text_len, g):
        return (torch.randint(1, 1024, (32, text_len), generator=g), torch.randint(0, 1000, (32, 64), generator=g))

    out = {}
    for name, opt, text_len, clip in (
        ("baseline (AdamW for-loop)", "loop", args.text_len, None),
        ("AdamW foreach", "foreach", args.text_len, None),
        ("AdamW fused", "fused", args.text_len, None),
        ("AdamW fused + foreach clip", "fused", args.text_len, True),
        (f"text_len {args.short_text_len} (fused)", "fused", args.short_text_len, True),
    ):
        out[name] = (lambda o=opt, t=text_len, c=clip, n=name: Runner(n, *build(t), o, c), text_len)
    if args.compile:

        def compiled():
            model, loss_fn = build(args.text_len)
            return Runner("torch.compile (fused)", model, torch.compile(loss_fn), "fused", True)

        out["torch.compile (fused)"] = (compiled, args.text_len)
    return out, batch


def tokenizer_variants(args):
    from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

    def build(layout):
        """layout "before": ImageTokenizer.forward as it was (contiguous activations); "forward": as it is (on a
        CPU it turns the images channels-last); "weights too": the weights channels-last as well."""
        torch.manual_seed(0)
        model = ImageTokenizer(tokenizer_config("demo")).train()
        if layout == "weights too":
            model = model.to(memory_format=torch.channels_last)

        def loss_fn(x):
            if layout == "before":
                zq, _, aux = model.quantize(x)
                recon = (model.decoder(zq) + 1) / 2
            else:
                recon, _, aux = model(x)
            recon = recon.float()
            return F.l1_loss(recon, x) + F.mse_loss(recon, x) + aux

        return model, loss_fn

    def batch(_, g):
        return (torch.rand(32, 3, 64, 64, generator=g),)

    out = {}
    for name, opt, cl, clip in (
        ("baseline (AdamW for-loop)", "loop", "before", None),
        ("AdamW fused + foreach clip", "fused", "before", True),
        ("channels-last activations (forward)", "loop", "forward", None),
        ("channels-last activations + AdamW fused + foreach clip", "fused", "forward", True),
        ("channels-last weights too + AdamW fused + foreach clip", "fused", "weights too", True),
    ):
        out[name] = (lambda o=opt, c=cl, f=clip, n=name: Runner(n, *build(c), o, f), None)
    return out, batch


def reproducible(make, batch_fn, key) -> bool:
    """Two replicas of a variant, 4 steps on the same batches: bit-for-bit the same weights?"""
    finals = []
    for _ in range(2):
        r = make()
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            r.step(batch_fn(key, g))
        finals.append([p.detach().clone() for p in r.model.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*finals))


def measure(variants, batch_fn, args) -> dict:
    runners, result = {}, {}
    for name, (make, key) in variants.items():
        t0 = time.perf_counter()
        runners[name] = r = make()
        g = torch.Generator().manual_seed(2)
        r.step(batch_fn(key, g))  # the first step (for torch.compile: the compilation)
        result[name] = {"first_step_s": round(time.perf_counter() - t0, 2), "reproducible": None}
    times = {name: [] for name in variants}
    for rnd in range(args.rounds + 1):
        for name, (_, key) in variants.items():
            g = torch.Generator().manual_seed(100 + rnd)
            batches = [batch_fn(key, g) for _ in range(args.steps)]
            t0 = time.perf_counter()
            for b in batches:
                runners[name].step(b)
            if rnd:  # round 0 warms up
                times[name].append((time.perf_counter() - t0) / args.steps * 1000)
    base = next(iter(variants))
    for name in variants:
        ratios = [b / t for b, t in zip(times[base], times[name])]
        result[name].update(
            ms_per_step=round(statistics.median(times[name]), 1),
            speedup=round(statistics.median(ratios), 3),
            speedup_range=[round(min(ratios), 3), round(max(ratios), 3)],
        )
        if args.check_repro:
            make, key = variants[name]
            result[name]["reproducible"] = reproducible(make, batch_fn, key)
    return result


def time_gpt_evaluation(args) -> dict:
    """What the GPT stage's evaluation (vqgpt/stages.py) costs at the demo's sizes: held-out bits and the two sample
    grids."""
    import tempfile

    from vqgpt import stages
    from vqgpt.generate import SamplingConfig
    from vqgpt.model import GPT, gpt_config
    from vqgpt.pipeline import TextToImage
    from vqgpt.text import TextTokenizer
    from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

    torch.manual_seed(0)
    prompts = stages.DEFAULT_PROMPTS["openmoji"]
    text_tok = TextTokenizer.train([f"{p} {i}" for p in prompts for i in range(50)], vocab_size=300)
    cfg = gpt_config(
        "demo",
        text_vocab_size=text_tok.vocab_size,
        text_pad_id=text_tok.pad_id,
        text_len=args.text_len,
        image_vocab_size=1000,
        image_grid=(8, 8),
    )
    model, image_tok = GPT(cfg), ImageTokenizer(tokenizer_config("demo"))
    pipe = TextToImage(model, image_tok, text_tok, SamplingConfig(cfg_scale=1.0, temperature=0.3))
    ids = torch.randint(1, 300, (108, args.text_len))
    codes = torch.randint(0, 1000, (108, 64))
    t0 = time.perf_counter()
    stages.held_out_bits(model, ids, codes)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for scale in (1.0, 3.0):
            stages.sample_grid(pipe, prompts, scale, Path(d) / f"g{scale}.png")
    t2 = time.perf_counter()
    return {
        "held_out_bits_s": round(t1 - t0, 2),
        "two_sample_grids_s": round(t2 - t1, 2),
        "per_evaluation_s": round(t2 - t0, 2),
        "evaluations_in_demo": 7,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["gpt", "tokenizer", "both"], default="both")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--text-len", type=int, default=16, help="the GPT's text context (the demo's fitted one)")
    p.add_argument("--short-text-len", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also torch.compile the GPT loss (compile time reported)")
    p.add_argument("--no-repro", dest="check_repro", action="store_false")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip timing the GPT's evaluation")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from vqgpt.training import cpu_name, precision_choice

    report = {
        "cpu": cpu_name(),
        "precision": precision_choice(torch.device("cpu"), "fp32")[1],
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {
            k: os.environ[k]
            for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if k in os.environ
        },
        "steps": args.steps,
        "rounds": args.rounds,
    }
    if args.stage in ("gpt", "both"):
        report["gpt"] = measure(*gpt_variants(args), args)
        if args.eval:
            report["gpt_evaluation"] = time_gpt_evaluation(args)
    if args.stage in ("tokenizer", "both"):
        report["tokenizer"] = measure(*tokenizer_variants(args), args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
