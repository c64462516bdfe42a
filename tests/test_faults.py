"""What survives what: divergence, a second run into an existing --out, two writers on one run directory."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vqgpt.checkpoint import CheckpointManager, claim_run_dir

ROOT = Path(__file__).resolve().parents[1]
TOK = ["--preset", "tiny", "--batch-size", "8", "--eval-every", "1000", "--log-every", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-folder")
    lines = []
    for i in range(24):
        im = Image.new("RGB", (32, 32), "white")
        im.paste((200, 40 * (i % 6), 30), (2 + i % 5, 8, 14 + i % 5, 20))
        im.save(root / f"img{i:02d}.png")
        lines.append(json.dumps({"file_name": f"img{i:02d}.png", "text": f"a square number {i % 4}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def train(*args, cache, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "VQGPT_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def one_line_error(r, contains: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and contains in errors[0], r.stderr[-2000:]


def test_divergence_keeps_the_good_checkpoints_and_the_exported_model(folder, tmp_path):
    """The issue's reproduction: --lr 1e30 with a checkpoint every step. The step that blows the weights up has
    a finite loss of its own; no checkpoint holding its result may be written, prune a good one, or replace the
    exported model, and --resume from what is left trains on."""
    cache, out = tmp_path / "cache", tmp_path / "tok"
    train("tokenizer", "--data", folder, "--out", out, "--steps", "6", "--save-every", "2", *TOK, cache=cache)
    good = {c.step: c.weights() for c in CheckpointManager(out).list()}
    assert sorted(good) == [2, 4, 6]
    exported = load_file(str(out / "model.safetensors"))
    r = train(
        "tokenizer",
        "--data",
        folder,
        "--resume",
        out,
        "--steps",
        "60",
        "--save-every",
        "1",
        "--lr",
        "1e30",
        *TOK,
        cache=cache,
        check=False,
    )
    one_line_error(r, "non-finite loss or gradient")
    left = CheckpointManager(out).list()
    assert [c.step for c in left] == [2, 4, 6], [c.step for c in left]
    for c in left:
        assert CheckpointManager.verify(c) is None
        assert all(torch.equal(good[c.step][k], v) for k, v in c.weights().items())
    assert all(torch.equal(exported[k], v) for k, v in load_file(str(out / "model.safetensors")).items())
    # what the stop message promises: --resume (with a sane learning rate) continues from step 6
    r = train("tokenizer", "--data", folder, "--resume", out, "--steps", "8", *TOK, cache=cache)
    assert "from step 6" in r.stdout + r.stderr
    assert CheckpointManager(out).require_latest().step == 8


def test_a_new_run_into_an_existing_out_is_refused_unless_asked(folder, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "tok"
    train("tokenizer", "--data", folder, "--out", out, "--steps", "4", "--save-every", "4", *TOK, cache=cache)
    before = load_file(str(out / "model.safetensors"))
    r = train("tokenizer", "--data", folder, "--out", out, "--steps", "2", *TOK, cache=cache, check=False)
    one_line_error(r, "already holds a run")
    assert "--resume" in r.stderr and "--overwrite" in r.stderr
    assert all(torch.equal(before[k], v) for k, v in load_file(str(out / "model.safetensors")).items())
    assert [c.step for c in CheckpointManager(out).list()] == [4]

    # --overwrite replaces the whole run: none of the old run's checkpoints is left to be resumed
    train(
        "tokenizer",
        "--data",
        folder,
        "--out",
        out,
        "--steps",
        "2",
        "--save-every",
        "2",
        "--overwrite",
        *TOK,
        cache=cache,
    )
    assert [c.step for c in CheckpointManager(out).list()] == [2]

    # --resume without --out resumes that directory; a missing one is named, not silently replaced by --out
    r = train("tokenizer", "--data", folder, "--resume", tmp_path / "nope", *TOK, cache=cache, check=False)
    one_line_error(r, "no such run directory")
    assert not (tmp_path / "nope").exists()
    r = train(
        "tokenizer", "--data", folder, "--resume", out, "--out", tmp_path / "other", *TOK, cache=cache, check=False
    )
    assert r.returncode == 2 and "differ" in r.stderr


def test_two_writers_on_one_run_directory(folder, tmp_path):
    """A second process on a run directory that one is training into stops at once, naming the holder, and
    leaves the first one's files alone; the lock goes with its holder."""
    cache, out = tmp_path / "cache", tmp_path / "tok"
    with claim_run_dir(out, resume=False, overwrite=False):  # this test process is the first writer
        (out / "marker").write_text("mine")
        r = train("tokenizer", "--data", folder, "--out", out, "--steps", "2", *TOK, cache=cache, check=False)
        one_line_error(r, "is training into")
        assert f"pid {os.getpid()}" in r.stderr
        with pytest.raises(ValueError, match="is training into"):  # in-process too
            with claim_run_dir(out, resume=True, overwrite=False):
                pass
    assert (out / "marker").read_text() == "mine" and not (out / "checkpoints").exists()

    # a writer killed with SIGKILL holds nothing: the kernel drops its lock
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from vqgpt.checkpoint import claim_run_dir\n"
                f"with claim_run_dir({str(out)!r}, resume=False, overwrite=False):\n"
                "    print('held', flush=True); time.sleep(60)"
            ),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=f"pid {holder.pid}"):
        with claim_run_dir(out, resume=False, overwrite=False):
            pass
    holder.kill()
    holder.wait()
    time.sleep(0.1)
    train("tokenizer", "--data", folder, "--out", out, "--steps", "2", "--save-every", "2", *TOK, cache=cache)
    assert CheckpointManager(out).require_latest().step == 2


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["tokenizer", "--clip", "-1"], "--clip"),
        (["tokenizer", "--clip", "nan"], "--clip"),
        (["gpt", "--batch-size", "0"], "--batch-size"),
        (["tokenizer", "--steps", "0"], "--steps"),
        (["tokenizer", "--image-size", "0"], "--image-size"),
        (["gpt", "--text-len", "0"], "--text-len"),
        (["tokenizer", "--grad-accum", "0"], "--grad-accum"),
        (["gpt", "--save-every", "0"], "--save-every"),
        (["gpt", "--eval-every", "0"], "--eval-every"),
        (["tokenizer", "--log-every", "0"], "--log-every"),
        (["gpt", "--lr", "inf"], "--lr"),
        (["tokenizer", "--fsq-levels", "0"], "--fsq-levels"),
    ],
)
def test_flags_that_would_train_nothing_are_refused_naming_the_flag(flags, flag, tmp_path):
    r = train(*flags, "--out", tmp_path / "run", cache=tmp_path / "cache", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: {flag} must" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_eval_and_sample_errors_are_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VQGPT_CACHE": str(tmp_path / "cache")}
    for cmd, says in (
        (["-m", "vqgpt.eval", "tokenizer", "--ckpt", tmp_path / "nope"], "no tokenizer directory"),
        (["-m", "vqgpt.eval", "recall", "--ckpt", tmp_path, "--device", "cuda"], "CUDA"),
        (
            ["sample.py", "--ckpt", tmp_path / "nope", "--prompt", "x", "--out", tmp_path / "g.png"],
            "no text-to-image model directory",
        ),
    ):
        r = subprocess.run(
            [sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
        )
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().startswith("error:") and says in r.stderr, r.stderr[-2000:]


def test_a_corrupt_cache_file_is_rebuilt_not_a_traceback(tmp_path, monkeypatch, caplog):
    from vqgpt import data

    bad = tmp_path / "x.pt"
    bad.write_bytes(b"\x80\x04garbage that is not a pickle")
    assert data._try_torch_load(bad) is None
    assert "ignoring unreadable cache file" in caplog.text


def test_prompts_that_are_not_text_are_refused(tmp_path):
    from vqgpt.generate import SamplingConfig
    from vqgpt.model import GPT, gpt_config
    from vqgpt.pipeline import TextToImage
    from vqgpt.text import TextTokenizer
    from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

    tok = ImageTokenizer(tokenizer_config("tiny", image_size=16, fsq_levels=(4, 4)))
    text = TextTokenizer.train(["a red square", "a blue circle"] * 5, vocab_size=300)
    gpt = GPT(
        gpt_config(
            "tiny",
            text_vocab_size=text.vocab_size,
            text_pad_id=text.pad_id,
            text_len=8,
            image_vocab_size=tok.codebook_size,
            image_grid=(tok.grid_size, tok.grid_size),
        )
    )
    pipe = TextToImage(gpt, tok, text, SamplingConfig())
    with pytest.raises(ValueError, match="not valid text"):
        pipe(["a \udcff square"])
    with pytest.raises(ValueError, match="must be strings"):
        pipe([b"bytes"])
    pipe.save_pretrained(tmp_path / "m")
    r = subprocess.run(
        [
            sys.executable,
            "sample.py",
            "--ckpt",
            str(tmp_path / "m"),
            "--prompt",
            "a \udcff square",
            "--out",
            str(tmp_path / "g.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert r.returncode != 0 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_a_catastrophic_caption_regex_is_an_error_not_a_hang():
    """A model's recorded --include is applied again by `eval recall`: a backtracking pattern must end."""
    from vqgpt.data import caption_filter

    assert caption_filter(["a cat", "a dog", "two cats"], "cat", "two") == [0]
    with pytest.raises(ValueError, match="took over"):
        caption_filter(["a" * 40 + "!"], r"(a|aa)+$x")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        caption_filter(["x"], "(")


def test_one_huge_caption_does_not_set_the_text_context(folder, tmp_path):
    """Among 24 captions, one of 20,000 characters: the fitted context stays capped and says what it cuts."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[3] = json.dumps({"file_name": "img03.png", "text": "word " * 4000})
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    train("tokenizer", "--data", data, "--out", tmp_path / "tok", "--steps", "2", *TOK, cache=cache)
    r = train(
        "gpt",
        "--data",
        data,
        "--tokenizer",
        tmp_path / "tok",
        "--out",
        tmp_path / "t2i",
        "--steps",
        "2",
        *TOK,
        cache=cache,
    )
    assert "will be truncated" in r.stdout, r.stdout[-2000:]
    config = json.loads((tmp_path / "t2i" / "config.json").read_text())
    assert config["gpt"]["text_len"] <= 256


def test_grid_labels_are_cut_and_a_local_looking_path_never_goes_to_the_hub(tmp_path, monkeypatch):
    from vqgpt.pipeline import MAX_LABEL, image_grid
    from vqgpt.tokenizer import ImageTokenizer

    grid = image_grid([torch.rand(2, 3, 16, 16)] * 3, labels=["x" * 100_000] * 3)
    assert grid.width < 16 + 6 * MAX_LABEL + 2 * 18 + 20
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the hub was asked for a local path")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(FileNotFoundError, match="the hub was not asked"):
        ImageTokenizer.from_pretrained("runs/tokk")


def test_a_lora_adapter_naming_itself_as_its_base_is_refused(tmp_path):
    from vqgpt.pipeline import TextToImage

    (tmp_path / "m" / "image_tokenizer").mkdir(parents=True)
    (tmp_path / "m" / "text_tokenizer").mkdir()
    (tmp_path / "m" / "adapter").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"model_type": "vqgpt-text-to-image", "gpt": {}, "base": {"path": ".", "gpt": "0" * 16}})
    )
    with pytest.raises((ValueError, FileNotFoundError)):
        TextToImage.from_pretrained(tmp_path / "m")
    from vqgpt.pipeline import load_base_gpt

    with pytest.raises(ValueError, match="not a plain model"):
        load_base_gpt(tmp_path / "m", {"base": {"path": ".", "gpt": "0"}}, None, "cpu")
