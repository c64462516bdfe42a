"""--streaming: tar shards read file by file, nothing copied to the cache, for both training stages and the
codes store. The store equals the one built from the copied set, 2 ranks write what 1 writes, and a streamed
tokenizer run resumes exactly (the rows before the resumed step are replayed, not decoded)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sources import _split_of, _write_shards

from vqgpt import data
from vqgpt.encode import CodeStore, encode
from vqgpt.loader import StreamImages
from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 tar shards of 24 samples, one JPEG cut in half: {tar/KEY: caption} of the usable samples."""
    root = tmp_path_factory.mktemp("stream-shards")
    return root, _write_shards(root, n_shards=4, per_shard=24)


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return ImageTokenizer(tokenizer_config("tiny", image_size=16, fsq_levels=(5, 4, 3)))


def test_streamed_store_equals_the_copied_one_and_two_ranks_agree(shards, tok, tmp_path, tmp_cache):
    root, samples = shards
    copied = encode(str(root), "train", tok, tmp_path / "copied", progress=False)
    streamed = encode(str(root), "train", tok, tmp_path / "one", streaming=True, progress=False)
    assert not (tmp_cache / "datasets").exists() or streamed.manifest["data"]["streaming"]
    tok.save_pretrained(tmp_path / "tok")
    r = _run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vqgpt.encode",
        "--data",
        root,
        "--streaming",
        "--split",
        "train",
        "--tokenizer",
        tmp_path / "tok",
        "--out",
        tmp_path / "two",
        cache=tmp_cache,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two = CodeStore.open(tmp_path / "two")
    assert copied.manifest["codes_sha256"] == streamed.manifest["codes_sha256"] == two.manifest["codes_sha256"]
    assert len(streamed) == len(_split_of(samples, "train")) and len(streamed.manifest["shards"]) == 4
    assert streamed.manifest["skipped"] == {"unreadable": 1}  # the cut JPEG, counted in the manifest
    assert list(streamed.iter_captions()) == list(copied.iter_captions())
    assert streamed.manifest["data"] != copied.manifest["data"]  # a stream's store has its own cache key
    with pytest.raises(ValueError, match="fewer files"):
        encode(str(root), "train", tok, tmp_path / "limited", streaming=True, limit=5, progress=False)
    with pytest.raises(ValueError, match="leave --streaming out"):
        data.stream_shards("shapes")


def test_stream_images_resume_replays_and_ranks_read_their_own_files(shards):
    root, _ = shards
    stream = data.stream_shards(str(root), "train")
    kw = dict(per_rank=8, seed=3, steps=12, buffer=16)
    full = list(StreamImages(stream, 16, rank=0, world=1, start=0, **kw))  # 12 x 8 = 96 rows: past one epoch
    resumed = list(StreamImages(stream, 16, rank=0, world=1, start=7, **kw))
    assert len(full) == 12 and all(torch.equal(a, b) for a, b in zip(full[7:], resumed))
    assert not torch.equal(full[0], full[1])
    ranks = [StreamImages(stream, 16, rank=r, world=2, start=0, **kw) for r in (0, 1)]
    assert ranks[0].files == [0, 2] and ranks[1].files == [1, 3]
    epoch = [next(iter(ranks[r].rows()))["text"] for r in (0, 1)]
    assert int(epoch[0].split()[1]) // 24 in (0, 2) and int(epoch[1].split()[1]) // 24 in (1, 3)
    with pytest.raises(ValueError, match="fewer than the 5 ranks"):
        StreamImages(stream, 16, rank=4, world=5, start=0, **kw)


def _run(*args, cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "VQGPT_CACHE": str(cache)}
    r = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    return r


