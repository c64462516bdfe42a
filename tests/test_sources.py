"""vqgpt.data sources beyond folders: WebDataset tar shards, parquet files, hub revisions, streaming by rank,
and data folders holding FIFOs, sockets, dangling links or absurdly shaped images. All data is made here."""

import hashlib
import io
import json
import logging
import os
import re
import signal
import socket
import struct
import tarfile
import zlib

import pytest
import torch
from PIL import Image

from vqgpt import data
from vqgpt.data import is_held_out_key, iter_captioned, load_captioned, load_codes, source_identity

N_SHARDS, PER_SHARD = 3, 10
CORRUPT = 13  # the sample whose JPEG is cut in half


def _image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + i % 3, 8), (i * 37 % 256, 60, 200)).save(buf, format=fmt)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tf.addfile(info, io.BytesIO(payload))


def _write_shards(root, n_shards: int = N_SHARDS, per_shard: int = PER_SHARD, corrupt: int | None = CORRUPT):
    """img2dataset's layout: 00000.tar with 000000000.jpg + .txt (shard 0), + .json {"caption"} (shard 1),
    + .json {"text"} (shard 2), one png among the jpgs; returns {tar/KEY: caption} of the usable samples."""
    root.mkdir(parents=True, exist_ok=True)
    samples = {}
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(per_shard):
                n, key = s * per_shard + i, f"{s:05d}{i:04d}"
                ext, payload = ("png", _image_bytes(n, "PNG")) if n == 5 else ("jpg", _image_bytes(n))
                if n == corrupt:
                    payload = payload[: len(payload) // 2]
                _add(tf, f"{key}.{ext}", payload)
                caption = f"sample {n}"
                if s % 3 == 0:
                    _add(tf, f"{key}.txt", caption.encode())
                else:
                    meta = {"caption" if s % 3 == 1 else "text": caption, "key": key, "status": "success"}
                    _add(tf, f"{key}.json", json.dumps(meta).encode())
                if n != corrupt:
                    samples[f"{s:05d}.tar/{key}"] = caption
    return samples


def _split_of(samples: dict, split: str) -> set:
    return {c for k, c in samples.items() if is_held_out_key(k) == (split == "test")}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "vqgpt.data"]


# ---------------------------------------------------------------------------------------------- specs


def test_brace_expansion():
    assert data._expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert data._expand_braces("{0..10}")[-2:] == ["9", "10"]  # no leading zero: no padding
    assert data._expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert data._expand_braces("{x}.tar") == ["{x}.tar"]


def test_folder_kinds(tmp_path):
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "00000.tar").write_bytes(b"")
    (tmp_path / "tars" / "00000_stats.json").write_text("{}")  # img2dataset's side files do not matter
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "00000.tar").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "a.png")
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "part-0.parquet").write_bytes(b"")
    assert data._resolve(str(tmp_path / "tars"))[0] == "webdataset"
    assert data._resolve(str(tmp_path / "mixed"))[0] == "folder"  # any image makes it an imagefolder
    assert data._resolve(str(tmp_path / "pq"))[0] == "parquet"
    assert data._resolve(str(tmp_path / "pq" / "part-0.parquet"))[0] == "parquet"


def test_pattern_that_matches_no_file(tmp_path, tmp_cache):
    for spec in ("x/{0..3}.tar", str(tmp_path / "*.parquet"), "nowhere/00000.tar"):
        with pytest.raises(ValueError, match=re.escape(f"--data '{spec}' matches no file")):
            load_captioned(spec)
    with pytest.raises(ValueError, match=r"names neither \.tar nor \.parquet"):
        load_captioned(str(tmp_path / "*.png"))
    with pytest.raises(ValueError, match="openmoji.*shapes.*local folder.*tar shards.*parquet.*hub"):
        load_captioned("bad name!")


# ------------------------------------------------------------------------------------------ tar shards


