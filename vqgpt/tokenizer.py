"""ImageTokenizer: a convolutional VQ-VAE that turns images into a grid of discrete codes and back.

The quantizer comes from vector-quantize-pytorch, behind one config switch:
  - "fsq": finite scalar quantization (Mentzer et al. 2023, arXiv:2309.15505). No codebook to learn, no
    auxiliary loss, and close to 100% code usage out of the box. The default.
  - "vq":  a learned codebook with low-dimensional l2-normalised codes, k-means init and dead-code
    replacement (the recipe of LlamaGen, arXiv:2406.06525, and ViT-VQGAN, arXiv:2110.04627).

    tok = ImageTokenizer.from_pretrained("runs/tok")   # config.json + model.safetensors (dir or hub repo)
    codes = tok.encode(images)                         # float (B, 3, H, W) in [0, 1] -> long (B, h, w)
    images = tok.decode(codes)                         # long (B, h, w) -> float (B, 3, H, W) in [0, 1]

This module needs only torch, vector-quantize-pytorch and safetensors (huggingface_hub for hub repos).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .io import (
    atomic_write_bytes,
    atomic_write_json,
    load_state_strict,
    model_fingerprint,
    read_json_file,
    save_weights,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "vqgpt-image-tokenizer"
# config.json entries that describe the weights rather than the architecture (absent in older files):
# the package versions that wrote them, the training data, recorded evaluation figures.
METADATA = ("versions", "trained_on", "evaluation")


NORMS = ("group", "channel")
# Fields added after the first release -> the value that tokenizers saved without them have.
LATER_FIELDS = {"norm": "group"}


RANGE_SLACK = 1e-3  # encode() accepts pixels this far outside [0, 1] (resampling overshoot, rounding)


@dataclass
class TokenizerConfig:
    image_size: int = 64  # side of the square images it encodes, in pixels
    patch_size: int = 2  # the stem's stride (and the decoder's final pixel-shuffle factor)
    channels: tuple[int, ...] = (64, 128, 256)  # width of each stage; every stage after the first halves
    res_blocks: int = 1  # residual blocks per stage (the bottleneck gets one more)
    norm: str = "group"  # "group": GroupNorm, statistics over the whole image; "channel": per position (local codes)
    quantizer: str = "fsq"  # "fsq" (finite scalar quantization) or "vq" (learned l2-normalised codebook)
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ: levels per latent channel; codebook = their product
    vq_codebook_size: int = 16384  # VQ: number of codes
    vq_codebook_dim: int = 8  # VQ: code dimension (low-dimensional lookup, as in LlamaGen)
    vq_commitment_weight: float = 0.25  # VQ: weight of the commitment loss
    vq_dead_code_threshold: float = 2.0  # VQ: codes used fewer times than this (EMA) are re-seeded
    downsample: int = field(init=False)  # pixels per code along each side (derived)
    grid_size: int = field(init=False)  # codes per side (derived)
    codebook_size: int = field(init=False)  # number of distinct codes (derived)

    def __post_init__(self):
        from .model import _is_int, check_fields

        check_fields(
            self,
            {
                "image_size": (8, 4096),
                "patch_size": (1, 64),
                "res_blocks": (0, 16),
                "vq_codebook_size": (2, 2**20),
                "vq_codebook_dim": (1, 1024),
            },
            {"vq_commitment_weight": (0.0, 1e3), "vq_dead_code_threshold": (0.0, 1e9)},
        )
        for name, low, high, most in (("channels", 1, 8192, 8), ("fsq_levels", 2, 1024, 16)):
            v = getattr(self, name)
            if (
                not isinstance(v, (list, tuple))
                or not 1 <= len(v) <= most
                or not all(_is_int(c) and low <= c <= high for c in v)
            ):
                raise ValueError(f"TokenizerConfig.{name} must be 1 to {most} ints in [{low}, {high}], got {v!r}")
        self.channels = tuple(int(c) for c in self.channels)
        self.fsq_levels = tuple(int(v) for v in self.fsq_levels)
        if self.quantizer not in ("fsq", "vq"):
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose 'fsq' or 'vq'")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if not self.channels:
            raise ValueError("channels must name at least one stage")
        self.downsample = self.patch_size * 2 ** (len(self.channels) - 1)
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the downsample factor {self.downsample}"
            )
        self.grid_size = self.image_size // self.downsample
        if self.quantizer == "fsq":
            self.codebook_size = math.prod(self.fsq_levels)
        else:
            self.codebook_size = self.vq_codebook_size

    @property
    def latent_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.vq_codebook_dim

    def to_dict(self) -> dict:
        """The constructor fields, less those added later while they hold the value every tokenizer saved
        before them implied: config.json and fingerprint() of existing tokenizers stay what they were."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {k: v for k, v in d.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerConfig:
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - known - {"downsample", "grid_size", "codebook_size", "model_type"})
        if unknown:
            raise ValueError(f"tokenizer config has unknown fields {unknown}; is this an ImageTokenizer config?")
        return cls(**{k: v for k, v in d.items() if k in known})


