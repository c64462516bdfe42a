"""bench/gpu.py --dry-run: the GPU script of record runs every step at toy sizes on a CPU, so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["dry_run"] and result["ok"]
    assert list(result["steps"]) == ["versions", "tests", "kernels", "sample", "decoder", "train"]
    steps = result["steps"]
    assert steps["tests"]["json"]["summary"].startswith("1 passed")
    assert steps["kernels"]["json"]["ratios"] and steps["sample"]["json"]["ratios"]
    assert steps["decoder"]["json"]["psnr_bf16_vs_fp32_db"] > 30
    assert steps["train"]["json"]["tokens_per_s"] > 0 and steps["train"]["json"]["steps"] == 2
    assert "| step | ok | s | result |" in proc.stdout
    assert json.loads((tmp_path / "gpu.json").read_text())["ok"]
