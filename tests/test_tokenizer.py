import json

import pytest
import torch

from vqgpt import ImageTokenizer, TokenizerConfig
from vqgpt.tokenizer import tokenizer_config

TINY = dict(image_size=32, channels=(16, 32), patch_size=2, fsq_levels=(4, 4, 3))


@pytest.fixture(params=["fsq", "vq"])
def tok(request):
    torch.manual_seed(0)
    extra = {"quantizer": "vq", "vq_codebook_size": 64, "vq_codebook_dim": 4} if request.param == "vq" else {}
    model = ImageTokenizer(TokenizerConfig(**TINY, **extra))
    model.train()
    model(torch.rand(8, 3, 32, 32))  # a training pass: the VQ codebook runs its k-means init here
    return model.eval()


def test_shapes_dtypes_and_range(tok):
    x = torch.rand(3, 3, 32, 32)
    codes = tok.encode(x)
    assert codes.shape == (3, tok.grid_size, tok.grid_size) == (3, 8, 8)
    assert codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < tok.codebook_size
    y = tok.decode(codes)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1
    assert tok.downsample == 4 and tok.image_size == 32


def test_encode_is_deterministic_and_batch_independent(tok):
    x = torch.rand(6, 3, 32, 32)
    full = tok.encode(x)
    assert torch.equal(full, tok.encode(x))
    singles = torch.cat([tok.encode(x[i : i + 1]) for i in range(6)])
    assert torch.equal(full, singles)
    assert torch.allclose(tok.decode(full), torch.cat([tok.decode(full[i : i + 1]) for i in range(6)]), atol=1e-5)


def test_save_load_gives_identical_codes(tok, tmp_path):
    x = torch.rand(4, 3, 32, 32)
    tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = ImageTokenizer.from_pretrained(tmp_path / "tok")
    assert torch.equal(tok.encode(x), loaded.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), loaded.decode(loaded.encode(x)))
    assert loaded.fingerprint() == tok.fingerprint()


def test_wrong_image_size_and_channels_are_clear_errors(tok):
    with pytest.raises(ValueError, match="encodes 32x32 images, got 64x64"):
        tok.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        tok.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="float images"):
        tok.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"codes of shape \(B, 8, 8\)"):
        tok.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie in"):
        tok.decode(torch.full((1, 8, 8), tok.codebook_size))


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown tokenizer preset 'nope'"):
        tokenizer_config("nope")
    with pytest.raises(ValueError, match="not a multiple of the downsample"):
        TokenizerConfig(image_size=60)
    with pytest.raises(ValueError, match="unknown quantizer"):
        TokenizerConfig(quantizer="lfq")
    assert tokenizer_config("f16").grid_size == 16


def test_checkpoint_missing_files(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no tokenizer directory"):
        ImageTokenizer.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json, model.safetensors"):
        ImageTokenizer.from_pretrained(tmp_path / "empty")
    tok.save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        ImageTokenizer.from_pretrained(tmp_path / "t")


def test_checkpoint_with_other_weights_names_them(tmp_path, tok):
    tok.save_pretrained(tmp_path / "t")
    # Same directory, but a config describing a wider model: every misshapen weight is an error.
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["channels"] = [16, 48]
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="misshapen"):
        ImageTokenizer.from_pretrained(tmp_path / "t")
    # Weights of another model entirely.
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "t" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \d+ .*unexpected 1 \(foo.weight\)"):
        ImageTokenizer.from_pretrained(tmp_path / "t")
    # A truncated weights file.
    (tmp_path / "t" / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="cannot read weights"):
        ImageTokenizer.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer config"):
        ImageTokenizer.from_pretrained(tmp_path / "t")


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = ImageTokenizer(TokenizerConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Smooth images (low-frequency patterns) that a tiny auto-encoder can learn in a few steps.
    g = torch.linspace(0, 1, 32)
    x = torch.stack(
        [(torch.sin(6 * g[None, :] * (i + 1) / 8 + g[:, None] * c) + 1) / 2 for i in range(8) for c in range(3)]
    ).view(8, 3, 32, 32)
    losses = []
    for _ in range(60):
        recon, _, aux = model(x)
        loss = (recon - x).abs().mean() + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses[::10]


@pytest.mark.parametrize("norm", ["group", "channel"])
def test_channel_norm_keeps_codes_local(norm):
    """With norm="channel" a patch's latent depends only on the pixels its convolutions reach; GroupNorm's
    whole-image statistics let a change far away move it (the GPT would have to model that too)."""
    torch.manual_seed(0)
    model = ImageTokenizer(TokenizerConfig(**{**TINY, "image_size": 96, "norm": norm})).eval()
    a = torch.rand(1, 3, 96, 96)
    b = a.clone()
    b[..., 64:, 64:] = torch.rand(1, 3, 32, 32)  # 60+ px from the top-left patch
    with torch.no_grad():
        za, zb = model.encoder(a * 2 - 1), model.encoder(b * 2 - 1)  # (1, d, 24, 24)
    same = torch.allclose(za[..., :2, :2], zb[..., :2, :2], atol=1e-6)
    assert same == (norm == "channel")
    assert not torch.allclose(za[..., -1, -1], zb[..., -1, -1])  # where the pixels changed, the latent does


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm"):
        TokenizerConfig(**TINY, norm="batch")


def test_fields_added_later_leave_old_configs_and_fingerprints_alone():
    """A tokenizer saved before `norm` existed has no such key: its config.json and fingerprint (which GPT
    checkpoints and code caches record) must not change when read by this version."""
    assert "norm" not in TokenizerConfig(**TINY).to_dict()
    assert TokenizerConfig(**TINY, norm="channel").to_dict()["norm"] == "channel"
    torch.manual_seed(0)
    a = ImageTokenizer(TokenizerConfig(**TINY))
    b = ImageTokenizer(TokenizerConfig.from_dict({**TINY, "norm": "group"}))
    b.load_state_dict(a.state_dict())
    assert a.fingerprint() == b.fingerprint()


def test_encode_refuses_values_outside_its_range_and_non_finite_weights(tok, tmp_path):
    x = torch.rand(2, 3, tok.image_size, tok.image_size)
    with pytest.raises(ValueError, match="divide 0-255 pixels by 255"):
        tok.encode(x * 255)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        tok.encode(torch.full_like(x, float("nan")))
    tok.save_pretrained(tmp_path / "t")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "t" / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    save_file({**state, name: torch.full_like(state[name], float("nan"))}, str(tmp_path / "t" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"non-finite values .*{name}"):
        ImageTokenizer.from_pretrained(tmp_path / "t")
    save_file({**state, name: state[name].to(torch.int32)}, str(tmp_path / "t" / "model.safetensors"))
    with pytest.raises(ValueError, match="wrong dtype"):
        ImageTokenizer.from_pretrained(tmp_path / "t")
