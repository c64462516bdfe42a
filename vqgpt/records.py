"""Evaluation figures kept with a saved model: `python -m vqgpt.eval ... --record` writes them into its
config.json ("evaluation") and refreshes its model card.

Apart from vqgpt/hub.py (which the models themselves use to save and load) because refreshing a card counts the
model's parameters, which takes the model classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .hub import CARD_NAME, model_card
from .io import atomic_write_bytes, atomic_write_json, read_json_file
from .model import GPT, GPTConfig
from .tokenizer import METADATA, ImageTokenizer, TokenizerConfig


def evaluation_figures(result: dict, prefix: str = "", depth: int = 3) -> dict:
    """The numbers of a `vqgpt.eval` JSON result, flattened to dotted keys: {"cfg.3.mean": 0.8, ...}."""
    out = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, dict) and depth > 1:
            out.update(evaluation_figures(value, f"{name}.", depth - 1))
    return out


def record_evaluation(model_dir: str | os.PathLike, what: str, result: dict, command: str) -> None:
    """Keep an evaluation's figures in a model directory's config.json ("evaluation") and refresh its card."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--record writes into a local model directory; {model_dir} has no config.json")
    config = read_json_file(path / "config.json")
    config.setdefault("evaluation", {})[what] = {"figures": evaluation_figures(result), "command": command}
    atomic_write_json(path / "config.json", config)
    kind = "image-tokenizer" if config.get("model_type") == "vqgpt-image-tokenizer" else "text-to-image"
    card = model_card(config, kind=kind, where=str(model_dir), n_params=count_params(config, kind))
    atomic_write_bytes(path / CARD_NAME, card.encode())


def count_params(config: dict, kind: str) -> int | None:
    """Parameters of the model a config.json describes (the GPT built on the meta device: no memory, no init;
    vector-quantize-pytorch's FSQ reads its tensors while it is built, so the tokenizer on the CPU)."""
    try:
        if kind == "image-tokenizer":
            model = ImageTokenizer(TokenizerConfig.from_dict({k: v for k, v in config.items() if k not in METADATA}))
        else:
            with torch.device("meta"):
                model = GPT(GPTConfig.from_dict(config["gpt"]))
    except (ValueError, TypeError, KeyError, RuntimeError):  # still a card for a config this version cannot build
        return None
    return sum(p.numel() for p in model.parameters())