def test_tar_shards_brace_pattern_split_and_corrupt_member(tmp_path, tmp_cache, caplog):
    samples = _write_shards(tmp_path / "shards")
    spec = str(tmp_path / "shards" / "{00000..00002}.tar")
    with caplog.at_level(logging.WARNING, logger="vqgpt.data"):
        train = load_captioned(spec, "train")
    warnings = _warnings(caplog)
    n_train = len(_split_of(samples, "train")) + (not is_held_out_key("00001.tar/000010003"))
    assert warnings == [f"skipped 1 of {n_train} files in {spec}: unreadable (000010003.jpg)"]
    assert train.column_names == ["image", "text"]
    assert set(train["text"]) == _split_of(samples, "train") and len(train) == len(set(train["text"]))
    assert all(row["image"].mode == "RGB" for row in train)
    test = load_captioned(spec, "test")
    assert set(test["text"]) == _split_of(samples, "test") and test  # json captions ("caption", "text") too
    # a glob, the folder and a single shard are the same data
    assert list(load_captioned(str(tmp_path / "shards" / "*.tar"), "train")["text"]) == list(train["text"])
    assert list(load_captioned(str(tmp_path / "shards"), "train")["text"]) == list(train["text"])
    one = load_captioned(str(tmp_path / "shards" / "00002.tar"), "train")
    assert set(one["text"]) == {c for c in _split_of(samples, "train") if int(c.split()[1]) >= 20}
    tensors, captions = data.load_image_tensors(spec, "train", 16)
    assert tensors.shape == (len(train), 3, 16, 16) and captions == list(train["text"])
    codes, captions = load_codes(spec, "train", _StandInTokenizer())
    assert codes.shape == (len(train), 2, 2) and captions == list(train["text"])
    before = source_identity(spec)
    os.utime(tmp_path / "shards" / "00001.tar", ns=(1, 1))  # an edited shard is other data
    assert source_identity(spec)["files"] != before["files"] and before["kind"] == "webdataset"


def test_unreadable_tar_shards_are_named_and_skipped(tmp_path, tmp_cache, caplog):
    samples = _write_shards(tmp_path / "shards", n_shards=2, corrupt=None)
    raw = (tmp_path / "shards" / "00001.tar").read_bytes()
    (tmp_path / "shards" / "00002.tar").write_bytes(raw[: int(len(raw) * 0.6)])  # cut short
    (tmp_path / "shards" / "00003.tar").write_bytes(b"this is no tar archive" * 40)
    with caplog.at_level(logging.WARNING, logger="vqgpt.data"):
        ds = load_captioned(str(tmp_path / "shards" / "*.tar"), "train")
    assert set(ds["text"]) == _split_of(samples, "train")
    (warning,) = _warnings(caplog)
    assert "skipping 2 of 4 tar shards" in warning and "00002.tar" in warning and "00003.tar" in warning
    with pytest.raises(ValueError, match=r"no readable tar shard.*00003\.tar"):
        load_captioned(str(tmp_path / "shards" / "00003.tar"))


# ------------------------------------------------------------------------------------------- parquet


