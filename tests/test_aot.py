"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, on a CPU, through its real launcher.

No GPU is needed: a child process (without TRITON_INTERPRET) swaps Triton's driver for a stand-in that reports
an A100 (GPUTarget("cuda", 80, 32)) or an H100 (("cuda", 90, 32)) and launches nothing. Each launcher then
runs as on that GPU: it picks its block sizes, warps, stages and split count, the JIT specialises and compiles
the kernel to a cubin with the ptxas that the Triton wheel bundles, the prefill autotuner compiles every
config it would time, and Triton's own load-time check compares shared memory with the device's limit.
The parent asserts, per kernel and config: shared memory within the architecture's limit, ptxas's spilled
bytes within SPILL_BUDGET, registers x threads within the register file (else the launch would fail), and
tensor-core instructions where they belong (wgmma in sm_90 prefill, mma.sync in sm_80 prefill and in decode).

The stand-in uses Triton internals (the driver interface, knobs.compilation.listener, the ptxas log), so the
test runs only on the Triton versions in SUPPORTED_TRITON and skips with the reason elsewhere.

    python tests/test_aot.py --arch 90        # the child: one JSON line per compiled kernel
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED_TRITON = ((3, 9), (3, 10))  # [from, to): the driver interface and compile listener used here
ARCHS = (80, 90)
# Opt-in shared memory per block: A100 163 KiB, H100 227 KiB (CUDA C programming guide, compute capabilities).
SHARED_LIMIT = {80: 166912, 90: 232448}
SM_COUNT = {80: 108, 90: 132}  # A100 SXM, H100 SXM: what the decode split heuristic sees
REGISTER_FILE = 65536  # 32-bit registers per SM (and per block) on sm_80 and sm_90
# Spilled bytes (ptxas's spill stores) allowed per kernel. 0 except prefill, where (128, 64, 4 warps) at head
# dim 64 spills 16 B on sm_80 (none on sm_90, where it is the tutorial's choice): an autotune config that spills
# a little is only slower, and the tuner does not pick it then; the budget keeps heavy spillers out of the list.
SPILL_BUDGET = {
    "_attn_fwd_kernel_impl": 16,
    "_decode_split_kernel": 0,
    "_decode_merge_kernel": 0,
    "_sample_resident_kernel": 0,
    "_sample_tiled_kernel": 0,
}

# The configs of record (model dim 1024 = 16 heads x 64, or 8 x 128; text 64 + BOI + 256 image codes).
PREFILL_CASES = [(d, dtype) for d in (64, 128) for dtype in ("float16", "bfloat16")]  # B=2, H=16, T=S=65
# (head dim, KV heads of 16 query heads, rows): 64 rows fill the SMs (one split), 2 rows do not (several)
DECODE_CASES = [(d, hkv, rows) for d in (64, 128) for hkv in (16, 4) for rows in (64, 2)]
SAMPLE_CASES = [(v, dtype) for v in (16384, 1024) for dtype in ("bfloat16", "float32")]  # 32 images, CFG


