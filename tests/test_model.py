"""GPT: config and presets, the sequence layout (causality, conditioning), 2D RoPE, loss, caption
dropout, state-dict round trip and the attention backend switch."""

import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import vqgpt
from vqgpt.model import (
    GPT,
    PRESETS,
    GPTConfig,
    apply_rope,
    gpt_config,
    rope_angles,
    rope_positions,
)

V = 64  # tiny vocab for both text and image


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: on a shared 2-core machine extra intra-op threads only add contention (~25x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides) -> GPTConfig:
    base = dict(text_vocab_size=V, text_len=8, image_vocab_size=V, image_grid=(4, 4), dim=32, n_layer=2, n_head=4)
    return GPTConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT in eval mode whose output head is random (the real init zeros it)."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    torch.nn.init.normal_(model.head.weight, std=0.3)
    return model.eval()


def batch(B: int = 3, seed: int = 1, config: GPTConfig | None = None):
    config = config or tiny_config()
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, config.text_vocab_size, (B, config.text_len), generator=g)
    codes = torch.randint(0, config.image_vocab_size, (B, *config.image_grid), generator=g)
    return text, codes


# ---------------------------------------------------------------------------------------------------
# Config and presets


@pytest.mark.parametrize("name, expected", [("B", 111e6), ("L", 343e6), ("XL", 775e6)])
def test_preset_param_counts_match_llamagen(name, expected):
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(gpt_config(name, image_vocab_size=16384, text_vocab_size=1024))
    assert model.num_params() == pytest.approx(expected, rel=0.02)


def test_demo_preset_is_small():
    with torch.device("meta"):
        model = GPT(gpt_config("demo"))
    assert 2e6 < model.num_params() < 15e6
    assert set(PRESETS) >= {"demo", "B", "L", "XL"}


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'XXL'; choose one of \['B', 'L', 'XL', 'demo', 'tiny'\]"):
        gpt_config("XXL")


def test_config_derived_values_and_json_roundtrip():
    config = gpt_config("B", text_len=16, image_grid=[16, 16], n_kv_head=4)
    assert config.image_grid == (16, 16) and config.n_image == 256
    assert config.seq_len == 16 + 1 + 256 and config.image_start == 17
    assert config.head_dim == 64 and config.ffn_hidden == 2048  # LLaMA: 8/3 * 768 = 2048
    d = json.loads(json.dumps(config.to_dict()))
    assert "seq_len" not in d
    assert GPTConfig.from_dict(d) == config
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**d, "n_embd": 3})


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(dim=30), "not divisible by n_head"),
        (dict(n_kv_head=3), "not a multiple of n_kv_head"),
        (dict(dim=24, n_head=4), "multiple of 4 for 2D RoPE"),
        (dict(attn_backend="flash"), "unknown attn_backend"),
        (dict(cfg_dropout=1.5), "cfg_dropout"),
        (dict(image_grid=(4, 0)), "image_grid"),
        (dict(text_pad_id=V), "text_pad_id"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


# ---------------------------------------------------------------------------------------------------
# Sequence layout


def test_forward_shape_and_initial_loss_is_uniform():
    model = GPT(tiny_config()).eval()  # real init: zero head -> uniform prediction
    text, codes = batch()
    assert model(text, codes).shape == (3, 16, V)
    assert model(text, codes.flatten(1)[:, :5]).shape == (3, 5, V)  # a prefix scores only that prefix
    loss, stats = model.loss(text, codes)
    assert loss.item() == pytest.approx(math.log(V), abs=1e-5)
    assert set(stats) >= {"loss", "image_loss", "image_acc", "null_captions"}


def test_image_positions_are_causal():
    """logits[:, i] depends on codes[:, :i] only: changing code j leaves logits 0..j untouched."""
    model = tiny_model()
    text, codes = batch()
    base = model(text, codes)
    flat = codes.flatten(1)
    for j in (0, 5, 15):
        changed = flat.clone()
        changed[:, j] = (changed[:, j] + 1) % V
        out = model(text, changed)
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-6)
        if j < 15:
            assert (out[:, j + 1 :] - base[:, j + 1 :]).abs().amax(-1).min() > 1e-4
        else:  # the last code is a target only, never an input
            torch.testing.assert_close(out, base, rtol=0, atol=0)


def test_every_text_token_conditions_every_image_position():
    model = tiny_model()
    text, codes = batch()
    base = model(text, codes)
    for t in (0, 7):  # first and last text slot (the last sits just before BOI)
        changed = text.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        assert (model(changed, codes) - base).abs().amax(-1).min() > 1e-4


def test_shape_errors_name_the_expected_layout():
    model = tiny_model()
    text, codes = batch()
    with pytest.raises(ValueError, match=r"text_ids must be \(B, 8\)"):
        model(text[:, :5], codes)
    with pytest.raises(ValueError, match="codes must be"):
        model(text, codes[:2])


