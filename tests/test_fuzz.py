"""A bounded, seeded fuzz of what users hand vqgpt: corrupt model directories and nonsense flags.

Each case must end in vqgpt's own error (a ValueError / FileNotFoundError in the API, one `error:` line and
exit 2 on the command line) or succeed; never a traceback from inside torch, a hang, a blown memory limit, or
an exit 0 that wrote nothing. Cases run in a subprocess under an address-space limit and a per-case alarm.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED, N_CONFIGS = 20261201, 48

WORKER = r"""
import json, os, resource, shutil, signal, sys, traceback
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # 6 GB: a config sized to blow memory fails fast
import torch
from vqgpt import TextToImage

def alarm(*_):
    raise TimeoutError("hang")

signal.signal(signal.SIGALRM, alarm)
results = []
for case in sorted(Path(sys.argv[1]).iterdir()):
    signal.alarm(30)
    try:
        TextToImage.from_pretrained(case)
        outcome = "loaded"
    except (ValueError, FileNotFoundError) as e:
        outcome = "error: " + str(e).splitlines()[0][:200]
    except BaseException as e:  # anything else is a defect: where did it come from?
        outcome = f"DEFECT {type(e).__name__}: {str(e)[:200]} at {traceback.extract_tb(e.__traceback__)[-1]}"
    finally:
        signal.alarm(0)
    results.append({"case": case.name, "outcome": outcome})
print(json.dumps(results))
"""


def _values(rng: random.Random):
    return rng.choice([-1, 0, 10**9, 2**70, 1e39, float("nan"), "192", "", None, [], {}, [1, 2, 3], True, 0.5])


def _mutations(rng: random.Random, config: dict):
    """Yield (name, mutator(dir)) pairs: a few fixed hostile files, then random field corruptions."""

    def write(obj):
        return lambda d: (d / "config.json").write_text(json.dumps(obj))

    yield "list", write([])
    yield "string", write("x")
    yield "no-gpt", write({k: v for k, v in config.items() if k != "gpt"})
    yield "gpt-not-object", write({**config, "gpt": 7})
    yield "truncated-json", lambda d: (d / "config.json").write_text(json.dumps(config)[:40])
    yield "not-utf8", lambda d: (d / "config.json").write_bytes(b"\xff\xfe{\x00")
    yield "fifo", lambda d: ((d / "config.json").unlink(), os.mkfifo(d / "config.json"))
    yield "dev-zero", lambda d: ((d / "config.json").unlink(), os.symlink("/dev/zero", d / "config.json"))
    yield (
        "truncated-weights",
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]),
    )
    yield "huge-n-layer", write({**config, "gpt": {**config["gpt"], "n_layer": 100000}})
    yield "rope-nan", write({**config, "gpt": {**config["gpt"], "rope_base": float("nan")}})
    yield "tok-config-list", lambda d: (d / "image_tokenizer" / "config.json").write_text("[]")
    yield "tokenizer-json-truncated", lambda d: (d / "text_tokenizer" / "tokenizer.json").write_text('{"vers')
    for i in range(N_CONFIGS):
        section = rng.choice(["gpt", "sampling", "top"])
        mutated = json.loads(json.dumps(config))
        target = mutated if section == "top" else mutated[section]
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(sorted(target))
            if rng.random() < 0.2:
                del target[key]
            else:
                target[key] = _values(rng)
        yield f"random-{i:02d}", write(mutated)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from vqgpt.generate import SamplingConfig
    from vqgpt.model import GPT, gpt_config
    from vqgpt.pipeline import TextToImage
    from vqgpt.text import TextTokenizer
    from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

    torch.manual_seed(0)
    tok = ImageTokenizer(tokenizer_config("tiny", image_size=16, fsq_levels=(4, 4)))
    text = TextTokenizer.train(["a red square", "a blue circle", "a green star"] * 5, vocab_size=300)
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
    path = tmp_path_factory.mktemp("fuzz") / "model"
    TextToImage(gpt, tok, text, SamplingConfig()).save_pretrained(path)
    return path


def test_corrupt_model_directories_end_in_clear_errors(model_dir, tmp_path):
    import shutil

    config = json.loads((model_dir / "config.json").read_text())
    cases = tmp_path / "cases"
    cases.mkdir()
    for name, mutate in _mutations(random.Random(SEED), config):
        shutil.copytree(model_dir, cases / name, symlinks=True)
        mutate(cases / name)
    r = subprocess.run(
        [sys.executable, "-c", WORKER, str(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 13 + N_CONFIGS
    defects = [x for x in results if x["outcome"].startswith("DEFECT")]
    assert not defects, "\n".join(f"{x['case']}: {x['outcome']}" for x in defects)
    fixed = {x["case"]: x["outcome"] for x in results if not x["case"].startswith("random")}
    assert all(v.startswith("error:") for v in fixed.values()), fixed


FLAGS = [
    "--steps",
    "--batch-size",
    "--lr",
    "--clip",
    "--seed",
    "--save-every",
    "--grad-accum",
    "--warmup",
    "--limit",
    "--keep",
    "--image-size",
    "--workers",
]


def test_random_flags_on_the_command_line(tmp_path):
    """Random values for the numeric flags of `train.py tokenizer` on a missing dataset: each run either refuses
    with one error line (exit 2), or (all flags valid) reaches the data and refuses that; never a traceback."""
    rng = random.Random(SEED)
    for i in range(8):
        flags = []
        for flag in rng.sample(FLAGS, 3):
            flags += [flag, str(rng.choice([-3, 0, 1, 7, 2**64, "nan", "inf", "1e30", "x", "0.5"]))]
        out = tmp_path / f"run{i}"
        r = subprocess.run(
            [
                sys.executable,
                "train.py",
                "tokenizer",
                "--data",
                str(tmp_path / "no-data"),
                "--out",
                str(out),
                "--preset",
                "tiny",
                "--device",
                "cpu",
                *flags,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "VQGPT_CACHE": str(tmp_path)},
        )
        assert r.returncode == 2, (flags, r.returncode, r.stderr[-1500:])
        assert "Traceback" not in r.stderr and "error:" in r.stderr, (flags, r.stderr[-1500:])
