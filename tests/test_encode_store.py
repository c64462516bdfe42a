"""The codes store: what it holds, 1 rank = 2 ranks, a killed extraction resumes, the cold-cache race."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqgpt.data import load_image_tensors
from vqgpt.encode import CodeStore, encode, split_dir
from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """30 captioned 16x16 images, one of them a corrupt file (skipped when the set is loaded)."""
    root = tmp_path_factory.mktemp("store-folder")
    lines = []
    for i in range(30):
        im = Image.new("RGB", (16, 16), "white")
        im.paste((40 * (i % 6), 200, 30 * (i % 8)), (i % 7, 3, i % 7 + 8, 11))
        im.save(root / f"img{i:02d}.png")
        lines.append(json.dumps({"file_name": f"img{i:02d}.png", "text": f"caption number {i} é"}))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines.append(json.dumps({"file_name": "broken.png", "text": "a broken file"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = ImageTokenizer(tokenizer_config("tiny", image_size=16, fsq_levels=(5, 4, 3)))
    path = tmp_path_factory.mktemp("store-tok") / "tok"
    tok.save_pretrained(path)
    return path


def cli(*args, cache, torchrun: int = 0, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VQGPT_CACHE": str(cache)}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] if torchrun else []
    out = subprocess.run(
        [sys.executable, *launch, "-m", "vqgpt.encode", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out


def test_store_holds_the_codes_and_captions_of_every_image(folder, tok_dir, tmp_cache):
    tok = ImageTokenizer.from_pretrained(tok_dir)
    store = encode(str(folder), "train", tok, tmp_cache / "s", shard_size=8, progress=False)
    images, captions = load_image_tensors(str(folder), "train", 16)
    with torch.no_grad():
        want = tok.encode(images.float() / 255).flatten(1)
    assert len(store) == len(images) and len(store.manifest["shards"]) == -(-len(images) // 8)
    assert torch.equal(store.codes(range(len(store))), want)
    assert store.captions(range(len(store))) == captions and list(store.iter_captions()) == captions
    assert store.caption(3) == captions[3] and "é" in store.caption(0)
    m = store.manifest
    assert m["dtype"] == "int16" and m["count"] == len(images) and m["tokenizer"] == tok.fingerprint()
    assert m["codebook_size"] == 60 and m["grid"] == [tok.grid_size, tok.grid_size]
    assert m["codes_sha256"] == hashlib.sha256(want.numpy().astype("<i4").tobytes()).hexdigest()
    assert np.load(tmp_cache / "s" / "shard-00000.codes.npy", mmap_mode="r").dtype == np.int16
    # random rows, out of order, across shards
    idx = torch.tensor([17, 0, 9, 9, len(store) - 1])
    assert torch.equal(store.codes(idx), want[idx])
    with pytest.raises(IndexError, match="outside"):
        store.codes([len(store)])
    # a second call opens the finished store; another tokenizer's codes in the same place are refused
    assert encode(str(folder), "train", tok, tmp_cache / "s", progress=False).manifest == m
    other = ImageTokenizer(tokenizer_config("tiny", image_size=16, fsq_levels=(4, 4)))
    with pytest.raises(ValueError, match="another tokenizer or data"):
        encode(str(folder), "train", other, tmp_cache / "s", progress=False)
    with pytest.raises(ValueError, match="not a finished codes store"):
        CodeStore.open(tmp_cache)


def test_two_ranks_write_the_same_store_as_one_and_a_killed_run_resumes(folder, tok_dir, tmp_path):
    cache = tmp_path / "cache"
    one = json.loads(
        cli("--data", folder, "--tokenizer", tok_dir, "--out", tmp_path / "one", "--shard-size", "5", cache=cache)
        .stdout.strip()
        .splitlines()[-1]
    )
    two = json.loads(
        cli(
            "--data",
            folder,
            "--tokenizer",
            tok_dir,
            "--out",
            tmp_path / "two",
            "--shard-size",
            "5",
            cache=cache,
            torchrun=2,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert one["world"] == 1 and two["world"] == 2
    for split in ("train", "test"):
        assert one[split]["codes_sha256"] == two[split]["codes_sha256"] and one[split]["count"] == two[split]["count"]
    shards = sorted(p.name for p in split_dir(tmp_path / "one", "train").iterdir())
    assert shards == sorted(p.name for p in split_dir(tmp_path / "two", "train").iterdir())
    for name in shards:
        if name != "manifest.json":
            a = (split_dir(tmp_path / "one", "train") / name).read_bytes()
            assert a == (split_dir(tmp_path / "two", "train") / name).read_bytes(), name

    # A run killed mid-way: no manifest, one shard unfinished (no .json) with a half-written codes file.
    train = split_dir(tmp_path / "two", "train")
    (train / "manifest.json").unlink()
    (train / "shard-00002.json").unlink()
    (train / "shard-00002.codes.npy").write_bytes(b"\x93NUMPY half")
    kept = {p.name: p.stat().st_mtime_ns for p in train.glob("shard-0000[013].codes.npy")}
    again = json.loads(
        cli(
            "--data",
            folder,
            "--tokenizer",
            tok_dir,
            "--out",
            tmp_path / "two",
            "--shard-size",
            "5",
            "--split",
            "train",
            cache=cache,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert again["codes_sha256"] == one["train"]["codes_sha256"]
    assert {name: (train / name).stat().st_mtime_ns for name in kept} == kept  # finished shards left alone


def test_cold_cache_two_ranks_render_once_and_agree(tok_dir, tmp_path):
    """Both ranks start on an empty cache of an embedded set: rank 0 renders it while rank 1 waits."""
    cache = tmp_path / "cold"
    tok = tmp_path / "tok32"
    torch.manual_seed(0)
    ImageTokenizer(tokenizer_config("tiny", image_size=64, fsq_levels=(4, 4))).save_pretrained(tok)
    r = cli(
        "--data",
        "shapes",
        "--limit",
        "24",
        "--split",
        "train",
        "--tokenizer",
        tok,
        "--out",
        tmp_path / "s",
        "--shard-size",
        "8",
        cache=cache,
        torchrun=2,
    )
    two = json.loads(r.stdout.strip().splitlines()[-1])
    one = json.loads(
        cli(
            "--data",
            "shapes",
            "--limit",
            "24",
            "--split",
            "train",
            "--tokenizer",
            tok,
            "--out",
            tmp_path / "s1",
            cache=cache,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert two["count"] == one["count"] == 24 and two["codes_sha256"] == one["codes_sha256"]
    assert len([p for p in (cache / "shapes").iterdir() if ".tmp" not in p.name]) == 1


def test_bad_input_is_one_line(folder, tok_dir, tmp_path):
    r = cli("--data", folder, "--tokenizer", tmp_path / "nope", "--out", tmp_path / "x", cache=tmp_path, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = cli(
        "--data",
        tmp_path / "no-such-folder",
        "--tokenizer",
        tok_dir,
        "--out",
        tmp_path / "x",
        cache=tmp_path,
        check=False,
    )
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_the_readme_commands_for_class_folders_through_torchrun(tmp_path):
    """README, "Training on a large dataset": tokenizer, extraction and GPT on 2 ranks over ImageNet-style class
    folders (the folder name is the caption); the GPT stage reads the store that vqgpt.encode wrote."""
    data = tmp_path / "classes"
    for c, rgb in enumerate([(220, 30, 30), (30, 180, 60), (30, 60, 220)]):
        (data / f"class_{c}").mkdir(parents=True)
        for i in range(16):  # 48 files: 5% of them, by a hash of their names, are the test split
            im = Image.new("RGB", (24, 20), "white")  # not square: resized and centre-cropped to 16
            im.paste(rgb, (i % 5, 4, i % 5 + 10, 14))
            im.save(data / f"class_{c}" / f"{i}.JPEG")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "VQGPT_CACHE": str(tmp_path / "cache")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    small = ["--preset", "tiny", "--batch-size", "8", "--steps", "6", "--eval-every", "1000", "--device", "cpu"]

    def ok(*cmd):
        r = subprocess.run([*torchrun, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    ok("train.py", "tokenizer", "--data", data, "--out", tmp_path / "tok", "--image-size", "16", *small)
    ok("-m", "vqgpt.encode", "--data", data, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "codes")
    store = CodeStore.open(split_dir(tmp_path / "codes", "train"))
    assert set(store.iter_captions()) <= {"class 0", "class 1", "class 2"} and len(store) >= 20
    r = ok(
        "train.py",
        "gpt",
        "--data",
        data,
        "--codes",
        tmp_path / "codes",
        "--tokenizer",
        tmp_path / "tok",
        "--out",
        tmp_path / "t2i",
        *small,
    )
    assert "encode:" not in r.stdout  # the store was there: nothing encoded again
    assert (tmp_path / "t2i" / "model.safetensors").is_file()


def test_unfinished_shards_of_other_weights_or_another_layout_are_not_reused(folder, tok_dir, tmp_cache):
    """A run killed before its manifest, started again with other weights or another --shard-size: the old,
    whole-looking shards must be encoded again or removed, never taken as this run's."""
    a = ImageTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(1)
    b = ImageTokenizer(tokenizer_config("tiny", image_size=16, fsq_levels=(5, 4, 3)))
    out = tmp_cache / "s"
    encode(str(folder), "train", a, out, shard_size=4, progress=False)
    (out / "manifest.json").unlink()  # killed before the manifest
    store = encode(str(folder), "train", b, out, shard_size=8, progress=False)
    images, _ = load_image_tensors(str(folder), "train", 16)
    with torch.no_grad():
        want = b.encode(images.float() / 255).flatten(1)
    assert len(store) == len(images) and torch.equal(store.codes(range(len(store))), want)
    assert sorted(p.name.split(".")[0] for p in out.glob("shard-*.json")) == [
        f"shard-{k:05d}" for k in range(-(-len(images) // 8))
    ]


def test_the_readme_commands_for_webdataset_shards(tmp_path):
    """README: CC3M-style tar shards as img2dataset writes them (KEY.jpg + KEY.txt / KEY.json), one member
    corrupt: the tokenizer trains on them, vqgpt.encode skips and counts the bad one, train.py gpt reads the store."""
    import io
    import tarfile

    shards = tmp_path / "cc"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(24):
                key = f"{s:04d}{i:05d}"
                buf = io.BytesIO()
                im = Image.new("RGB", (20, 16), "white")
                im.paste((200, 20 * (i % 10), 40), (i % 6, 3, i % 6 + 9, 12))
                im.save(buf, format="JPEG")
                data = buf.getvalue()[:60] if (s, i) == (1, 5) else buf.getvalue()  # one truncated JPEG
                caption = (
                    json.dumps({"caption": f"a red mark number {i % 6}"}) if i % 2 else f"a red mark number {i % 6}"
                ).encode()
                for name, blob in ((f"{key}.jpg", data), (f"{key}.{'json' if i % 2 else 'txt'}", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    spec = str(shards / "{00000..00001}.tar")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "VQGPT_CACHE": str(tmp_path / "cache")}
    small = ["--preset", "tiny", "--batch-size", "8", "--steps", "4", "--eval-every", "1000", "--device", "cpu"]

    def ok(*cmd):
        r = subprocess.run(
            [sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    r = ok("train.py", "tokenizer", "--data", spec, "--out", tmp_path / "tok", "--image-size", "16", *small)
    assert "skipped 1" in r.stderr  # the truncated member, in the one warning about bad files
    ok("-m", "vqgpt.encode", "--data", spec, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "codes")
    store = CodeStore.open(split_dir(tmp_path / "codes", "train"))
    test = CodeStore.open(split_dir(tmp_path / "codes", "test"))
    assert len(store) + len(test) == 47
    assert set(store.iter_captions()) <= {f"a red mark number {i}" for i in range(6)}
    ok(
        "train.py",
        "gpt",
        "--data",
        spec,
        "--codes",
        tmp_path / "codes",
        "--tokenizer",
        tmp_path / "tok",
        "--out",
        tmp_path / "t2i",
        *small,
    )
    assert (tmp_path / "t2i" / "model.safetensors").is_file()
