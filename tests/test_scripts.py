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
    out = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


TOK = ["--preset", "tiny", "--batch-size", "8", "--eval-every", "1000", "--log-every", "5", "--device", "cpu"]
GPT = ["--preset", "tiny", "--batch-size", "8", "--eval-every", "1000", "--log-every", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cache = {"VQGPT_CACHE": str(runs / "cache")}
    run("train.py", "tokenizer", "--data", folder, "--out", runs / "tok", "--steps", "30", *TOK, env=cache)
    run("train.py", "gpt", "--data", folder, "--tokenizer", runs / "tok", "--out", runs / "t2i", "--steps", "30",
        *GPT, env=cache)
    return runs, cache


def test_tokenizer_stage_writes_a_loadable_tokenizer(trained):
    from vqgpt import ImageTokenizer

    runs, cache = trained
    tok = ImageTokenizer.from_pretrained(runs / "tok")
    assert tok.image_size == 32 and tok.codebook_size == 64
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
    a = pipe(["a red square on the left"], num_images=2, seed=3, cfg_scale=2.0, top_k=8)
    b = pipe(["a red square on the left"], num_images=2, seed=3, cfg_scale=2.0, top_k=8)
    assert [im.size for im in a] == [(32, 32)] * 2
    assert all(list(x.getdata()) == list(y.getdata()) for x, y in zip(a, b))
    out = run("sample.py", "--ckpt", runs / "t2i", "--prompt", "a red square on the left", "--prompt", "a blue square",
              "--n", "2", "--top-k", "8", "--out", tmp_path / "grid.png", env=cache)
    assert (tmp_path / "grid.png").is_file() and "images/s" in out.stdout
    assert len(list(tmp_path.glob("grid-*.png"))) == 4
    bad = run("sample.py", "--ckpt", runs / "t2i", "--prompt", "x", "--top-k", "0", "--out", tmp_path / "g.png",
              check=False, env=cache)
    assert bad.returncode != 0 and "top_k" in bad.stderr and "Traceback" not in bad.stderr


def test_mismatched_checkpoint_is_a_clear_error(trained, tmp_path):
    import shutil

    from vqgpt import TextToImage

    runs, _ = trained
    broken = tmp_path / "t2i"
    shutil.copytree(runs / "t2i", broken)
    cfg = json.loads((broken / "image_tokenizer" / "config.json").read_text())
    cfg["fsq_levels"] = [4, 4, 3]  # another codebook: 48 codes where the GPT predicts 64
    (broken / "image_tokenizer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="image tokenizer this GPT was trained with|codebook"):
        TextToImage.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="not a TextToImage checkpoint"):
        TextToImage.from_pretrained(runs / "tok")


def _final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


@pytest.mark.parametrize("stage", ["tokenizer", "gpt"])
def test_killed_run_resumes_to_identical_weights(stage, trained, folder, tmp_path):
    """SIGKILL mid-run, then --resume: the final weights equal those of an uninterrupted run, bit for bit."""
    runs, cache = trained
    flags = TOK if stage == "tokenizer" else [*GPT, "--tokenizer", str(runs / "tok")]
    common = [stage, "--data", str(folder), "--steps", "24", "--save-every", "4", *flags]
    run("train.py", *common, "--out", tmp_path / "straight", env=cache)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **cache}
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--out", str(tmp_path / "killed")], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    common = ["gpt", "--data", str(folder), "--tokenizer", str(runs / "tok"), "--steps", "10", "--save-every", "10",
              "--cfg-dropout", "0", *GPT]
    run("train.py", *common, "--out", tmp_path / "one", env=cache)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **cache}
    out = subprocess.run([*torchrun, "train.py", *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, f"2-process weights differ from 1-process weights by up to {worst:.2e}"


def test_fsdp_two_processes_match_one_and_resume(trained, folder, tmp_path):
    """--fsdp (FSDP2 over 2 gloo ranks): same weights as one process, and a sharded resume continues it."""
    runs, cache = trained
    common = ["gpt", "--data", str(folder), "--tokenizer", str(runs / "tok"), "--steps", "8", "--save-every", "4",
              "--cfg-dropout", "0", *GPT]
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
    bad = run("train.py", "tokenizer", "--data", folder, "--out", out, "--resume", out, "--steps", "60",
              "--save-every", "100", "--lr", "1e30", "--warmup", "1", *TOK, check=False, env=cache)
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
    r = run("train.py", "tokenizer", "--data", folder, "--preset", "huge", "--out", tmp_path / "x", check=False,
            env=cache)
    assert r.returncode == 2 and "unknown tokenizer preset 'huge'" in r.stderr
    r = run("train.py", "gpt", "--data", folder, "--resume", tmp_path / "x", "--out", tmp_path / "x", *GPT,
            check=False, env=cache)
    assert r.returncode == 2 and "no usable checkpoint" in r.stderr


def test_patchgan_loss_trains_and_resumes(folder, tmp_path):
    """The optional PatchGAN hinge loss switches on after --gan-start; its discriminator is checkpointed."""
    cache = {"VQGPT_CACHE": str(tmp_path / "cache")}
    args = ["train.py", "tokenizer", "--data", folder, "--out", tmp_path / "gan", "--gan-weight", "0.1",
            "--gan-start", "2", "--save-every", "3", *TOK]
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
    bad = run(*args, "--perceptual-weights", tmp_path / "bad.safetensors", check=False, env=cache)
    assert bad.returncode == 2 and "misshapen" in bad.stderr and "Traceback" not in bad.stderr
