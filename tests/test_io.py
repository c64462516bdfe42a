"""vqgpt.io: the fingerprints that records on disk are keyed by stay byte-identical, and writes are atomic.

The expected hashes were computed before the fingerprints moved into vqgpt/io.py: code caches and stores are
keyed by the image tokenizer's fingerprint, a pipeline's config.json records both tokenizers', and a LoRA
adapter records its base GPT's. A change to any scheme orphans those files, so each is pinned here on a fixed
tiny model whose every value is set by hand (no RNG, exact in float32).
"""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vqgpt.io import atomic_write, atomic_write_bytes, state_problems, weights_fingerprint
from vqgpt.text import TextTokenizer
from vqgpt.tokenizer import ImageTokenizer, tokenizer_config


def _fill(module: torch.nn.Module) -> torch.nn.Module:
    """Every floating tensor of the state dict set to multiples of 1/16 in [-0.5, 0.5], every bool to True."""
    with torch.no_grad():
        for i, (_, t) in enumerate(sorted(module.state_dict().items())):
            if t.is_floating_point():
                values = ((torch.arange(t.numel()) * 7 + i) % 17 - 8).to(torch.float64) / 16
                t.copy_(values.reshape(t.shape))
            elif t.dtype == torch.bool:
                t.fill_(True)
    return module


def test_image_tokenizer_fingerprint_is_frozen():
    fsq = _fill(ImageTokenizer(tokenizer_config("tiny")))
    vq = _fill(ImageTokenizer(tokenizer_config("tiny", quantizer="vq", vq_codebook_size=64)))
    assert fsq.fingerprint() == "4d573e4bbe3b44f5"
    assert vq.fingerprint() == "d1c6b63c3ac2458c"
    # dtype-blind: a half-precision copy of the same values keys the same caches
    assert fsq.to(torch.float16).fingerprint() == "4d573e4bbe3b44f5"


def test_gpt_weights_fingerprint_is_frozen():
    net = _fill(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2), torch.nn.Embedding(4, 2)))
    assert weights_fingerprint(net) == "ddc14f264075fd5c"
    assert weights_fingerprint(net.to(torch.bfloat16)) != "ddc14f264075fd5c"  # dtypes count here


def test_text_tokenizer_fingerprint_is_frozen():
    vocab = {"[PAD]": 0, "a": 1, "b": 2, "Ġ": 3, "ab": 4, "Ġa": 5}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "a")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = TextTokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]"))
    assert tok.fingerprint() == "b1c42c0272034189"


def test_codes_cache_keys_are_frozen(tmp_cache):
    """The names of a codes store and of a cached code tensor, for fixed data and a fixed tokenizer."""
    from vqgpt.data import load_codes
    from vqgpt.encode import store_dir

    tok = _fill(ImageTokenizer(tokenizer_config("tiny")))
    assert store_dir("shapes", "test", tok).name == "shapes-test-32px-" + "1a43d01ee004da14148b"
    load_codes("shapes", "test", tok, limit=2)
    assert [p.name for p in (tmp_cache / "codes").iterdir()] == ["shapes-test-32px-" + "6750322155eba7e52b68.pt"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "config.json"
    atomic_write_bytes(path, b"old")

    def half_then_fail(f):
        f.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_state_problems_name_every_misfit():
    expected = {"w": torch.zeros(2, 3), "step": torch.zeros((), dtype=torch.long), "b": torch.zeros(3)}
    assert state_problems(expected, dict(expected)) == []
    problems = state_problems(expected, {"w": torch.zeros(3, 2), "step": expected["step"], "extra": torch.zeros(1)})
    assert problems == ["missing 1 (b)", "unexpected 1 (extra)", "misshapen 1 (w: checkpoint (3, 2) vs model (2, 3))"]
    values = {"w": torch.full((2, 3), float("nan")), "step": torch.zeros((), dtype=torch.int32), "b": torch.zeros(3)}
    assert state_problems(expected, values) == [
        "wrong dtype 1 (step: torch.int32 vs torch.int64)",
        "non-finite values (NaN or inf) in 1 (w)",
    ]
