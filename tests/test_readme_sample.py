"""The README's sampling command and snippet, run as written on a small model trained as the demo trains its own
(memorising, with the demo's saved sampling defaults): they must draw the prompted drawings, not noise."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40)}
SIZE = 16  # pixels: a 4x4 code grid, so that both stages learn these drawings in seconds


def readme_sample_commands() -> list[list[str]]:
    """The README's complete `python sample.py --ckpt runs/t2i ...` lines, comments cut, as argv lists."""
    start = "python sample.py --ckpt runs/t2i "
    lines = [line.split(" #")[0] for line in README.splitlines() if line.startswith(start)]
    return [shlex.split(line) for line in lines]


def readme_snippet_kwargs() -> str:
    """What the README's Python snippet passes to `pipe([...], ...)` after the prompt list."""
    calls = re.findall(r"^out = pipe\(\[[^\]]*\](.*?)\)\s*(?:#.*)?$", README, flags=re.M)
    assert calls, "the README shows no `out = pipe([...], ...)` call"
    return calls[0]  # the quick start's, the first


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """40 captioned drawings (8 captions: a coloured square on white, left or right) and a model trained on them
    through train.py, with the demo's own sampling defaults (train.DEMO_GPT_ARGS, less its caption filter)."""
    root = tmp_path_factory.mktemp("readme")
    folder = root / "folder"
    folder.mkdir()
    lines = []
    for i in range(40):
        name, rgb = list(COLORS.items())[i % 4]
        side = "left" if (i // 4) % 2 == 0 else "right"
        im = Image.new("RGB", (32, 32), "white")
        x0 = 2 + (i % 3) if side == "left" else 16 + (i % 3)
        im.paste(rgb, (x0, 8, x0 + 12, 20))
        im.save(folder / f"img{i:02d}.png")
        lines.append(f'{{"file_name": "img{i:02d}.png", "text": "a {name} square on the {side}"}}')
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VQGPT_CACHE", str(root / "cache"))
        mp.syspath_prepend(str(ROOT))
        import train

        pairs = list(zip(train.DEMO_GPT_ARGS[::2], train.DEMO_GPT_ARGS[1::2]))
        demo_sampling = [a for flag, value in pairs if flag.startswith("--sample-") for a in (flag, value)]
        assert "--sample-temperature" in demo_sampling  # the demo saves a low temperature with its model
        common = [
            "--data",
            str(folder),
            "--preset",
            "tiny",
            "--batch-size",
            "16",
            "--eval-every",
            "1000",
            "--save-every",
            "1000",
            "--log-every",
            "50",
            "--device",
            "cpu",
            "--wandb",
            "disabled",
        ]
        train.main(
            [
                "tokenizer",
                *common,
                "--out",
                str(root / "tok"),
                "--image-size",
                str(SIZE),
                "--steps",
                "200",
                "--lr",
                "5e-3",
                "--fsq-levels",
                "8",
                "4",
                "4",
            ]
        )  # 128 codes: room for a top-k of 100
        train.main(
            [
                "gpt",
                *common,
                "--tokenizer",
                str(root / "tok"),
                "--out",
                str(root / "t2i"),
                "--steps",
                "150",
                "--lr",
                "3e-3",
                *demo_sampling,
            ]
        )
        from vqgpt import ImageTokenizer
        from vqgpt import data as vdata

        images, captions = vdata.load_image_tensors(str(folder), "train", SIZE)
        tok = ImageTokenizer.from_pretrained(root / "tok")
        with torch.no_grad():  # the training drawings as this tokenizer draws them: what a perfect GPT samples
            drawn = tok.decode(tok.encode(images.float().div(255)))
    return root / "t2i", drawn, captions


def check_drawn(samples: torch.Tensor, prompts: list[str], images: torch.Tensor, captions: list[str]) -> None:
    """Each sample is far nearer its nearest training image (as the tokenizer draws it) than the same pixels
    scrambled are (noise of the same colours), and that image carries the prompted caption for most samples."""
    train = images.flatten(1)
    flat = samples.flatten(1)
    scrambled = flat[:, torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))]
    d_sample, nearest = torch.cdist(flat, train).min(1)
    d_noise = torch.cdist(scrambled, train).min(1).values
    ratio = (d_sample / d_noise).tolist()
    hits = [captions[j] == p for j, p in zip(nearest.tolist(), prompts)]
    assert max(ratio) < 0.25, f"samples no nearer a training image than scrambled pixels: {ratio}"
    assert sum(hits) >= 0.75 * len(hits), f"{sum(hits)}/{len(hits)} samples drew their prompt: " + str(
        [(p, captions[j]) for p, j in zip(prompts, nearest.tolist())]
    )


def test_readme_sample_command_draws_the_prompts(model, tmp_path):
    ckpt, images, captions = model
    prompts = sorted(set(captions))
    commands = readme_sample_commands()
    assert commands, "the README shows no `python sample.py --ckpt runs/t2i` command"
    for i, argv in enumerate(commands):
        assert argv[:2] == ["python", "sample.py"] and "--prompt" in argv
        assert all(a.startswith("--") for a in argv[2::2]), f"flag / value pairs expected: {argv}"
        args = []
        for flag, value in zip(argv[2::2], argv[3::2]):  # the README's flags, on this model and its captions
            if flag == "--prompt":
                continue
            args += [flag, {"--ckpt": str(ckpt), "--out": str(tmp_path / f"{i}" / "grid.png")}.get(flag, value)]
        args += [a for p in prompts for a in ("--prompt", p)]
        out = subprocess.run(
            [sys.executable, "sample.py", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        n = int(dict(zip(argv[2::2], argv[3::2])).get("--n", 4))
        files = [
            sorted((tmp_path / f"{i}").glob(f"grid-{k:02d}-{j}-*.png")) for k in range(len(prompts)) for j in range(n)
        ]
        assert all(len(f) == 1 for f in files), files
        samples = (
            torch.stack([torch.from_numpy(np.array(Image.open(f[0]).convert("RGB"))).permute(2, 0, 1) for f in files])
            .float()
            .div(255)
        )
        check_drawn(samples, [p for p in prompts for _ in range(n)], images, captions)


def test_readme_snippet_draws_the_prompts(model):
    from vqgpt import TextToImage

    ckpt, images, captions = model
    pipe = TextToImage.from_pretrained(ckpt)  # noqa: F841 (read by the eval below)
    prompts = sorted(set(captions))
    kwargs = readme_snippet_kwargs()
    drawn = eval(f"pipe(prompts{kwargs})").images  # the README's call, on this model's captions
    n = len(drawn) // len(prompts)
    samples = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in drawn])
    check_drawn(samples.float().div(255), [p for p in prompts for _ in range(n)], images, captions)
