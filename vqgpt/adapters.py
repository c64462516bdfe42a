"""LoRA adapters on a pipeline's GPT (through the `peft` library), and the text-vocabulary rows they may add.

`train.py gpt --init BASE --lora-rank R` trains low-rank adapters on the attention and MLP projections and
nothing else; only the adapters are saved, with a reference to their base. `TextToImage.from_pretrained`
loads the base, grows its text vocabulary when the fine-tune added tokens, and attaches the adapters here.

A saved adapter directory:

    DIR/config.json          as a plain pipeline, plus "base": {"path": base dir relative to DIR,
                             "gpt": weights_fingerprint of the base GPT}; no model.safetensors
    DIR/adapter/             adapter_config.json + adapter_model.safetensors (peft's format)
    DIR/image_tokenizer/     the base's (locked) image tokenizer
    DIR/text_tokenizer/      the text tokenizer, extended if new tokens were added
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .io import atomic_write_json, load_weights, save_weights, state_problems
from .model import GPT

LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")  # attention and SwiGLU projections of every block
ADAPTER_DIR = "adapter"


@dataclass
class Adapter:
    """A pipeline GPT carrying LoRA adapters: peft's wrapper (its GPT is the pipeline's, modified in place)
    and the base the adapters were trained on."""

    peft_model: object  # peft.PeftModel
    base_path: str  # the base pipeline directory
    base_fingerprint: str  # weights_fingerprint of the base GPT (before any vocabulary growth)


def add_lora(gpt: GPT, rank: int, alpha: float | None = None, dropout: float = 0.0, new_token_ids: list[int] = ()):
    """Wrap `gpt` (modified in place) with LoRA adapters on LORA_TARGETS; only adapters (and the embedding
    rows of `new_token_ids`) stay trainable. Returns the peft.PeftModel."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=list(LORA_TARGETS),
        trainable_token_indices={"text_emb": sorted(new_token_ids)} if new_token_ids else None,
    )
    return get_peft_model(gpt, config)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's weights only (LoRA A/B and trainable token rows), named as peft saves them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


def load_adapter_state(peft_model, state: dict[str, torch.Tensor], where: str) -> None:
    """Load adapter weights strictly (vqgpt.io.state_problems): every adapter tensor present and fitting."""
    from peft import set_peft_model_state_dict

    problems = state_problems(adapter_state(peft_model), state)
    if problems:
        raise ValueError(
            f"adapter weights in {where} do not fit this model: {'; '.join(problems)} "
            f"(a different LoRA rank, targets or base?)"
        )
    set_peft_model_state_dict(peft_model, state)


def save_adapter(path: Path, peft_model, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write peft's adapter format (adapter_config.json + adapter_model.safetensors), each file atomically."""
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path / "adapter_model.safetensors", state if state is not None else adapter_state(peft_model))
    config = peft_model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    atomic_write_json(path / "adapter_config.json", config, default=str)  # whatever else peft puts there: as text


def load_adapter(gpt: GPT, path: Path, trainable: bool = False):
    """Attach the adapter saved at `path` to `gpt` (in place); returns the peft.PeftModel."""
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no adapter_config.json: not a LoRA adapter directory")
    with open(config_file) as f:
        config = json.load(f)
    peft_model = add_lora(
        gpt,
        config["r"],
        config["lora_alpha"],
        config.get("lora_dropout", 0.0),
        (config.get("trainable_token_indices") or {}).get("text_emb", []),
    )
    load_adapter_state(peft_model, load_weights(path / "adapter_model.safetensors"), str(path))
    if not trainable:
        peft_model.eval()
        for param in peft_model.parameters():
            param.requires_grad_(False)
    return peft_model


def grow_text_vocab(gpt: GPT, vocab_size: int, init_from: dict[int, list[int]] | None = None) -> GPT:
    """A copy of `gpt` whose text embedding (and text head) has `vocab_size` rows: the old rows unchanged,
    row i of a new token the mean of the old rows `init_from[i]` (zeros where not given)."""
    old = gpt.config.text_vocab_size
    if vocab_size == old:
        return gpt
    if vocab_size < old:
        raise ValueError(f"cannot shrink the text vocabulary from {old} to {vocab_size}: ids would change meaning")
    p = gpt.head.weight
    grown = GPT(replace(gpt.config, text_vocab_size=vocab_size)).to(device=p.device, dtype=p.dtype)
    state = gpt.state_dict()
    for name in ("text_emb.weight", "text_head.weight"):
        if name in state:
            rows = state[name].new_zeros(vocab_size, state[name].shape[1])  # (V_new, dim)
            rows[:old] = state[name]
            for i, src in (init_from or {}).items():
                rows[i] = state[name][src].mean(0)
            state[name] = rows
    grown.load_state_dict(state)
    return grown