def test_streamed_training_stages_and_exact_resume(shards, tmp_path):
    root, _ = shards
    cache = tmp_path / "cache"
    tok = [
        "train.py",
        "tokenizer",
        "--data",
        root,
        "--streaming",
        "--preset",
        "tiny",
        "--image-size",
        "16",
        "--fsq-levels",
        "5",
        "4",
        "3",
        "--batch-size",
        "8",
        "--steps",
        "8",
        "--save-every",
        "4",
        "--eval-every",
        "1000",
        "--device",
        "cpu",
    ]
    r = _run(*tok, "--out", tmp_path / "tok", cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 streamed files of train" in r.stdout
    assert not (cache / "datasets").exists()  # nothing copied to the cache

    # the step-4 checkpoint of that run, with everything after it removed, is where a killed run would stand
    shutil.copytree(tmp_path / "tok", tmp_path / "cut")
    for later in sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)
    (tmp_path / "cut" / "model.safetensors").unlink()
    r = _run(*tok, "--resume", tmp_path / "cut", cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(tmp_path / "tok" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed stream run differs"

    gpt = [
        "train.py",
        "gpt",
        "--data",
        root,
        "--streaming",
        "--tokenizer",
        tmp_path / "tok",
        "--preset",
        "tiny",
        "--batch-size",
        "8",
        "--steps",
        "3",
        "--eval-every",
        "1000",
        "--device",
        "cpu",
        "--limit",
        "40",
    ]
    r = _run(*gpt, "--out", tmp_path / "t2i", cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "t2i" / "model.safetensors").is_file()
    stores = [CodeStore.open(p.parent) for p in (cache / "stores").glob("*/manifest.json")]
    assert sorted(s.manifest["data"]["split"] for s in stores) == ["test", "train"]
    assert all(s.manifest["data"]["streaming"] for s in stores)
    assert json.loads((tmp_path / "t2i" / "config.json").read_text())  # the exported model is whole

    r = _run("train.py", "tokenizer", "--data", "shapes", "--streaming", "--out", tmp_path / "x", cache=cache)
    assert r.returncode == 2 and "leave --streaming out" in r.stderr and "Traceback" not in r.stderr


def test_crops_store_views_of_every_training_image(shards, tok, tmp_path, tmp_cache):
    """--crops 3: three rows per image (centre crop first, so row 3i is the plain store's row i), the same views
    whatever the number of ranks or the reader (stream or copied set), and their own cache key."""
    root, _ = shards
    plain = encode(str(root), "train", tok, tmp_path / "plain", progress=False)
    crops = encode(str(root), "train", tok, tmp_path / "crops", crops=3, progress=False)
    streamed = encode(
        str(root), "train", tok, tmp_path / "streamed", crops=3, shard_size=24, streaming=True, progress=False
    )
    n = len(plain)
    assert len(crops) == 3 * n and crops.manifest["data"]["crops"] == 3
    assert torch.equal(crops.codes(range(0, 3 * n, 3)), plain.codes(range(n)))
    assert crops.captions([0, 1, 2]) == [plain.caption(0)] * 3
    assert torch.equal(streamed.codes(range(3 * n)), crops.codes(range(3 * n)))  # shard k's seeds, either reader
    with pytest.raises(ValueError, match="crops must be >= 1"):
        encode(str(root), "train", tok, tmp_path / "bad", crops=0, progress=False)


def test_views_are_the_centre_crop_then_seeded_crops():
    import io

    import numpy as np
    from PIL import Image

    from vqgpt.data import square_tensor
    from vqgpt.loader import decode_views

    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    value = {"bytes": buf.getvalue(), "path": None}
    views = decode_views(value, 16, 4, seed=7)
    assert len(views) == 4 and all(v.shape == (3, 16, 16) and v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[0], square_tensor(Image.fromarray(pixels), 16))
    assert all(not torch.equal(views[0], v) for v in views[1:])
    assert all(torch.equal(a, b) for a, b in zip(views, decode_views(value, 16, 4, seed=7)))
    assert not torch.equal(views[1], decode_views(value, 16, 4, seed=8)[1])
    assert decode_views({"bytes": b"not an image", "path": None}, 16, 4, seed=7) is None
