"""Fine-tuning a trained text-to-image model on new data: the image tokenizer stays locked.

Two ways, both started by `python train.py gpt --init runs/t2i --data NEW ...`:

- full: every GPT weight trains (the init model's weights are the starting point);
- LoRA (`--lora-rank R`, with the `peft` library): low-rank adapters on the attention and MLP projections
  train, everything else is frozen, and only the adapters are saved (vqgpt/adapters.py: the adapters and the
  layout of an adapter directory). `TextToImage.from_pretrained` loads base + adapter (merged by default);
  `python -m vqgpt.finetune merge` writes a plain checkpoint.

New captions may bring new words. With `--add-text-tokens N`, words of the new captions that the old text
tokenizer can only spell in pieces become tokens of their own (here): appended to the vocabulary (existing ids
unchanged) with embeddings grown and initialised to the mean of their old pieces (adapters.grow_text_vocab).
Under LoRA those new rows train too (peft's trainable tokens); the old rows stay frozen.

    python -m vqgpt.finetune merge --ckpt runs/ft-lora --out runs/ft-merged
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

# What train.py and bench/finetune.py fine-tune with, importable from here as before; each lives in its own
# module: the adapters in vqgpt/adapters.py, the fingerprint in vqgpt/io.py, the run's cost in vqgpt/metrics.py.
from .adapters import Adapter, adapter_state, add_lora, grow_text_vocab, load_adapter_state  # noqa: F401
from .io import weights_fingerprint  # noqa: F401
from .metrics import peak_memory_mb, trainable_summary  # noqa: F401

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
