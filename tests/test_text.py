"""TextTokenizer: BPE training, fixed-length padding/truncation, the null caption, save/load, fingerprints."""

import warnings

import pytest
import torch

from vqgpt.text import TextTokenizer

CAPTIONS = [
    "a green apple",
    "a red apple on a white background",
    "grinning face with big eyes",
    "smiling cat with heart eyes",
    "a small blue circle in the top left corner",
    "a large yellow square at the bottom",
    "red heart",
    "thumbs up: medium skin tone",
    "rocket",
    "a purple triangle on a black background",
    "face with tears of joy",
    "flag: Japan",
    "pile of poo",
    "snowman without snow",
    "été à Paris, café crème",  # non-ASCII: byte-level BPE must still round-trip it
] * 4


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=300)


def _encode_unpadded(tok: TextTokenizer, caption: str) -> list[int]:
    return tok.hf(caption, add_special_tokens=False)["input_ids"]


def test_train_gives_pad_and_vocab(tok):
    assert 257 <= tok.vocab_size <= 300
    assert tok.pad_id == 0 and tok.hf.convert_ids_to_tokens(tok.pad_id) == "[PAD]"
    # Merges were learned: a frequent word is a single token, not its bytes.
    assert len(_encode_unpadded(tok, "apple")) < len("apple")


def test_pad_and_roundtrip(tok):
    ids = tok(["a green apple", "été à Paris"], length=16)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    for row, caption in zip(ids, ["a green apple", "été à Paris"]):
        n = len(_encode_unpadded(tok, caption))
        assert (row[:n] != tok.pad_id).all() and (row[n:] == tok.pad_id).all()
    assert tok.decode(ids) == ["a green apple", "été à Paris"]


def test_empty_caption_is_all_pad(tok):
    ids = tok(["", "red heart", ""], length=8)
    assert (ids[0] == tok.pad_id).all() and (ids[2] == tok.pad_id).all()
    assert (ids[1] != tok.pad_id).any()
    assert tok([], length=8).shape == (0, 8)


def test_truncation_warns_once_with_count(tok):
    long = "a small blue circle in the top left corner on a black background"
    captions = [long] * 3 + ["rocket"] * 13
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok(captions, length=6)
    messages = [str(w.message) for w in caught]
    assert messages == ["3 of 16 captions were longer than the 6-token text context and were truncated"]
    assert ids.shape == (16, 6)
    assert ids[0].tolist() == _encode_unpadded(tok, long)[:6]


def test_no_warning_when_everything_fits(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["rocket", "red heart"], length=32)


def test_vocab_too_small_is_an_error():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        TextTokenizer.train(CAPTIONS, vocab_size=100)


def test_save_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "text")
    loaded = TextTokenizer.from_pretrained(tmp_path / "text")
    assert torch.equal(loaded(CAPTIONS, 32), tok(CAPTIONS, 32))
    assert (loaded.vocab_size, loaded.pad_id) == (tok.vocab_size, tok.pad_id)
    assert loaded.fingerprint() == tok.fingerprint()


def test_saved_dir_is_a_plain_transformers_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))  # a plain local path: no hub access
    assert hf.pad_token_id == tok.pad_id
    assert hf("smiling cat", add_special_tokens=False)["input_ids"] == _encode_unpadded(tok, "smiling cat")
    # And the same path through TextTokenizer.from_pretrained as a str.
    assert torch.equal(TextTokenizer.from_pretrained(str(tmp_path))(["rocket"], 8), tok(["rocket"], 8))


def test_fingerprint_is_stable_and_vocab_specific(tok):
    assert tok.fingerprint() == tok.fingerprint()
    assert len(tok.fingerprint()) == 16
    other = TextTokenizer.train(["completely different words here", "nothing alike"] * 5, vocab_size=300)
    assert other.fingerprint() != tok.fingerprint()


def test_foreign_tokenizer_without_pad_gets_one_and_no_specials(tmp_path):
    """A GPT-2/BERT-like tokenizer: no pad token, BOS added by its post-processor. The null caption must
    still be all PAD, so special tokens are not added and a dedicated [PAD] is appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[BOS]": 0, "a": 1, "green": 2, "apple": 3, "[UNK]": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 0)])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", unk_token="[UNK]").save_pretrained(tmp_path)

    tok = TextTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 6 and tok.pad_id == 5
    ids = tok(["a green apple", ""], length=5)
    assert ids.tolist() == [[1, 2, 3, 5, 5], [5, 5, 5, 5, 5]]


def test_training_counts_truncated_captions_once_at_the_start(tok, capsys):
    """The GPT and LiT stages say at their start how many captions the context cuts (also when --text-len
    sets it), and their batches then encode without repeating it."""
    from vqgpt.stages import fit_text_len

    long = "a small blue circle in the top left corner on a black background"
    captions = [long] * 3 + ["rocket"] * 13
    assert fit_text_len(tok, captions, given=6) == 6
    assert "3 of 16 captions looked at are longer" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok(captions, length=6, warn=False).shape == (16, 6)