# ---------------------------------------------------------------------------------------------------
# Rotary embeddings


def test_rope_positions_layout():
    config = tiny_config(text_len=5, image_grid=(2, 3))
    pos = rope_positions(config)
    assert pos.shape == (config.seq_len, 2)
    assert pos[:6].tolist() == [[t, t] for t in range(6)]  # text 0..4 and BOI at 5: same index on both axes
    assert pos[6:].tolist() == [[6 + r, 6 + c] for r in range(2) for c in range(3)]  # image after BOI


def test_rope_on_text_is_plain_1d_rope():
    """With row == col the 2D rotation is standard 1D RoPE: pair i rotated by t * base^(-2i/D)."""
    D, base = 16, 10000.0
    t = torch.arange(9)
    x = torch.randn(2, 3, len(t), D)
    angles = rope_angles(torch.stack([t, t], -1), D, base)
    got = apply_rope(x, angles.cos(), angles.sin())
    freqs = base ** (-torch.arange(0, D, 2).double() / D)  # (D/2,)
    rot = torch.polar(torch.ones(len(t), D // 2, dtype=torch.float64), t[:, None].double() * freqs)
    ref = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * rot).flatten(-2)
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-5)


def test_rope_2d_scores_depend_on_grid_offset_only():
    D = 16
    q, k = torch.randn(D), torch.randn(D)

    def score(qpos, kpos):
        pos = torch.tensor([qpos, kpos])
        a = rope_angles(pos, D, 100.0)
        qk = apply_rope(torch.stack([q, k])[None, None], a.cos(), a.sin())[0, 0]  # (2, D)
        return (qk[0] @ qk[1]).item()

    same = score((12, 7), (10, 6))
    assert score((22, 17), (20, 16)) == pytest.approx(same, abs=1e-4)  # same (2, 1) offset elsewhere
    assert abs(score((12, 7), (10, 5)) - same) > 1e-3  # column offset matters
    assert abs(score((13, 7), (10, 6)) - same) > 1e-3  # row offset matters


