"""Fine-tuning a trained text-to-image model on new data: the image tokenizer stays locked.

Two ways, both started by `python train.py gpt --init runs/t2i --data NEW ...`:

- full: every GPT weight trains (the init model's weights are the starting point);
- LoRA (`--lora-rank R`, with the `peft` library): low-rank adapters on the attention and MLP projections
  train, everything else is frozen, and only the adapters are saved. `TextToImage.from_pretrained` loads
  base + adapter (merged by default); `python -m vqgpt.finetune merge` writes a plain checkpoint.

New captions may bring new words. With `--add-text-tokens N`, words of the new captions that the old text
tokenizer can only spell in pieces become tokens of their own: appended to the vocabulary (existing ids
unchanged) with embeddings grown and initialised to the mean of their old pieces. Under LoRA those new
rows train too (peft's trainable tokens); the old rows stay frozen.

A saved adapter directory:

    DIR/config.json          as a plain pipeline, plus "base": {"path": base dir relative to DIR,
                             "gpt": fingerprint of the base GPT's weights}; no model.safetensors
    DIR/adapter/             adapter_config.json + adapter_model.safetensors (peft's format)
    DIR/image_tokenizer/     the base's (locked) image tokenizer
    DIR/text_tokenizer/      the text tokenizer, extended if new tokens were added

    python -m vqgpt.finetune merge --ckpt runs/ft-lora --out runs/ft-merged
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes, save_weights
from .model import GPT

LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")  # attention and SwiGLU projections of every block
ADAPTER_DIR = "adapter"


# ----------------------------------------------------------------------------------------------------
# A vocabulary that grows with the new data


def new_words(text_tokenizer, captions: list[str], max_new: int, min_count: int = 2) -> list[str]:
    """The `max_new` most frequent words of `captions` (seen at least `min_count` times) that the text
    tokenizer spells with more than one token."""
    counts = Counter(w for c in captions for w in re.findall(r"\w+", c))
    vocab = text_tokenizer.hf.get_vocab()
    picked = []
    for word, n in counts.most_common():
        if len(picked) == max_new or n < min_count:
            break
        if word not in vocab and len(_pieces(text_tokenizer, word)) > 1:
            picked.append(word)
    return picked


def _pieces(text_tokenizer, word: str) -> list[int]:
    return text_tokenizer.hf(" " + word, add_special_tokens=False)["input_ids"]  # as it appears mid-caption


def add_text_tokens(text_tokenizer, words: list[str]) -> dict[int, list[int]]:
    """Append `words` to the tokenizer's vocabulary (in place; existing ids keep their meaning).

    Returns {new id: the old ids that spelled the word}, to initialise the new embedding rows from.
    """
    from tokenizers import AddedToken

    pieces = {w: _pieces(text_tokenizer, w) for w in words}
    # single_word: only whole words match; lstrip: the token takes the space before it, as BPE words do.
    text_tokenizer.hf.add_tokens([AddedToken(w, single_word=True, lstrip=True, normalized=False) for w in words])
    vocab = text_tokenizer.hf.get_vocab()
    return {vocab[w]: pieces[w] for w in words}


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


# ----------------------------------------------------------------------------------------------------
# LoRA through peft


@dataclass
class Adapter:
    """A pipeline GPT carrying LoRA adapters: peft's wrapper (its GPT is the pipeline's, modified in place)
    and the base the adapters were trained on."""

    peft_model: object  # peft.PeftModel
    base_path: str  # the base pipeline directory
    base_fingerprint: str  # weights_fingerprint of the base GPT (before any vocabulary growth)


def add_lora(gpt: GPT, rank: int, alpha: float | None = None, dropout: float = 0.0,
             new_token_ids: list[int] = ()):
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
    """Load adapter weights strictly: every adapter tensor present and of the right shape."""
    from peft import set_peft_model_state_dict

    expected = adapter_state(peft_model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"adapter weights in {where} do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"misshapen {misshapen[:3]} (a different LoRA rank, targets or base?)"
        )
    set_peft_model_state_dict(peft_model, state)


def save_adapter(path: Path, peft_model, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write peft's adapter format (adapter_config.json + adapter_model.safetensors), each file atomically."""
    path.mkdir(parents=True, exist_ok=True)
    save_weights(path / "adapter_model.safetensors", state if state is not None else adapter_state(peft_model))
    config = peft_model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    atomic_write_bytes(path / "adapter_config.json", (json.dumps(config, indent=2, default=str) + "\n").encode())


def load_adapter(gpt: GPT, path: Path, trainable: bool = False):
    """Attach the adapter saved at `path` to `gpt` (in place); returns the peft.PeftModel."""
    from safetensors.torch import load_file

    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no adapter_config.json: not a LoRA adapter directory")
    with open(config_file) as f:
        config = json.load(f)
    peft_model = add_lora(gpt, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                          (config.get("trainable_token_indices") or {}).get("text_emb", []))
    load_adapter_state(peft_model, load_file(str(path / "adapter_model.safetensors")), str(path))
    if not trainable:
        peft_model.eval()
        for param in peft_model.parameters():
            param.requires_grad_(False)
    return peft_model


def weights_fingerprint(gpt: GPT) -> str:
    """sha256 (16 hex digits) of a GPT's weights: names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name, t in sorted(gpt.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load_base_gpt(adapter_dir: Path, config: dict, base: str | os.PathLike | None, device) -> tuple[GPT, str]:
    """The base GPT an adapter was trained on, checked against the fingerprint recorded in config.json."""
    from .pipeline import TextToImage

    recorded = config["base"]
    base_path = Path(base) if base is not None else (adapter_dir / recorded["path"])
    from .pipeline import read_config

    if base_path.resolve() == Path(adapter_dir).resolve() or \
            (base_path / "config.json").is_file() and "base" in read_config(base_path):
        # a base that is itself an adapter (or this very directory) would recurse without end
        raise ValueError(f"the base of the LoRA adapter in {adapter_dir}, {base_path}, is not a plain model; "
                         f"an adapter's base must be one (merge a LoRA base first: python -m vqgpt.finetune merge)")
    try:
        base_pipe = TextToImage.from_pretrained(base_path, device=device)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the LoRA adapter in {adapter_dir} needs its base model, expected at {base_path}: {e}. "
            "Pass the base's directory: TextToImage.from_pretrained(DIR, base=BASE_DIR)"
        ) from e
    fp = weights_fingerprint(base_pipe.gpt)
    if fp != recorded["gpt"]:
        raise ValueError(
            f"{base_path} is not the base the adapter in {adapter_dir} was trained on (its GPT weights have "
            f"fingerprint {fp}, the adapter expects {recorded['gpt']}); pass the right base directory"
        )
    return base_pipe.gpt, str(base_path)


def trainable_summary(module: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / max(total, 1)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vqgpt.finetune", description="LoRA adapter utilities")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base and write a plain checkpoint")
    m.add_argument("--ckpt", required=True, help="the adapter directory (train.py gpt --lora-rank ... --out)")
    m.add_argument("--out", required=True, help="where to write the merged pipeline")
    m.add_argument("--base", default=None, help="the base directory, if it moved since training")
    args = p.parse_args(argv)

    from .pipeline import TextToImage

    pipe = TextToImage.from_pretrained(args.ckpt, base=args.base, merge=True)
    pipe.save_pretrained(args.out)
    print(json.dumps({"merged": args.out, "from": args.ckpt, "params": pipe.gpt.num_params()}))


if __name__ == "__main__":
    main()
