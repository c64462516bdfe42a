"""Text tokenizer for captions: a byte-level BPE trained on the captions, or any transformers tokenizer.

Either way the GPT sees right-padded ids of a fixed length (the text context, `GPTConfig.text_len`),
and the empty caption "" encodes to all [PAD]: that row is the null caption used for caption dropout
in training and for the unconditional rows of classifier-free guidance at sampling time.

    tok = TextTokenizer.train(captions, vocab_size=1024)
    ids = tok(["a green apple", ""], length=32)       # LongTensor (2, 32); row 1 is all tok.pad_id
    tok.save_pretrained("runs/t2i/text")              # a plain transformers tokenizer directory
    tok = TextTokenizer.from_pretrained("runs/t2i/text")   # or "gpt2", "bert-base-uncased", ...

transformers and tokenizers are imported inside the functions that use them so `import vqgpt` stays light.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .io import json_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAD_TOKEN = "[PAD]"
N_BYTES = 256  # a byte-level BPE starts from all 256 byte symbols, so every string is encodable


class TextTokenizer:
    """Captions -> fixed-length LongTensor of ids, right-padded with `pad_id`."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase):
        if hf_tokenizer.pad_token_id is None:
            # The null caption is "all PAD", so a tokenizer without one (GPT-2, LLaMA, ...) gets a
            # dedicated [PAD] rather than reusing EOS: PAD then never means anything but "no text".
            hf_tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        self.hf = hf_tokenizer

    @classmethod
    def train(cls, captions: list[str], vocab_size: int = 1024) -> TextTokenizer:
        """Train a byte-level BPE (GPT-2 style) on `captions`; [PAD] gets id 0. Takes about a second."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        if vocab_size < N_BYTES + 1:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                f"{N_BYTES + 1} entries (256 bytes + {PAD_TOKEN})"
            )
        if not captions:
            raise ValueError("cannot train a text tokenizer on an empty list of captions")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(captions, trainer=trainer)
        return cls(PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> TextTokenizer:
        """Load a directory written by `save_pretrained`, or any transformers tokenizer by name or path."""
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(str(name_or_path)))
        except (OSError, ValueError) as e:  # a missing, truncated or foreign tokenizer file: name the directory
            raise ValueError(f"cannot load the text tokenizer {name_or_path}: {str(e).splitlines()[0][:300]}") from e

    def save_pretrained(self, path: str | Path) -> None:
        """Write a standard transformers tokenizer directory (loadable with AutoTokenizer too)."""
        self.hf.save_pretrained(str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included (the size the GPT's text embedding needs)."""
        return len(self.hf)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    def __call__(self, captions: list[str], length: int, warn: bool = True) -> torch.LongTensor:
        """Encode to (B, length) ids, right-padded with `pad_id`; longer captions are truncated, with a warning
        unless `warn` is False (a training loop that counted them once at its start).

        No BOS/EOS/CLS are added, so "" encodes to all PAD (the null caption).
        """
        if isinstance(captions, str):
            captions = [captions]
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        ids = torch.full((len(captions), length), self.pad_id, dtype=torch.long)
        if not captions:
            return ids
        encoded = self.hf(list(captions), add_special_tokens=False)["input_ids"]
        n_long = 0
        for row, seq in enumerate(encoded):
            if len(seq) > length:
                n_long += 1
                seq = seq[:length]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        if n_long and warn:
            warnings.warn(
                f"{n_long} of {len(captions)} captions were longer than the {length}-token text context "
                "and were truncated",
                stacklevel=2,
            )
        return ids

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(B, T) ids -> captions, PAD dropped (for logs and sample labels)."""
        return [self.hf.decode([i for i in row if i != self.pad_id]) for row in ids.tolist()]

    def fingerprint(self) -> str:
        """Stable hash of what maps text to ids: vocabulary, merges (for BPE) and the PAD id.

        A checkpoint stores it so loading a GPT with a different text tokenizer fails loudly.
        """
        model = json.loads(self.hf.backend_tokenizer.to_str())["model"] if self.hf.is_fast else {}
        state = {
            "vocab": sorted(self.hf.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
            "model": model.get("type"),
            "merges": model.get("merges"),
            "pad_id": self.pad_id,
        }
        return json_fingerprint(state)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, {type(self.hf).__name__})"
