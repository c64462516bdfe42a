"""Checkpoints that survive being killed at any moment.

A run directory looks like this:

    runs/t2i/
      config.json, model.safetensors, ...     the latest weights in the public format (from_pretrained)
      checkpoints/
        step-00001000/                        one complete checkpoint
          model.safetensors                   weights
          trainer.pt                          optimizer, schedule, scaler, step: plain tensors and numbers
          *.json, tokenizer files ...         whatever else the stage needs to rebuild itself
          manifest.json                       sha256 and size of every file above, written last

Every checkpoint is written into a hidden temporary directory, each file flushed to disk, the manifest
written last, and the directory renamed into place: a crash leaves either the old set of checkpoints or
the new one, never half of one. Loading verifies the manifest and falls back, with a warning, to the
newest checkpoint that checks out. Nothing is pickled: weights are safetensors and trainer state is
loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# atomic_write_bytes, read_json_file and save_weights live in vqgpt.io; they stay importable from here, where
# lit.py and training.py get them.
from .io import atomic_write_bytes, fsync_dir, read_json_file, save_weights  # noqa: F401

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Checkpoint:
    path: Path
    step: int

    def weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / WEIGHTS))

    def trainer_state(self) -> dict:
        return torch.load(self.path / TRAINER_STATE, map_location="cpu", weights_only=True)

    def file(self, name: str) -> Path:
        return self.path / name


class CheckpointManager:
    """Writes numbered checkpoints under `run_dir/checkpoints`, keeps the newest `keep`."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep = keep

    def save(
        self,
        step: int,
        weights: dict[str, torch.Tensor],
        trainer_state: dict,
        files: dict[str, bytes | str] | None = None,
        writers: dict[str, Callable[[Path], None]] | None = None,
        export: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically.

        files: extra small files by name (configs). writers: name -> function that writes a file or a
        directory at the path it is given (e.g. a tokenizer's save_pretrained). Both are covered by the
        manifest. export(run_dir), if given, then writes the public-format model into the run directory.
        """
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        torch.save(trainer_state, tmp / TRAINER_STATE)
        for name, content in (files or {}).items():
            data = content.encode() if isinstance(content, str) else content
            (tmp / name).write_bytes(data)
        for name, write in (writers or {}).items():
            write(tmp / name)
        manifest = {"step": step, "files": {}}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            rel = f.relative_to(tmp).as_posix()
            manifest["files"][rel] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        with open(tmp / MANIFEST, "rb+") as fh:
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        if export is not None:
            export(self.run_dir)
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):  # left behind by a killed writer
            shutil.rmtree(stale, ignore_errors=True)

    def list(self) -> list[Checkpoint]:
        """All complete-looking checkpoints, oldest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step-"):
                try:
                    out.append(Checkpoint(p, int(p.name[len("step-") :])))
                except ValueError:
                    continue
        return sorted(out, key=lambda c: c.step)

    @staticmethod
    def verify(ckpt: Checkpoint) -> str | None:
        """None if every file matches the manifest, else what is wrong."""
        try:
            manifest = json.loads((ckpt.path / MANIFEST).read_text())
        except FileNotFoundError:
            return "no manifest (the write never finished)"
        except (OSError, json.JSONDecodeError) as e:
            return f"unreadable manifest ({e})"
        for name, meta in manifest.get("files", {}).items():
            f = ckpt.path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != meta["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
            if _sha256(f) != meta["sha256"]:
                return f"{name} does not match its checksum (corrupt)"
        if WEIGHTS not in manifest.get("files", {}) or TRAINER_STATE not in manifest.get("files", {}):
            return "the manifest lists no weights or trainer state"
        return None

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
        for ckpt in reversed(self.list()):
            problem = self.verify(ckpt)
            if problem is None:
                return ckpt
            warnings.warn(f"skipping checkpoint {ckpt.path}: {problem}; falling back to an older one", stacklevel=2)
        return None

    def require_latest(self) -> Checkpoint:
        ckpt = self.latest()
        if ckpt is None:
            found = ", ".join(c.path.name for c in self.list()) or "none"
            raise CheckpointError(
                f"no usable checkpoint under {self.root} (found: {found}); "
                f"start a new run without --resume, or point --resume at a run directory"
            )
        return ckpt


# --- one writer per run directory --------------------------------------------------------------------
LOCK = ".lock"
# What a run writes into its directory; any of them marks the directory as holding a run.
PUBLIC_FILES = (
    "config.json",
    "model.safetensors",
    "checkpoints",
    "image_tokenizer",
    "text_tokenizer",
    "adapter",
    "samples",
    "README.md",
)


def holds_a_run(run_dir: str | os.PathLike) -> bool:
    """Does `run_dir` already hold a model or checkpoints (anything a new run would overwrite)?"""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in PUBLIC_FILES)


@contextmanager
def claim_run_dir(run_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Iterator[Path]:
    """Hold `run_dir` for one writer for the duration of the block.

    - Another process training into it (it holds the `fcntl` lock on `run_dir/.lock`) is an error that names
      its pid: two writers would prune each other's checkpoints and mix their models.
    - A directory that already holds a run is refused unless the caller resumes it or asked to overwrite it;
      with `overwrite`, its checkpoints and exported model are removed first, so that none of the old run's
      (newer-numbered) checkpoints outlives the new run's or is resumed by mistake.
    The lock is a POSIX record lock (`lockf`): it belongs to this process alone, so forked loader workers do not
    inherit it, and the kernel drops it when the block ends or the process dies, even by SIGKILL.
    """
    import fcntl

    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:  # POSIX locks do not conflict within one process: check it here
        raise ValueError(f"another process (pid {os.getpid()}, this one) is training into {run_dir}")
    if resume and not run_dir.is_dir():
        raise ValueError(f"--resume {run_dir}: no such run directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"cannot write the run directory {run_dir}: {e.strerror or e}") from e
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(
                f"another process (pid {holder}) is training into {run_dir}; wait for it to finish, "
                f"or use another --out"
            ) from None
        if not resume and holds_a_run(run_dir):
            if not overwrite:
                raise ValueError(
                    f"--out {run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                    f"or --overwrite to replace it"
                )
            for name in PUBLIC_FILES:
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        _HELD.add(key)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield run_dir
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # releases the lock


_HELD: set[str] = set()  # run directories this process holds