def _write_parquet(root, n_files: int = 3, rows: int = 20) -> dict:
    """Parquet files with an Image feature `image` and a `caption`; returns {caption: image bytes}."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    out = {}
    for f in range(n_files):
        images = [_image_bytes(f * rows + i, "PNG") for i in range(rows)]
        captions = [f"row {f * rows + i}" for i in range(rows)]
        out.update(zip(captions, images))
        ds = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in images], "caption": captions}, features=features
        )
        ds.to_parquet(str(root / f"part-{f}.parquet"))
    return out


def _content_split(rows: dict, split: str) -> set:
    return {c for c, b in rows.items() if is_held_out_key(hashlib.sha1(b).hexdigest()) == (split == "test")}


def test_parquet_image_feature_and_raw_bytes(tmp_path, tmp_cache, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _write_parquet(tmp_path / "pq")
    spec = str(tmp_path / "pq" / "*.parquet")
    train = load_captioned(spec, "train", caption_column="caption")
    test = load_captioned(str(tmp_path / "pq"), "test", caption_column="caption")
    assert set(train["text"]) == _content_split(rows, "train") and set(test["text"]) == _content_split(rows, "test")
    assert test and train[0]["image"].mode == "RGB"
    with pytest.raises(ValueError, match="no caption column 'text'"):
        load_captioned(spec)

    # a plain binary column (no Image feature) with a corrupt row: read as images, the bad row counted
    raw = [_image_bytes(i, "JPEG") for i in range(12)]
    raw[4] = raw[4][:40]
    table = pa.table({"jpg_bytes": pa.array(raw, pa.binary()), "alt": [f"alt {i}" for i in range(12)]})
    pq.write_table(table, tmp_path / "raw.parquet")
    with caplog.at_level(logging.WARNING, logger="vqgpt.data"):
        ds = load_captioned(str(tmp_path / "raw.parquet"), "train", image_column="jpg_bytes", caption_column="alt")
    keys = {f"alt {i}": hashlib.sha1(b).hexdigest() for i, b in enumerate(raw)}
    expected = {c for c, k in keys.items() if not is_held_out_key(k)} - {"alt 4"}
    assert set(ds["text"]) == expected and ds.column_names == ["image", "text"]
    assert any("unreadable" in w for w in _warnings(caplog)) == (not is_held_out_key(keys["alt 4"]))
    with pytest.raises(ValueError, match="holds .*string.*not images"):
        load_captioned(str(tmp_path / "raw.parquet"), image_column="alt", caption_column="alt")


# ----------------------------------------------------------------------------------------- streaming


def _texts(rows) -> list[str]:
    return [r["text"] for r in rows]


def test_streaming_parquet_by_rank(tmp_path, tmp_cache):
    """3 files on 2 ranks: every other row each (datasets' 'examples' strategy), together the loaded split."""
    rows = _write_parquet(tmp_path / "pq")
    (tmp_path / "pq" / "part-9.parquet").write_bytes(b"no parquet" * 50)  # skipped by the builder, named
    spec = str(tmp_path / "pq")
    whole = list(iter_captioned(spec, "train", caption_column="caption"))
    assert set(_texts(whole)) == set(load_captioned(spec, "train", caption_column="caption")["text"])
    assert set(_texts(whole)) == _content_split(rows, "train")
    assert all(isinstance(r["image"], Image.Image) and r["image"].mode == "RGB" for r in whole)
    parts = [_texts(iter_captioned(spec, "train", rank=r, world=2, caption_column="caption")) for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(_texts(whole))
    assert parts[0] == _texts(iter_captioned(spec, "train", rank=0, world=2, caption_column="caption"))  # same order
    assert len(_texts(iter_captioned(spec, "train", caption_column="caption", limit=7))) == 7
    with pytest.raises(ValueError, match="rank 2 is outside"):
        next(iter_captioned(spec, rank=2, world=2))


def test_streaming_tar_shards_by_rank(tmp_path, tmp_cache, caplog):
    """4 shards on 2 ranks: whole shards each ('shards' strategy); the corrupt member is skipped and counted."""
    samples = _write_shards(tmp_path / "shards", n_shards=4)
    spec = str(tmp_path / "shards" / "{00000..00003}.tar")
    with caplog.at_level(logging.WARNING, logger="vqgpt.data"):
        parts = [_texts(iter_captioned(spec, "train", rank=r, world=2)) for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == _split_of(samples, "train")
    shards = [{int(c.split()[1]) // PER_SHARD for c in part} for part in parts]
    assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]  # each rank read its own files
    reader = 0 if 1 in shards[0] else 1  # the rank that read the corrupt member (shard 1)
    assert [w for w in _warnings(caplog) if f"rank {reader} of 2" in w] == [
        f"skipped 1 of {len(parts[reader]) + 1} rows of {spec} (train split, rank {reader} of 2): "
        "unreadable (000010003.jpg)"
    ]
    assert set(_texts(iter_captioned(spec, "test"))) == set(load_captioned(spec, "test")["text"])
    # the embedded sets go through load_captioned, split the same way
    shapes = [_texts(iter_captioned("shapes", "test", rank=r, world=2, limit=8)) for r in (0, 1)]
    assert shapes[0] + shapes[1] == list(load_captioned("shapes", "test", limit=8)["text"])


# -------------------------------------------------------------------------------------- hub revisions


class _StandInTokenizer:
    image_size = 8

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (images.mean(1)[:, ::4, ::4] * 7.99).long()  # (B, 2, 2)

    def fingerprint(self) -> str:
        return "stand-in"


def test_hub_revision_reaches_the_loader_and_the_cache_key(tmp_path, tmp_cache, monkeypatch):
    """The hub path with the network replaced by local data: the revision goes to both `datasets` calls,
    streaming runs the same code as on local files, and the revision is part of the identity and code cache."""
    import datasets

    rows = _write_parquet(tmp_path / "pq", n_files=2)
    files = str(tmp_path / "pq" / "*.parquet")
    local = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_cache / "hf"))
    calls = []

    def fake_split_names(name, **kw):
        calls.append(("splits", name, kw))
        return ["train"]

    def fake_load_dataset(name, split, streaming=False, **kw):
        calls.append(("load", name, dict(kw, streaming=streaming)))
        return local.to_iterable_dataset(num_shards=2) if streaming else local

    monkeypatch.setattr(datasets, "get_dataset_split_names", fake_split_names)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    kw = dict(caption_column="caption", revision="v1.0")
    streamed = [_texts(iter_captioned("someone/set", "train", rank=r, world=2, **kw)) for r in (0, 1)]
    assert set(streamed[0]) | set(streamed[1]) == _content_split(rows, "train") and not set(streamed[0]) & set(
        streamed[1]
    )
    assert ("load", "someone/set", {"revision": "v1.0", "streaming": True}) in calls
    assert ("splits", "someone/set", {"revision": "v1.0"}) in calls
    loaded = load_captioned("someone/set", "train", **kw)
    held = {i for i in range(len(local)) if is_held_out_key(f"someone/set/{i}")}  # row numbers, as before
    assert set(loaded["text"]) == {local[i]["caption"] for i in range(len(local)) if i not in held}
    assert ("load", "someone/set", {"revision": "v1.0", "streaming": False}) in calls

    assert source_identity("someone/set", revision="v1.0") == {"kind": "hub", "spec": "someone/set", "revision": "v1.0"}
    assert source_identity("someone/set") != source_identity("someone/set", revision="v1.0")
    for revision in ("v1.0", "v2.0", "v1.0"):
        load_codes("someone/set", "train", _StandInTokenizer(), caption_column="caption", revision=revision)
    assert len(list((tmp_cache / "codes").glob("*.pt"))) == 2  # one entry per revision, the second v1.0 a hit
    with pytest.raises(ValueError, match="hub datasets only"):
        load_captioned("shapes", revision="main")


# ------------------------------------------------------------------------------- hostile data folders


class _Timeout(BaseException):  # not an Exception: no `except Exception` may swallow it
    pass


@pytest.fixture
def alarm():
    """Fail instead of hanging: a blocking open() of a FIFO is interrupted after 60 s."""

    def on_alarm(signum, frame):
        raise _Timeout("hung on a data folder")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifo_socket_and_dangling_link_in_a_folder(tmp_path, tmp_cache, caplog, alarm):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = [f"img{i:02d}.png" for i in range(20)]
    for i, n in enumerate(names):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / n)
    os.mkfifo(folder / "pipe.png")  # listed in the metadata: opening it would block forever
    os.mkfifo(folder / "unlisted.png")
    os.symlink(tmp_path / "gone.png", folder / "dangling.png")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "sock.png"))
    listed = names + ["pipe.png", "dangling.png"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in listed))
    try:
        with caplog.at_level(logging.WARNING, logger="vqgpt.data"):
            ds = load_captioned(str(folder), "train")
            identity = source_identity(str(folder))
    finally:
        sock.close()
    assert set(ds["text"]) == {n for n in names if not is_held_out_key(n)}
    warnings = _warnings(caplog)
    assert any("ignored 4 entries" in w and "pipe.png" in w and "sock.png" in w for w in warnings), warnings
    odd = [n for n in ("pipe.png", "dangling.png") if not is_held_out_key(n)]
    skip = [w for w in warnings if w.startswith("skipped")]
    assert all(n in skip[0] for n in odd) if odd else not skip
    assert identity["kind"] == "folder" and identity["files"]


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims another size (its pixel data is too short for it): enough to be
    rejected by size before any decoding, without making a huge file."""
    png = bytearray(_image_bytes(0, "PNG"))
    ihdr = png[16:29]
    ihdr[0:8] = struct.pack(">II", width, height)
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(png)


def test_absurd_aspect_and_huge_images_are_skipped(tmp_path, tmp_cache, caplog):
    folder = tmp_path / "shapes"
    folder.mkdir()
    names = [f"ok{i:02d}.png" for i in range(20)]
    for n in names:
        Image.new("RGB", (16, 12)).save(folder / n)
    strip_names = [f"strip{i}.png" for i in range(4)]  # several: the hash keeps some in train
    for n in strip_names:
        Image.new("L", (1_000_000, 1), 128).save(folder / n)  # 1 MB of pixels, 16 GB if squared up to 1e6
    big_names = [f"big{i}.png" for i in range(4)]
    for n in big_names:
        (folder / n).write_bytes(_png_claiming(8193, 8193))
    everything = names + strip_names + big_names
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in everything))
    with caplog.at_level(logging.WARNING, logger="vqgpt.data"):
        x, captions = data.load_image_tensors(str(folder), "train", 8)
    assert set(captions) == {n for n in names if not is_held_out_key(n)} and x.shape == (len(captions), 3, 8, 8)
    (warning,) = _warnings(caplog)
    train_strips = [n for n in strip_names if not is_held_out_key(n)]
    train_big = [n for n in big_names if not is_held_out_key(n)]
    assert f"skipped {len(train_strips) + len(train_big)} of" in warning
    assert all(n in warning for n in train_strips + train_big)
    assert f"aspect ratio over {data.MAX_ASPECT}:1" in warning and "too large" in warning