def test_rope_rows_and_columns_turn_different_pairs():
    D = 16
    x = torch.randn(1, 1, 1, D)

    def rotate(r, c):
        a = rope_angles(torch.tensor([[r, c]]), D, 10000.0)
        return apply_rope(x, a.cos(), a.sin()).view(D // 2, 2)

    base = rotate(3, 4)
    moved_row, moved_col = rotate(5, 4), rotate(3, 6)
    torch.testing.assert_close(moved_row[1::2], base[1::2])  # odd pairs follow the column only
    torch.testing.assert_close(moved_col[0::2], base[0::2])  # even pairs follow the row only
    assert not torch.allclose(moved_row[0::2], base[0::2])
    assert not torch.allclose(moved_col[1::2], base[1::2])


def test_rope_stays_exact_in_bfloat16():
    """The rotary table is recomputed in float32 from integer positions, so casting the model does not
    round the angles (a bf16 angle table would be off by whole radians at position ~100)."""
    model = tiny_model(text_len=96)
    cos32, _ = model._rope(torch.arange(model.config.seq_len))
    cos16, _ = model.to(torch.bfloat16)._rope(torch.arange(model.config.seq_len))
    assert cos16.dtype == torch.float32
    torch.testing.assert_close(cos16, cos32, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Loss and caption dropout


def test_loss_falls_on_tiny_overfit():
    torch.manual_seed(0)
    model = GPT(tiny_config(cfg_dropout=0.0)).train()
    text, codes = batch(B=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        loss, _ = model.loss(text, codes)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(V), abs=1e-4)
    assert loss.item() < 0.3 * first


def test_caption_dropout_rate_and_determinism():
    model = tiny_model(cfg_dropout=0.25)
    text = torch.randint(1, V, (8000, 8))  # no PAD in the captions
    torch.manual_seed(123)
    dropped = model.drop_captions(text)
    is_null = (dropped == model.config.text_pad_id).all(1)
    assert is_null.float().mean().item() == pytest.approx(0.25, abs=0.02)  # 4 sigma is 0.019
    assert torch.equal(dropped[~is_null], text[~is_null])  # kept rows untouched
    torch.manual_seed(123)
    assert torch.equal(model.drop_captions(text), dropped)  # deterministic given torch's RNG


def test_caption_dropout_only_in_training():
    model = tiny_model(cfg_dropout=1.0)
    text, codes = batch()
    null = torch.full_like(text, model.config.text_pad_id)
    eval_loss, eval_stats = model.loss(text, codes)
    assert eval_stats["null_captions"].item() == 0.0
    null_loss, _ = model.eval().loss(null, codes)
    train_loss, train_stats = model.train().loss(text, codes)  # p = 1: every caption dropped
    assert train_stats["null_captions"].item() == 1.0
    torch.testing.assert_close(train_loss, null_loss)
    assert abs(eval_loss.item() - null_loss.item()) > 1e-4


def test_text_loss_is_added_with_its_weight():
    model = tiny_model(text_loss_weight=0.5)
    torch.nn.init.normal_(model.text_head.weight, std=0.3)
    text, codes = batch()
    text[:, 6:] = model.config.text_pad_id  # padded captions: PAD targets are ignored
    loss, stats = model.loss(text, codes)
    torch.testing.assert_close(loss, stats["image_loss"] + 0.5 * stats["text_loss"])
    h = model._hidden(text, codes.flatten(1))
    ref = F.cross_entropy(model.text_head(h[:, :5]).flatten(0, 1), text[:, 1:6].flatten())
    torch.testing.assert_close(stats["text_loss"], ref)


# ---------------------------------------------------------------------------------------------------
# Saving, and the attention backend switch


def test_state_dict_roundtrip_gives_same_logits(tmp_path):
    model = tiny_model(n_kv_head=2)
    model.setup_cache(2)  # caches and rotary indices are buffers that must not be saved
    text, codes = batch()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    assert not any("cache" in k or "rope" in k for k in model.state_dict())

    config = GPTConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    loaded = GPT(config).eval()
    loaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    torch.testing.assert_close(loaded(text, codes), model(text, codes), rtol=0, atol=0)


def _fake_kernels(calls: list):
    """Stands in for vqgpt.kernels: records the calls, computes with plain torch."""

    def expand(k, hq):
        return k.repeat_interleave(hq // k.shape[1], dim=1)

    def attention(q, k, v, causal=True, backend="auto"):
        calls.append(("attention", q.shape, k.shape, causal))
        return F.scaled_dot_product_attention(q, expand(k, q.shape[1]), expand(v, q.shape[1]), is_causal=causal)

    def decode_attention(q, k_cache, v_cache, cache_len, backend="auto"):
        calls.append(("decode", q.shape, k_cache.shape, cache_len.clone()))
        live = torch.arange(k_cache.shape[2]) < cache_len[:, None]
        k, v = expand(k_cache, q.shape[1]), expand(v_cache, q.shape[1])
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=live[:, None, None]).squeeze(2)

    return types.SimpleNamespace(attention=attention, decode_attention=decode_attention)


def test_triton_backend_calls_kernels_with_the_agreed_signatures(monkeypatch):
    calls = []
    fake = _fake_kernels(calls)
    monkeypatch.setitem(sys.modules, "vqgpt.kernels", fake)
    monkeypatch.setattr(vqgpt, "kernels", fake, raising=False)
    model = tiny_model(n_kv_head=2)
    text, codes = batch(B=2)
    ref = model(text, codes)
    assert calls == []  # "auto" on CPU is torch

    model.config.attn_backend = "triton"
    torch.testing.assert_close(model(text, codes), ref)
    assert calls[0] == ("attention", (2, 4, 8 + 16, 8), (2, 2, 8 + 16, 8), True)

    calls.clear()
    model.setup_cache(2)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_cached(text_ids=text), ref[:, 0])
        pos = torch.tensor(model.config.image_start)
        torch.testing.assert_close(model.forward_cached(codes=codes[:, 0, 0], input_pos=pos), ref[:, 1])
    kinds = [c[0] for c in calls]
    assert kinds == ["attention"] * 2 + ["decode"] * 2  # prefill per layer, then one decode step per layer
    _, q_shape, cache_shape, cache_len = calls[-1]
    assert q_shape == (2, 4, 8) and cache_shape == (2, 2, model.config.seq_len, 8)
    assert cache_len.dtype == torch.long and cache_len.tolist() == [10, 10]  # text 8 + BOI + 1 code


def test_triton_backend_is_triton_or_a_one_line_error(monkeypatch):
    """attn_backend="triton" never falls back to PyTorch quietly: off CUDA (without the interpreter) and without
    triton it is a one-line RuntimeError that says what to do; "auto" on a CPU stays on SDPA, importing nothing."""
    import vqgpt.model

    model = tiny_model()
    text, codes = batch(B=2)
    monkeypatch.setattr(vqgpt.model, "triton_installed", lambda: pytest.fail("'auto' on a CPU looked for triton"))
    model(text, codes)
    model.config.attn_backend = "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(vqgpt.model, "triton_installed", lambda: True)
    with pytest.raises(RuntimeError, match=r"^backend 'triton' needs CUDA tensors, these are on cpu; use") as err:
        model(text, codes)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU interpreter counts as Triton, but triton is missing
    monkeypatch.setattr(vqgpt.model, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"^backend 'triton' needs the triton package .*use 'auto' or 'torch'$"):
        model(text, codes)