# Named presets. "demo" is sized for a 10-minute run on 2 CPU cores (64 px, 8x8 codes); "f16" is the
# GPU-scale tokenizer (256 px, 16x16 codes, a 16k codebook as in LlamaGen).
PRESETS: dict[str, dict] = {
    "tiny": dict(image_size=32, channels=(16, 32), fsq_levels=(4, 4, 4)),  # smoke tests: seconds on a CPU
    "demo": dict(image_size=64, patch_size=2, channels=(32, 64, 128), fsq_levels=(8, 5, 5, 5)),
    "demo-vq": dict(image_size=64, patch_size=2, channels=(32, 64, 128), quantizer="vq", vq_codebook_size=1024),
    "f8": dict(image_size=256, channels=(128, 256, 512), fsq_levels=(8, 8, 8, 5, 5, 5), res_blocks=2),
    "f16": dict(image_size=256, channels=(128, 128, 256, 512), fsq_levels=(8, 8, 8, 6, 5), res_blocks=2),
    "f16-vq": dict(image_size=256, channels=(128, 128, 256, 512), quantizer="vq", res_blocks=2),
}


def tokenizer_config(preset: str = "demo", **overrides) -> TokenizerConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; choose one of {sorted(PRESETS)}")
    return TokenizerConfig(**{**PRESETS[preset], **overrides})


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each position (ConvNeXt's LayerNorm2d): (B, C, H, W) -> same."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _norm(c: int, kind: str) -> nn.Module:
    """Never BatchNorm: encode/decode must not depend on what else is in the batch.

    GroupNorm normalises each group of channels over the whole image, so the code of a patch of plain
    background changes with what is drawn elsewhere (a gray corner took 5 codes over the shapes test set);
    the GPT then has to model that variation too. ChannelNorm normalises each position on its own: a
    patch's code depends only on the pixels in its receptive field.
    """
    if kind == "channel":
        return ChannelNorm(c)
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c: int, norm: str):
        super().__init__()
        self.norm1, self.conv1 = _norm(c, norm), nn.Conv2d(c, c, 3, padding=1)
        self.norm2, self.conv2 = _norm(c, norm), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, latent_dim, H/ds, W/ds). Each stage halves the resolution."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chans = cfg.channels
        # A patchifying stem: full-resolution convolutions are where the compute goes, so the encoder
        # starts at 1/patch_size resolution (p x p patches, as a ViT would).
        p = cfg.patch_size
        layers: list[nn.Module] = [nn.Conv2d(3, chans[0], p, stride=p)]
        for i, c in enumerate(chans):
            layers += [ResBlock(c, cfg.norm) for _ in range(cfg.res_blocks)]
            if i + 1 < len(chans):
                layers.append(nn.Conv2d(c, chans[i + 1], 4, stride=2, padding=1))
        layers += [
            ResBlock(chans[-1], cfg.norm),
            _norm(chans[-1], cfg.norm),
            nn.SiLU(),
            nn.Conv2d(chans[-1], cfg.latent_dim, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(B, latent_dim, h, w) -> (B, 3, h*ds, w*ds) in about [-1, 1]; the mirror of the encoder."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        chans = cfg.channels[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, chans[0], 3, padding=1), ResBlock(chans[0], cfg.norm)]
        for i, c in enumerate(chans):
            layers += [ResBlock(c, cfg.norm) for _ in range(cfg.res_blocks)]
            if i + 1 < len(chans):
                layers.append(nn.ConvTranspose2d(c, chans[i + 1], 4, stride=2, padding=1))
        # The last upsampling is a pixel shuffle (Shi et al. 2016, arXiv:1609.05158): one conv at
        # 1/patch_size resolution predicts the p x p pixels of each position, the mirror of the stem.
        p = cfg.patch_size
        layers += [
            _norm(chans[-1], cfg.norm),
            nn.SiLU(),
            nn.Conv2d(chans[-1], 3 * p * p, 3, padding=1),
            nn.PixelShuffle(p),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def _build_quantizer(cfg: TokenizerConfig) -> nn.Module:
    from vector_quantize_pytorch import FSQ, VectorQuantize

    if cfg.quantizer == "fsq":
        return FSQ(levels=list(cfg.fsq_levels))
    return VectorQuantize(
        dim=cfg.latent_dim,
        codebook_size=cfg.vq_codebook_size,
        use_cosine_sim=True,  # l2-normalised codes and inputs
        kmeans_init=True,
        kmeans_iters=10,
        threshold_ema_dead_code=cfg.vq_dead_code_threshold,
        commitment_weight=cfg.vq_commitment_weight,
        decay=0.99,
    )


class ImageTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = TokenizerConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a TokenizerConfig or keyword fields, not both")
        self.config = config
        self.trained_on: dict | None = None  # the training data (train.py records it; the model card's licence)
        self.evaluation: dict | None = None  # recorded evaluations (`python -m vqgpt.eval tokenizer --record`)
        self.encoder = Encoder(config)
        self.quantizer = _build_quantizer(config)
        self.decoder = Decoder(config)

    # --- properties users rely on -------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- the model ------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"expected images of shape (B, 3, H, W), got {shape}")
        s = self.config.image_size
        if images.shape[-2:] != (s, s):
            raise ValueError(
                f"this tokenizer encodes {s}x{s} images, got {images.shape[-2]}x{images.shape[-1]}; "
                f"resize or crop them first"
            )
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")

    def quantize(self, images: torch.Tensor):
        """float (B, 3, H, W) in [0, 1] -> (quantized latents (B, d, h, w), codes (B, h, w), aux loss)."""
        z = self.encoder(images * 2 - 1)  # (B, d, h, w)
        B, d, h, w = z.shape
        # Both quantizers get an explicit (B, h*w, d) sequence: FSQ would otherwise guess the channel axis.
        z = z.flatten(2).transpose(1, 2)  # (B, h*w, d)
        if self.config.quantizer == "fsq":
            zq, codes = self.quantizer(z)
            aux = z.new_zeros(())
        else:
            zq, codes, aux = self.quantizer(z)
        zq = zq.transpose(1, 2).reshape(B, d, h, w)
        return zq, codes.reshape(B, h, w), aux

    def forward(self, images: torch.Tensor):
        """Training pass: returns (reconstruction in about [0, 1], codes (B, h, w), aux loss)."""
        self._check_images(images)
        if images.device.type == "cpu":  # oneDNN's convolutions and their gradients run faster on channels-last
            images = images.contiguous(memory_format=torch.channels_last)  # activations (bench/demo_levers.py)
        zq, codes, aux = self.quantize(images)
        recon = (self.decoder(zq) + 1) / 2
        return recon, codes, aux

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> LongTensor (B, h, w)."""
        self._check_images(images)
        if images.numel():
            low, high = torch.aminmax(images.detach().float())
            if not (torch.isfinite(low) and torch.isfinite(high)) or low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
                raise ValueError(
                    f"expected float images in [0, 1], got values in [{low.item():g}, {high.item():g}]"
                    f"{'; divide 0-255 pixels by 255' if high > 2 else ''}"
                )
        images = images.to(self.device, torch.float32)
        return self.quantize(images)[1].long()

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor (B, h, w) -> quantized latents (B, d, h, w)."""
        B, h, w = codes.shape
        flat = codes.reshape(B, h * w)
        if self.config.quantizer == "fsq":
            zq = self.quantizer.indices_to_codes(flat)  # (B, h*w, d)
        else:
            zq = self.quantizer.get_output_from_indices(flat)
        return zq.transpose(1, 2).reshape(B, -1, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor (B, h, w) -> float (B, 3, H, W) in [0, 1]."""
        g = self.config.grid_size
        if not torch.is_tensor(codes) or codes.ndim != 3 or codes.shape[1:] != (g, g):
            shape = tuple(codes.shape) if torch.is_tensor(codes) else type(codes).__name__
            raise ValueError(f"expected codes of shape (B, {g}, {g}), got {shape}")
        if codes.is_floating_point():
            raise ValueError(f"expected integer codes, got dtype {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got [{codes.min()}, {codes.max()}]")
        codes = codes.to(self.device).long()
        return ((self.decoder(self.codes_to_latents(codes)) + 1) / 2).clamp(0, 1)

    # --- persistence ------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of config and weights: code caches and GPT checkpoints are keyed by it."""
        return model_fingerprint(self.config.to_dict(), self.state_dict())

    def save_pretrained(self, path: str | os.PathLike, *, model_card: bool = True, repo_id: str | None = None) -> None:
        """Write config.json + model.safetensors (+ README.md, a model card) into the directory `path`
        (atomically, file by file). repo_id: the hub repo the card's usage snippet names."""
        from .hub import CARD_NAME, versions
        from .hub import model_card as card

        path = Path(path)
        config = {
            "model_type": MODEL_TYPE,
            **self.config.to_dict(),
            "versions": versions(),
            **{k: v for k, v in (("trained_on", self.trained_on), ("evaluation", self.evaluation)) if v},
        }
        save_weights(path / WEIGHTS_NAME, self.state_dict())
        if model_card:
            n_params = sum(p.numel() for p in self.parameters())
            atomic_write_bytes(
                path / CARD_NAME,
                card(config, kind="image-tokenizer", repo_id=repo_id, where=str(path), n_params=n_params).encode(),
            )
        # config.json last: a directory with a config names weights that are already in place.
        atomic_write_json(path / CONFIG_NAME, config)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """save_pretrained into a fresh directory and upload it to the hub repo `repo_id` -> the commit URL."""
        from .hub import push_pretrained

        return push_pretrained(
            self,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message or "Upload vqgpt image tokenizer",
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> ImageTokenizer:
        """Load from a local directory, or from a hub repo id "owner/name" (huggingface_hub's snapshot_download:
        revision a branch, tag or commit; token for private repos; cache_dir instead of the hub cache)."""
        config_file, weights_file = _resolve_files(path, revision=revision, token=token, cache_dir=cache_dir)
        raw = read_json_file(config_file, "tokenizer config")
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"{config_file} describes a {raw['model_type']!r}, not an image tokenizer")
        meta = {k: raw.pop(k, None) for k in METADATA}  # what the weights were trained and written with
        model = cls(TokenizerConfig.from_dict(raw))
        load_state_strict(model, weights_file)
        model.trained_on, model.evaluation = meta["trained_on"], meta["evaluation"]
        return model.to(device).eval()


def _resolve_files(path, **hub) -> tuple[str, str]:
    """(config.json, model.safetensors) of a local directory or of a hub repo's snapshot."""
    from .hub import CARD_NAME, snapshot

    local = snapshot(path, what="tokenizer", allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME], **hub)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (local / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an ImageTokenizer checkpoint: missing {', '.join(missing)} "
            f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as written by save_pretrained)"
        )
    return str(local / CONFIG_NAME), str(local / WEIGHTS_NAME)


# load_state_strict lives in vqgpt.io; it stays importable from here, where lit.py, perceptual.py and train.py get it.
__all__ = ["ImageTokenizer", "TokenizerConfig", "PRESETS", "tokenizer_config", "load_state_strict"]
