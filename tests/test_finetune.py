"""Fine-tuning pieces in process: vocabulary growth, LoRA through peft, adapter loading."""

import pytest
import torch

from vqgpt.finetune import adapter_state, add_lora, add_text_tokens, grow_text_vocab, load_adapter_state, new_words
from vqgpt.model import GPT, gpt_config
from vqgpt.text import TextTokenizer

CAPTIONS = ["a red circle", "a blue square", "a red square", "a blue circle"] * 4


def tiny_gpt(vocab: int = 300) -> GPT:
    """A tiny GPT with a non-zero head, as after training (a fresh head is zero: no gradient flows through it)."""
    torch.manual_seed(0)
    gpt = GPT(
        gpt_config("tiny", text_vocab_size=vocab, text_pad_id=0, text_len=6, image_vocab_size=32, image_grid=(2, 3))
    )
    torch.nn.init.normal_(gpt.head.weight, std=0.02)
    return gpt


def test_new_words_become_tokens_and_old_ids_keep_their_meaning():
    tok = TextTokenizer.train(CAPTIONS, vocab_size=300)
    before, n = tok(CAPTIONS[:4], 6), tok.vocab_size
    new = ["a crimson circle", "a crimson square", "a teal circle", "a teal square"] * 2
    words = new_words(tok, new, max_new=8)
    assert words == ["crimson", "teal"]  # "a", "circle", "square" are already single tokens
    ids = add_text_tokens(tok, words)
    assert sorted(ids) == [n, n + 1] and tok.vocab_size == n + 2 and all(len(pieces) > 1 for pieces in ids.values())
    assert torch.equal(tok(CAPTIONS[:4], 6), before)
    row = tok(["a crimson circle"], 6)[0].tolist()
    assert row[:3] == [before[0, 0].item(), n, before[0, 2].item()]  # "crimson" took its space, as BPE words do
    assert tok(["teal square"], 6)[0, 0] == n + 1  # also at the start of a caption


def test_grown_vocabulary_keeps_old_rows_and_averages_pieces():
    gpt = tiny_gpt()
    grown = grow_text_vocab(gpt, 302, {300: [5, 7], 301: [9]})
    old, new = gpt.text_emb.weight, grown.text_emb.weight
    assert new.shape == (302, old.shape[1]) and torch.equal(new[:300], old)
    torch.testing.assert_close(new[300], old[[5, 7]].mean(0))
    torch.testing.assert_close(new[301], old[9])
    assert torch.equal(grown.layers[0].mlp.w1.weight, gpt.layers[0].mlp.w1.weight)
    with pytest.raises(ValueError, match="shrink"):
        grow_text_vocab(gpt, 200)


def test_lora_trains_only_adapters_and_new_token_rows():
    gpt = grow_text_vocab(tiny_gpt(), 302)
    frozen = {k: v.clone() for k, v in gpt.state_dict().items()}
    peft_model = add_lora(gpt, rank=4, new_token_ids=[300, 301])
    params = [p for p in gpt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    text = torch.tensor([[300, 12, 0, 0, 0, 0], [301, 40, 7, 0, 0, 0]])
    codes = torch.randint(0, 32, (2, 6))
    for _ in range(3):
        opt.zero_grad()
        gpt.loss(text, codes)[0].backward()
        opt.step()
    after = {
        k.replace(".base_layer", "").replace(".token_adapter", ""): v
        for k, v in gpt.state_dict().items()
        if "lora_" not in k and "trainable_tokens" not in k
    }  # the base tensors, under their own names
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)
    trained = adapter_state(peft_model)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # B starts at 0: it moved
    emb = gpt.text_emb(torch.tensor([300, 301, 5]))
    assert not torch.equal(emb[:2], frozen["text_emb.weight"][[300, 301]])  # the new rows trained
    assert torch.equal(emb[2], frozen["text_emb.weight"][5])  # an old row did not


def test_adapter_weights_of_another_rank_are_refused():
    a = add_lora(tiny_gpt(), rank=4)
    b = add_lora(tiny_gpt(), rank=8)
    with pytest.raises(ValueError, match="do not fit this model"):
        load_adapter_state(b, adapter_state(a), "rank-4 adapter")
