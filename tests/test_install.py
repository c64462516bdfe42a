"""The install: one source of truth for the dependencies (pyproject.toml; requirements.txt is their union),
constraints.txt pinning versions inside every range, a LICENSE that says what pyproject.toml says, and sampling
that never needs the train extra's datasets or wandb."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
packaging = pytest.importorskip("packaging.requirements")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_requirements_txt_is_the_union_of_pyproject():
    py = project()
    own = [r for group in py["optional-dependencies"].values() for r in group if not r.startswith("vqgpt[")]
    expected = sorted(str(Requirement(r)) for r in py["dependencies"] + own)
    listed = sorted(str(Requirement(r)) for r in requirement_lines(ROOT / "requirements.txt"))
    assert listed == expected, (
        "requirements.txt and pyproject.toml disagree: requirements.txt lists the union "
        "of pyproject's dependencies and extras"
    )
    extras = py["optional-dependencies"]
    for name in ("inference", "train", "app", "triton", "dev"):
        assert name in extras, name
    sampling = {canonicalize_name(Requirement(r).name) for r in py["dependencies"] + extras["inference"]}
    assert not sampling & {"datasets", "wandb"}  # sampling a saved model needs neither


def test_constraints_pin_every_requirement_inside_its_range():
    pins = {}
    for line in requirement_lines(ROOT / "constraints.txt"):
        name, _, version = line.partition("==")
        assert version and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = version
    for line in requirement_lines(ROOT / "requirements.txt"):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"


def test_license_file_matches_pyproject():
    assert project()["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 vqgpt authors" in text


BLOCK_TRAINING_LIBS = """
import sys
class Block:  # the [inference] extra installs neither: importing one is the bug this test looks for
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "wandb"):
            raise ImportError(f"{name} imported while sampling")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sampling_needs_neither_datasets_nor_wandb(tmp_path):
    import torch

    from vqgpt.generate import SamplingConfig
    from vqgpt.model import GPT, gpt_config
    from vqgpt.pipeline import TextToImage
    from vqgpt.text import TextTokenizer
    from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

    torch.manual_seed(0)
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
    TextToImage(gpt, tok, text, SamplingConfig()).save_pretrained(tmp_path / "model")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK_TRAINING_LIBS,
            str(ROOT / "sample.py"),
            "--ckpt",
            str(tmp_path / "model"),
            "--prompt",
            "a red square",
            "--n",
            "2",
            "--out",
            str(tmp_path / "grid.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "grid.png").is_file() and len(list(tmp_path.glob("grid-*.png"))) == 2
