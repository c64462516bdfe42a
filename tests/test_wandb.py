"""wandb as its users expect, through the real library in offline mode (it writes runs to a local folder):
the project and name from flags or WANDB_PROJECT / WANDB_NAME, the config dataclasses as the run config,
grids captioned with their prompts, and one wandb run for a training run and its --resume."""

import json
from pathlib import Path

import pytest
from PIL import Image

from vqgpt.training import WANDB_RUN_FILE, init_wandb, wandb_grid

ROOT = Path(__file__).resolve().parents[1]
wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline(monkeypatch):
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_names_come_from_flags_then_environment_and_resume_keeps_the_id(offline, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run = init_wandb(None, None, None, {"gpt": {"n_layer": 2}}, str(out), default_name="gpt-run")
    assert (run.project, run.name) == ("vqgpt", "gpt-run") and dict(run.config)["gpt"] == {"n_layer": 2}
    first = run.id
    run.finish()
    assert json.loads((out / WANDB_RUN_FILE).read_text()) == {"id": first, "project": "vqgpt", "name": "gpt-run"}

    again = init_wandb(None, None, None, {}, str(out), resume=True, default_name="gpt-run")  # --resume
    assert again.id == first and again.project == "vqgpt"
    again.finish()
    fresh = init_wandb(None, None, None, {}, str(out), default_name="gpt-run")  # a new run, not a resume
    assert fresh.id != first
    fresh.finish()

    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_NAME", "env-name")
    env = init_wandb(None, None, None, {}, str(tmp_path / "env"), default_name="gpt-env")
    assert (env.project, env.name) == ("env-project", "env-name")
    env.finish()
    flags = init_wandb("offline", "flag-project", "flag-name", {}, str(tmp_path / "flags"), default_name="x")
    assert (flags.project, flags.name) == ("flag-project", "flag-name")
    flags.finish()
    assert init_wandb("disabled", "p", "n", {}, str(tmp_path / "off")) is None
    assert not (tmp_path / "off").exists()


def test_sample_grids_carry_their_prompts(offline, tmp_path):
    path = tmp_path / "grid.png"
    Image.new("RGB", (8, 16), "white").save(path)
    image = wandb_grid(path, ["a green apple", "a red heart"])
    assert image._caption == "1. a green apple\n2. a red heart"


def load_train_script():
    """train.py as a module: both runs below in this process, without two more imports of torch and wandb."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vqgpt_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resumed_training_continues_the_same_offline_run(offline, tmp_path, monkeypatch):
    folder = tmp_path / "folder"
    folder.mkdir()
    lines = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"] * 10):  # 40: some land in the held-out split
        Image.new("RGB", (32, 32), colour).save(folder / f"img{i:02d}.png")
        lines.append(json.dumps({"file_name": f"img{i:02d}.png", "text": f"a {colour} square"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("VQGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_NAME", "not-this-one")  # the flag wins over the environment
    out = tmp_path / "tok"
    train = load_train_script()
    common = [
        "tokenizer",
        "--data",
        str(folder),
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--eval-every",
        "1000",
        "--save-every",
        "2",
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    train.main([*common, "--out", str(out), "--steps", "2", "--wandb-project", "vqgpt-test", "--wandb-name", "tiny"])
    train.main([*common, "--resume", str(out), "--steps", "4"])
    record = json.loads((out / WANDB_RUN_FILE).read_text())
    assert record["project"] == "vqgpt-test" and record["name"] == "tiny"
    runs = sorted((out / "wandb").glob("offline-run-*"))
    # one wandb run, written twice (a second start within the same second gets a "-1" folder, same run id)
    assert len(runs) == 2 and all([f.name for f in r.glob("*.wandb")] == [f"run-{record['id']}.wandb"] for r in runs), [
        list(r.iterdir()) for r in runs
    ]
    logged = (runs[0] / "logs" / "debug.log").read_text()  # what wandb.init received as the run config
    assert "'tokenizer': {" in logged and "'schedule': {'steps': 2" in logged
    assert "'schedule': {'steps': 4" in (runs[1] / "logs" / "debug.log").read_text()
