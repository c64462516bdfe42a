"""The scripts end to end on a tiny local imagefolder: train both stages, sample, evaluate, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 captioned 32x32 images: a coloured square on white, left or right."""
    root = tmp_path_factory.mktemp("folder")
    lines = []
    for i in range(40):
        name, rgb = list(COLORS.items())[i % 4]
        side = "left" if (i // 4) % 2 == 0 else "right"
        im = Image.new("RGB", (32, 32), "white")
        x0 = 2 + (i % 3) if side == "left" else 16 + (i % 3)
        im.paste(rgb, (x0, 8, x0 + 12, 20))
        im.save(root / f"img{i:02d}.png")
        lines.append(json.dumps({"file_name": f"img{i:02d}.png", "text": f"a {name} square on the {side}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run(*args, env=None, check=True, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    out = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


TOK = ["--preset", "tiny", "--batch-size", "8", "--eval-every", "1000", "--log-every", "5", "--device", "cpu"]
GPT = ["--preset", "tiny", "--batch-size", "8", "--eval-every", "1000", "--log-every", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cache = {"VQGPT_CACHE": str(runs / "cache")}
    run(
        "train.py",
        "tokenizer",
        "--data",
        folder,
        "--out",
        runs / "tok",
        "--steps",
        "30",
        "--fsq-levels",
        "5",
        "4",
        "3",
        *TOK,
        env=cache,
    )
    run(
        "train.py",
        "gpt",
        "--data",
        folder,
        "--tokenizer",
        runs / "tok",
        "--out",
        runs / "t2i",
        "--steps",
        "30",
        "--exclude",
        "yellow",
        *GPT,
        env=cache,
    )  # the recall test reads this filter back
    return runs, cache


def test_tokenizer_stage_writes_a_loadable_tokenizer(trained):
    from vqgpt import ImageTokenizer

    runs, cache = trained
    tok = ImageTokenizer.from_pretrained(runs / "tok")
    assert tok.image_size == 32 and tok.codebook_size == 5 * 4 * 3  # --fsq-levels over the preset's (4, 4, 4)
    assert (runs / "tok" / "samples").is_dir() and list((runs / "tok" / "checkpoints").iterdir())


def test_eval_tokenizer_prints_json(trained, folder):
    runs, cache = trained
    out = run("-m", "vqgpt.eval", "tokenizer", "--ckpt", runs / "tok", "--data", folder, "--device", "cpu", env=cache)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"psnr", "ssim", "usage", "perplexity", "encode_images_per_s"} <= set(result)
    assert 0 < result["usage"] <= 1 and result["psnr"] > 5


def test_gpt_stage_and_sampling(trained, tmp_path):
    from vqgpt import TextToImage

    runs, cache = trained
    pipe = TextToImage.from_pretrained(runs / "t2i")
    a = pipe(["a red square on the left"], num_images=2, seed=3, cfg_scale=2.0, top_k=8).images
    b = pipe(["a red square on the left"], num_images=2, seed=3, cfg_scale=2.0, top_k=8).images
    assert [im.size for im in a] == [(32, 32)] * 2
    assert all(list(x.getdata()) == list(y.getdata()) for x, y in zip(a, b))
    out = run(
        "sample.py",
        "--ckpt",
        runs / "t2i",
        "--prompt",
        "a red square on the left",
        "--prompt",
        "a blue square",
        "--n",
        "2",
        "--top-k",
        "8",
        "--out",
        tmp_path / "grid.png",
        "--compile",
        env=cache,
    )  # compiled step
    assert (tmp_path / "grid.png").is_file() and "images/s" in out.stdout
    assert len(list(tmp_path.glob("grid-*.png"))) == 4
    bad = run(
        "sample.py",
        "--ckpt",
        runs / "t2i",
        "--prompt",
        "x",
        "--top-k",
        "0",
        "--out",
        tmp_path / "g.png",
        check=False,
        env=cache,
    )
    assert bad.returncode != 0 and "top_k" in bad.stderr and "Traceback" not in bad.stderr
    # --batch-size bounds the rows sampled at once (and the KV cache); the images do not depend on it
    prompts = ["a red square on the left", "a blue square", "a green square on the right"]
    one = pipe.generate_codes(prompts, num_images=3, seed=5, top_k=8, batch_size=1)
    assert torch.equal(one, pipe.generate_codes(prompts, num_images=3, seed=5, top_k=8, batch_size=64))
    many = pipe(prompts, num_images=3, seed=5, top_k=8, batch_size=64).images
    import numpy as np

    def close(x, y):  # the decoder's convolutions may round differently at another batch size: 1 level of 255
        return np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1

    cli = tmp_path / "cli"
    run(
        "sample.py",
        "--ckpt",
        runs / "t2i",
        *[a for p in prompts for a in ("--prompt", p)],
        "--n",
        "3",
        "--seed",
        "5",
        "--top-k",
        "8",
        "--batch-size",
        "2",
        "--out",
        cli / "grid.png",
        env=cache,
    )
    from PIL import Image

    for i in range(3):
        for j in range(3):
            (path,) = cli.glob(f"grid-{i:02d}-{j}-*.png")
            assert close(Image.open(path), many[i * 3 + j])
    # bad --out, --batch-size and seeds are refused before any sampling, in one line
    for flags, says in (
        (["--out", tmp_path], "is a directory"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seed", str(2**64)], "--seed"),
    ):
        bad = run("sample.py", "--ckpt", runs / "t2i", "--prompt", "x", *flags, check=False, env=cache)
        assert bad.returncode != 0 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-1500:]


def test_recall_samples_the_captions_the_model_was_trained_on(trained, folder, monkeypatch):
    from vqgpt import data

    runs, cache = trained
    monkeypatch.setenv("VQGPT_CACHE", cache["VQGPT_CACHE"])
    _, captions = data.load_image_tensors(str(folder), "train", 32)
    kept = len(data.caption_filter(captions, exclude="yellow"))
    assert 0 < kept < len(captions)
    saved = json.loads((runs / "t2i" / "config.json").read_text())["trained_on"]
    assert saved == {"data": str(folder), "include": None, "exclude": "yellow", "limit": None}
    out = run("-m", "vqgpt.eval", "recall", "--ckpt", runs / "t2i", "--n", "4", "--device", "cpu", env=cache)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["data"] == str(folder) and result["train_images"] == kept  # --data defaults to the model's own
    assert result["caption_filter"] == {"include": None, "exclude": "yellow"}
    assert len(result["prompts"]) == 4 and not any("yellow" in p for p in result["prompts"] + result["nearest"])
    assert result["hits"] == sum(p == q for p, q in zip(result["prompts"], result["nearest"]))


def test_mismatched_checkpoint_is_a_clear_error(trained, tmp_path):
    import shutil

    from vqgpt import TextToImage

    runs, _ = trained
    broken = tmp_path / "t2i"
    shutil.copytree(runs / "t2i", broken)
    config = json.loads((broken / "image_tokenizer" / "config.json").read_text())
    config["fsq_levels"] = [4, 4, 3]  # another codebook: 48 codes where the GPT predicts 60
    (broken / "image_tokenizer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image tokenizer this GPT was trained with|codebook"):
        TextToImage.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="not a TextToImage checkpoint"):
        TextToImage.from_pretrained(runs / "tok")


def _final_weights(run_dir):
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if (run_dir / "adapter").is_dir():  # a LoRA run exports its adapters only
        return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def new_folder(tmp_path_factory):
    """24 images of two colours the `folder` model never saw: purple and orange squares."""
    root = tmp_path_factory.mktemp("new_folder")
    lines = []
    for i in range(24):
        name, rgb = [("purple", (150, 40, 200)), ("orange", (250, 140, 20))][i % 2]
        side = "left" if (i // 2) % 2 == 0 else "right"
        im = Image.new("RGB", (32, 32), "white")
        x0 = 3 if side == "left" else 17
        im.paste(rgb, (x0, 8, x0 + 12, 20))
        im.save(root / f"new{i:02d}.png")
        lines.append(json.dumps({"file_name": f"new{i:02d}.png", "text": f"a {name} square on the {side}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("stage", ["tokenizer", "gpt", "lora"])
def test_killed_run_resumes_to_identical_weights(stage, trained, folder, new_folder, tmp_path):
    """SIGKILL mid-run, then --resume: the final weights equal those of an uninterrupted run, bit for bit."""
    runs, cache = trained
    if stage == "tokenizer":
        flags = [stage, "--data", str(folder), *TOK]
    elif stage == "gpt":
        flags = [stage, "--data", str(folder), *GPT, "--tokenizer", str(runs / "tok")]
    else:  # LoRA fine-tuning: only the adapters are checkpointed, the base is reloaded and checked on resume
        flags = [
            "gpt",
            "--data",
            str(new_folder),
            *GPT,
            "--init",
            str(runs / "t2i"),
            "--lora-rank",
            "4",
            "--add-text-tokens",
            "4",
        ]
    common = [*flags, "--steps", "24", "--save-every", "4"]
    run("train.py", *common, "--out", tmp_path / "straight", env=cache)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **cache}
    proc = subprocess.Popen(
        [sys.executable, "train.py", *common, "--out", str(tmp_path / "killed")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name >= "step-00000008" for p in ckpts.glob("step-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(p.name for p in ckpts.glob("step-*"))
    assert steps and steps[-1] < "step-00000024", f"the run was not killed mid-way: {steps}"
    run("train.py", *common, "--out", tmp_path / "killed", "--resume", tmp_path / "killed", env=cache)

    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"


def test_torchrun_two_processes_match_one(trained, folder, tmp_path):
    """Data-parallel on 2 CPU processes (gloo) follows the single-process run with the same global batch.

    Caption dropout is off so both see exactly the same examples per step; what remains is the order of
    floating-point reductions (per-rank means averaged by the all-reduce), so weights agree to ~1e-5.
    """
    runs, cache = trained
    common = [
        "gpt",
        "--data",
        str(folder),
        "--tokenizer",
        str(runs / "tok"),
        "--steps",
        "10",
        "--save-every",
        "10",
        "--cfg-dropout",
        "0",
        *GPT,
        "--precision",
        "fp32",
    ]  # bf16 rounding would swamp reduction order
    run("train.py", *common, "--out", tmp_path / "one", env=cache)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **cache}
    out = subprocess.run(
        [*torchrun, "train.py", *common, "--out", str(tmp_path / "two")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, f"2-process weights differ from 1-process weights by up to {worst:.2e}"


def test_fsdp_two_processes_match_one_and_resume(trained, folder, tmp_path):
    """--fsdp (FSDP2 over 2 gloo ranks): same weights as one process, and a sharded resume continues it."""
    runs, cache = trained
    common = [
        "gpt",
        "--data",
        str(folder),
        "--tokenizer",
        str(runs / "tok"),
        "--steps",
        "8",
        "--save-every",
        "4",
        "--cfg-dropout",
        "0",
        *GPT,
        "--precision",
        "fp32",
    ]  # bf16 rounding would swamp reduction order
    run("train.py", *common, "--out", tmp_path / "one", env=cache)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *common, "--fsdp"]
    run(*torchrun, "--out", tmp_path / "fsdp", env=cache)
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "fsdp")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, f"FSDP weights differ from 1-process weights by up to {worst:.2e}"
    # Resume the sharded run from its step-4 checkpoint: it must end where it ended before.
    import shutil

    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-00000008")
    run(*torchrun, "--out", tmp_path / "fsdp", "--resume", tmp_path / "fsdp", env=cache)
    c = _final_weights(tmp_path / "fsdp")
    worst = max((b[k] - c[k]).abs().max().item() for k in b)
    assert worst < 1e-6, f"resumed FSDP run differs by up to {worst:.2e}"


def test_diverging_run_stops_with_a_clear_message_and_keeps_its_checkpoint(folder, tmp_path):
    """A learning rate of 1e30 blows the weights up after the first steps: every later loss is non-finite, each
    such step is skipped, and after 20 in a row the run stops with one line; the last good checkpoint is intact."""
    cache = {"VQGPT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "nan"
    run("train.py", "tokenizer", "--data", folder, "--out", out, "--steps", "4", "--save-every", "4", *TOK, env=cache)
    good = _final_weights(out)
    bad = run(
        "train.py",
        "tokenizer",
        "--data",
        folder,
        "--out",
        out,
        "--resume",
        out,
        "--steps",
        "60",
        "--save-every",
        "100",
        "--lr",
        "1e30",
        "--warmup",
        "1",
        *TOK,
        check=False,
        env=cache,
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "non-finite loss or gradient" in bad.stderr and "last good checkpoint is intact" in bad.stderr
    assert "Traceback" not in bad.stderr
    from vqgpt.checkpoint import CheckpointManager

    ckpt = CheckpointManager(out).require_latest()
    assert ckpt.step == 4 and all(torch.equal(good[k], v) for k, v in ckpt.weights().items())


def test_bad_arguments_are_one_line_errors(folder, tmp_path):
    cache = {"VQGPT_CACHE": str(tmp_path / "cache")}
    r = run("train.py", "tokenizer", "--data", tmp_path / "nope", "--out", tmp_path / "x", *TOK, check=False, env=cache)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = run(
        "train.py", "tokenizer", "--data", folder, "--preset", "huge", "--out", tmp_path / "x", check=False, env=cache
    )
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr  # checked before any data work
    r = run(
        "train.py",
        "gpt",
        "--data",
        folder,
        "--resume",
        tmp_path / "x",
        "--out",
        tmp_path / "x",
        *GPT,
        check=False,
        env=cache,
    )
    assert r.returncode == 2 and "no usable checkpoint" in r.stderr


def test_patchgan_loss_trains_and_resumes(folder, tmp_path):
    """The optional PatchGAN hinge loss switches on after --gan-start; its discriminator is checkpointed."""
    cache = {"VQGPT_CACHE": str(tmp_path / "cache")}
    args = [
        "train.py",
        "tokenizer",
        "--data",
        folder,
        "--out",
        tmp_path / "gan",
        "--gan-weight",
        "0.1",
        "--gan-start",
        "2",
        "--save-every",
        "3",
        *TOK,
    ]
    run(*args, "--steps", "3", env=cache)
    from vqgpt.checkpoint import CheckpointManager

    state = CheckpointManager(tmp_path / "gan").require_latest().trainer_state()
    assert "disc" in state and "disc_optimizer" in state
    out = run(*args, "--steps", "6", "--resume", tmp_path / "gan", env=cache)
    assert "resuming" in out.stdout


def test_perceptual_loss_uses_local_weights_and_names_bad_ones(folder, tmp_path):
    """The perceptual loss runs from a local VGG16 weights file (random ones here: the real ones cannot be
    downloaded on this machine) and a wrong file is a one-line error naming the problem."""
    from safetensors.torch import save_file

    from vqgpt.perceptual import PerceptualLoss, vgg16_features

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    save_file(state, str(tmp_path / "vgg.safetensors"))
    loss = PerceptualLoss(str(tmp_path / "vgg.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    assert loss(x, x).item() == 0 and loss(x, x.flip(-1)).item() > 0

    cache = {"VQGPT_CACHE": str(tmp_path / "cache")}
    args = ["train.py", "tokenizer", "--data", folder, "--out", tmp_path / "p", "--steps", "2", *TOK]
    run(*args, "--perceptual-weights", tmp_path / "vgg.safetensors", env=cache)
    save_file({"features.0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    bad = run(*args, "--perceptual-weights", tmp_path / "bad.safetensors", "--overwrite", check=False, env=cache)
    assert bad.returncode == 2 and "misshapen" in bad.stderr and "Traceback" not in bad.stderr


def test_finetune_full_and_lora_with_new_words(trained, new_folder, tmp_path):
    """--init continues a trained model on new captions: new words get tokens (old ids unchanged); a LoRA run
    saves only adapters, loads as base + adapter, merges to a plain checkpoint with the same outputs, and
    refuses a base that is not its own."""
    from vqgpt import TextToImage

    runs, cache = trained
    base = TextToImage.from_pretrained(runs / "t2i")
    ft = ["gpt", "--data", new_folder, "--init", runs / "t2i", "--steps", "6", "--add-text-tokens", "4", *GPT]
    out = run("train.py", *ft, "--out", tmp_path / "full", env=cache)
    assert "text vocabulary: +2 tokens" in out.stdout and '"trainable_fraction": 1.0' in out.stdout
    full = TextToImage.from_pretrained(tmp_path / "full")
    old = "a red square on the left"
    n = base.gpt.config.text_len
    assert torch.equal(full.text_tokenizer([old], n), base.text_tokenizer([old], n))  # old ids keep their meaning
    assert full.text_tokenizer(["purple"], 4)[0, 0] == base.text_tokenizer.vocab_size  # one new token
    assert full.gpt.config.text_vocab_size == base.gpt.config.text_vocab_size + 2

    out = run("train.py", *ft, "--lora-rank", "4", "--out", tmp_path / "lora", "--lr", "1e-2", env=cache)
    cost = json.loads(out.stdout.split("cost: ")[1].splitlines()[0])
    assert 0 < cost["trainable_fraction"] < 0.5 and cost["peak_memory_mb"] > 0 and cost["step_ms"] > 0
    assert not (tmp_path / "lora" / "model.safetensors").exists()
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    lora = TextToImage.from_pretrained(tmp_path / "lora", merge=False)
    merged_out = run(
        "-m", "vqgpt.finetune", "merge", "--ckpt", tmp_path / "lora", "--out", tmp_path / "merged", env=cache
    )
    assert json.loads(merged_out.stdout.strip().splitlines()[-1])["merged"] == str(tmp_path / "merged")
    merged = TextToImage.from_pretrained(tmp_path / "merged")
    assert "base" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    text = lora.text_tokenizer(["a purple square on the left", old], lora.gpt.config.text_len)
    codes = torch.randint(0, lora.gpt.config.image_vocab_size, (2, 16))
    with torch.no_grad():
        a, b = lora.gpt(text, codes), merged.gpt(text, codes)
        before = base.gpt(base.text_tokenizer([old], n), codes[1:])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[1:], before, atol=1e-4), "the adapters changed nothing"
    with pytest.raises(ValueError, match="not the base the adapter"):
        TextToImage.from_pretrained(tmp_path / "lora", base=tmp_path / "full")
    bad = run(
        "train.py",
        "gpt",
        "--data",
        new_folder,
        "--lora-rank",
        "4",
        "--out",
        tmp_path / "x",
        *GPT,
        "--tokenizer",
        runs / "tok",
        check=False,
        env=cache,
    )
    assert bad.returncode == 2 and "--lora-rank needs --init" in bad.stderr