def triton_skip_reason() -> str | None:
    try:
        version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "triton is not installed"
    parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    lo, hi = SUPPORTED_TRITON
    if not lo <= parts < hi:
        return (
            f"triton {version}: the stand-in driver of this test is written against Triton "
            f"{lo[0]}.{lo[1]} internals (supported: >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]})"
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# the child: a stand-in driver, every launcher, one JSON record per compiled kernel


class _Launcher:
    """Triton's launcher, minus the launch: records the grid."""

    launches: list = []

    def __init__(self, src, meta):
        self.name = meta.name

    def __call__(self, grid_x, grid_y, grid_z, *args):
        _Launcher.launches.append({"name": self.name, "grid": [grid_x, grid_y, grid_z]})


class _Utils:
    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        return {
            "max_shared_mem": SHARED_LIMIT[self.arch],
            "multiprocessor_count": SM_COUNT[self.arch],
            "max_num_regs": REGISTER_FILE,
            "warpSize": 32,
        }

    def load_binary(self, name, cubin, shared, device):
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads (ptxas's log has them)

    def unload_module(self, module):
        pass


class StandInDriver:
    """Enough of a CUDA driver for the JIT to compile and "launch" for `arch`: the device index is the arch,
    so each arch gets its own JIT caches."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(arch)
        self.launcher_cls = _Launcher
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target

    def get_benchmarker(self):
        def bench(kernel_call, quantiles):  # the autotuner's timing: compile and "launch" once
            kernel_call()
            return [1.0, 1.0, 1.0]

        return bench


PTXAS_INFO = re.compile(r"(\d+) bytes spill stores.*?Used (\d+) registers", re.S)


def compile_all(arch: int) -> list[dict]:
    """Run every launcher at the configs of record against the stand-in driver; a record per compiled kernel."""
    import torch
    import triton
    from triton import knobs

    sys.path.insert(0, str(ROOT))
    attention = importlib.import_module("kernels.attention")
    decode = importlib.import_module("kernels.decode_attention")
    sampling = importlib.import_module("kernels.sampling")

    triton.runtime.driver.set_active(StandInDriver(arch))
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log (spills, registers) is printed per compile
    log = io.StringIO()
    records: list[dict] = []
    case: dict = {}

    def listener(src, metadata, metadata_group, times, cache_hit):
        ptx = Path(next(p for n, p in metadata_group.items() if n.endswith(".ptx"))).read_text()
        info = PTXAS_INFO.findall(log.getvalue())
        log.seek(0), log.truncate()
        spills, regs = (int(x) for x in info[-1]) if info else (-1, -1)
        constants = {src.fn.arg_names[k[0]]: v for k, v in src.constants.items()}
        records.append(
            dict(
                case,
                kernel=metadata["name"],
                arch=arch,
                shared=metadata["shared"],
                num_warps=metadata["num_warps"],
                num_stages=metadata["num_stages"],
                spills=spills,
                registers=regs,
                wgmma="wgmma.mma_async" in ptx,
                mma_sync="mma.sync" in ptx,
                blocks=[constants.get(n) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_H", "BLOCK_V")],
            )
        )

    knobs.compilation.listener = listener
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

    def run(label: dict, fn) -> None:
        case.clear()
        case.update(label)
        _Launcher.launches.clear()
        with contextlib.redirect_stdout(log):
            fn()
        for r in records:
            if r.get("case_id") == label["case_id"]:
                r["launches"] = list(_Launcher.launches)

    for d, dtype in PREFILL_CASES:
        q = torch.empty(2, 16, 65, d, dtype=dt[dtype])
        run(
            dict(case_id=f"prefill-d{d}-{dtype}", kind="prefill", head_dim=d, dtype=dtype, T=65),
            partial(attention._attention_triton, q, q, q, True, d**-0.5),
        )
    for d, hkv, rows in DECODE_CASES:
        q = torch.empty(rows, 16, d, dtype=torch.bfloat16)
        cache = torch.empty(rows, hkv, 321, d, dtype=torch.bfloat16)
        lens = torch.zeros(rows, dtype=torch.int64)
        run(
            dict(case_id=f"decode-d{d}-hkv{hkv}-rows{rows}", kind="decode", head_dim=d, n_kv_head=hkv, rows=rows),
            partial(decode._decode_triton, q, cache, cache, lens, d**-0.5, None),
        )
    for v, dtype in SAMPLE_CASES:
        logits = torch.empty(64, v, dtype=dt[dtype])
        seeds, step = torch.zeros(32, dtype=torch.int64), torch.zeros((), dtype=torch.int64)
        scale = torch.full((1,), 3.0)  # on the device, as generate passes its guidance schedule
        top_k = min(1000, v // 10)
        run(
            dict(case_id=f"sample-v{v}-{dtype}", kind="sample", vocab=v, dtype=dtype),
            partial(sampling._cfg_sample_triton, logits, seeds, step, scale, 1.0, top_k, 0.95, B=32, mix=True),
        )
    return records


def child_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, choices=ARCHS, required=True)
    arch = parser.parse_args().arch
    t0 = time.perf_counter()
    for record in compile_all(arch):
        print(json.dumps(record))
    print(json.dumps({"done": arch, "seconds": round(time.perf_counter() - t0, 1)}))


# ---------------------------------------------------------------------------------------------------------
# the parent: both archs in parallel (one core each), then the assertions

pytestmark = pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as cache:
        procs = {}
        for arch in ARCHS:  # a fresh cache per arch: every kernel is compiled (and logged by ptxas) here
            env_arch = dict(env, TRITON_CACHE_DIR=str(Path(cache) / f"sm{arch}"))
            procs[arch] = subprocess.Popen(
                [sys.executable, __file__, "--arch", str(arch)],
                cwd=ROOT,
                env=env_arch,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        out = {}
        for arch, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"sm_{arch} compile failed:\n{stderr[-4000:]}"
            lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            assert lines and lines[-1].get("done") == arch, f"sm_{arch}: no summary line:\n{stdout[-2000:]}"
            out[arch] = lines[:-1]
    return out


def _records(compiled, arch: int, case_id: str) -> list[dict]:
    rows = [r for r in compiled[arch] if r["case_id"] == case_id]
    assert rows, f"sm_{arch} {case_id}: nothing was compiled"
    return rows


def _check_resources(r: dict) -> None:
    what = f"sm_{r['arch']} {r['case_id']} {r['kernel']} (warps {r['num_warps']}, stages {r['num_stages']})"
    assert r["shared"] <= SHARED_LIMIT[r["arch"]], f"{what}: {r['shared']} B of shared memory > the limit"
    assert 0 <= r["spills"] <= SPILL_BUDGET[r["kernel"]], (
        f"{what}: {r['spills']} B spilled > budget {SPILL_BUDGET[r['kernel']]} B ({r['registers']} registers)"
    )
    threads = r["num_warps"] * 32
    assert r["registers"] * threads <= REGISTER_FILE, (
        f"{what}: {r['registers']} registers x {threads} threads exceed the register file: the launch would fail"
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head_dim,dtype", PREFILL_CASES)
def test_prefill_compiles_every_autotune_config(compiled, arch, head_dim, dtype):
    import torch

    attention = importlib.import_module("kernels.attention")
    rows = _records(compiled, arch, f"prefill-d{head_dim}-{dtype}")
    want = attention.prefill_configs(getattr(torch, dtype), head_dim, 65)
    got = sorted((r["blocks"][0], r["blocks"][1], r["num_warps"], r["num_stages"]) for r in rows)
    assert got == sorted(want), f"compiled {got}, the autotune list is {want}"
    for r in rows:
        _check_resources(r)
        tensor_cores = r["wgmma"] if arch == 90 else r["mma_sync"]
        assert tensor_cores, f"sm_{arch} prefill d{head_dim} {dtype}: no {'wgmma' if arch == 90 else 'mma.sync'}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head_dim,n_kv_head,rows", DECODE_CASES)
def test_decode_compiles_with_the_split_heuristic(compiled, arch, head_dim, n_kv_head, rows):
    recs = _records(compiled, arch, f"decode-d{head_dim}-hkv{n_kv_head}-rows{rows}")
    launches = recs[0]["launches"]
    splits = next(x["grid"][1] for x in launches if x["name"] == "_decode_split_kernel")
    merged = any(x["name"] == "_decode_merge_kernel" for x in launches)
    if rows * n_kv_head >= 0.8 * SM_COUNT[arch]:
        assert splits == 1 and not merged, f"{rows} x {n_kv_head} programs fill the SMs, yet {splits} splits"
    else:
        assert splits > 1 and merged, f"{rows} x {n_kv_head} programs on {SM_COUNT[arch]} SMs, yet {splits} split"
    for r in recs:
        _check_resources(r)
        if r["kernel"] == "_decode_split_kernel":
            assert r["mma_sync"] or r["wgmma"], f"sm_{arch} decode d{head_dim}: no tensor-core instruction"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("vocab,dtype", SAMPLE_CASES)
def test_sampler_compiles_within_its_register_budget(compiled, arch, vocab, dtype):
    for r in _records(compiled, arch, f"sample-v{vocab}-{dtype}"):
        _check_resources(r)


if __name__ == "__main__":
    child_main()
