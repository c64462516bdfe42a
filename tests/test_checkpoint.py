import pytest
import torch

from vqgpt.checkpoint import CheckpointError, CheckpointManager, atomic_write_bytes
from vqgpt.training import NonFiniteGuard, autocast, cpu_has_bf16, epoch_batch, lr_at, precision_choice, use_bf16


def _save(mgr, step, value):
    mgr.save(
        step,
        {"w": torch.full((4,), float(value))},
        {"step": step, "note": torch.tensor([value])},
        files={"config.json": '{"a": 1}'},
        writers={"sub": lambda p: (p.mkdir(), (p / "x.txt").write_text("x"))},
    )


def test_save_load_roundtrip_and_keep_last_n(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        _save(mgr, step, step)
    assert [c.step for c in mgr.list()] == [20, 30]  # the oldest was pruned
    latest = mgr.require_latest()
    assert latest.step == 30
    assert torch.equal(latest.weights()["w"], torch.full((4,), 30.0))
    assert latest.trainer_state()["step"] == 30
    assert (latest.file("sub") / "x.txt").read_text() == "x"


def test_corrupt_or_truncated_checkpoint_falls_back_with_a_warning(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    _save(mgr, 1, 1)
    _save(mgr, 2, 2)
    weights = mgr.list()[-1].file("model.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated, as by a crash mid-copy
    with pytest.warns(UserWarning, match="step-00000002.*truncated"):
        assert mgr.latest().step == 1
    _save(mgr, 3, 3)
    f = mgr.list()[-1].file("trainer.pt")
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 0xFF  # same size, one flipped byte: only the checksum sees it
    f.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="step-00000003.*checksum"):
        assert mgr.latest().step == 1


def test_unfinished_write_is_ignored_and_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 5, 5)
    half = mgr.root / ".tmp-step-00000006-999"  # what a killed writer leaves behind
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    no_manifest = mgr.root / "step-00000007"
    no_manifest.mkdir()
    with pytest.warns(UserWarning, match="no manifest"):
        assert mgr.latest().step == 5
    _save(mgr, 8, 8)
    assert not half.exists()


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        CheckpointManager(tmp_path).require_latest()


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "b.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in p.parent.iterdir()] == ["b.bin"]


def test_epoch_batches_cover_each_epoch_and_are_pure():
    n, bs = 10, 4
    batches = [epoch_batch(n, s, bs, seed=3) for s in range(5)]  # 20 indices = 2 epochs
    flat = torch.cat(batches).tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert torch.equal(epoch_batch(n, 3, bs, seed=3), batches[3])  # resuming at step 3 sees the same batch
    assert not torch.equal(epoch_batch(n, 0, bs, seed=4), batches[0])


def test_lr_schedule():
    assert lr_at(0, max_lr=1.0, warmup=10, total=100) == pytest.approx(0.1)
    assert lr_at(9, max_lr=1.0, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_at(100, max_lr=1.0, warmup=10, total=100) == pytest.approx(0.1)
    mid = lr_at(55, max_lr=1.0, warmup=10, total=100)
    assert 0.1 < mid < 1.0


def test_non_finite_guard_skips_then_stops():
    guard = NonFiniteGuard(limit=3)
    ok, bad = torch.tensor(1.0), torch.tensor(float("nan"))
    assert guard.check(ok, ok, 0)
    with pytest.warns(UserWarning):
        assert not guard.check(bad, ok, 1)
        assert not guard.check(ok, torch.tensor(float("inf")), 2)
    assert guard.check(ok, ok, 3)  # a good step resets the run of bad ones
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match="3 steps in a row"):
        for s in range(4, 8):
            guard.check(bad, ok, s)
    assert guard.skipped == 5


def test_precision_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_bf16(cuda) and use_bf16(cpu, "bf16") and not use_bf16(cuda, "fp32")
    assert use_bf16(cpu) == cpu_has_bf16()  # auto: bf16 only where the CPU has native bf16
    with pytest.raises(ValueError, match="precision"):
        use_bf16(cpu, "fp16")
    bf16, why = precision_choice(cpu)  # the demo's first line: the choice and its reason
    assert why.startswith("bf16: " if bf16 else "fp32: ") and ("no native bf16" in why) == (not bf16)
    assert precision_choice(cpu, "fp32") == (False, "fp32: asked for with --precision fp32")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(cpu, True):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu):  # default: CUDA only
        assert (a @ b).dtype == torch.float32
