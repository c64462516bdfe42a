import os

import pytest
import torch

# Tests are small: one thread avoids OpenMP spin-waiting against other processes on a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU interpreter in tests; the flag must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private VQGPT_CACHE for tests that must not see (or fill) the user's cache."""
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
