"""ImageTextScorer: a text tower trained against the locked image tokenizer (LiT).

LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning", arXiv:2111.07991) trains
only a text tower, contrastively, against a frozen pretrained image tower, and found that locking the image
side beats tuning it. Here the image tower is a trained `ImageTokenizer`'s encoder, never updated. Its code
grid is read out into one vector per image that keeps where things are: the codes one-hot at each of the
h*w positions ("onehot", h*w*codebook_size dims), or the quantized latents flattened ("latent",
d*h*w dims). A pooled grid would lose position. With `head="none"` (the default, LiT's "locked") that
vector, normalised, is the image embedding and the text tower learns to point into its space. `head="conv"`
(3x3 convolutions over the locked grid, then a linear map of the whole feature map) and `head="mlp"` add a
small trainable image-side head; the tokenizer stays frozen either way. On shapes the locked readout cannot
read shape in new combinations and the conv head can (ConvHead; docs/RESULTS.md).

    scorer = ImageTextScorer.from_pretrained("runs/lit")
    scores = scorer(images, ["a green apple", ...])     # float (B, 3, H, W) in [0, 1] -> (B,) cosine agreement
    sim = scorer.similarity_codes(codes, texts)          # (N_images, N_texts), from code grids directly

Layout of a saved scorer (what `train.py lit --out DIR` writes):

    DIR/config.json          {"model_type": "vqgpt-lit-scorer", "lit": LiTConfig, "image_tokenizer": fingerprint,
                              "text_tokenizer": fingerprint}
    DIR/model.safetensors    text tower (+ image head) and the temperature; never the image tokenizer's weights
    DIR/image_tokenizer/     the locked image tower (ImageTokenizer.save_pretrained)
    DIR/text_tokenizer/      TextTokenizer.save_pretrained
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import atomic_write_bytes, read_json_file, save_weights
from .tokenizer import ImageTokenizer, load_state_strict

MODEL_TYPE = "vqgpt-lit-scorer"
READOUTS = ("onehot", "latent")
HEADS = ("none", "mlp", "conv")
IGNORED_LOGIT = -1e4  # a pair left out of the softmax: exp(-1e4 - 100) is 0 in float32 (logits are within +-100)


@dataclass
class LiTConfig:
    readout: str = "onehot"  # how the locked code grid becomes one vector: "onehot" | "latent" (see module doc)
    head: str = "none"  # "none": the locked readout is the embedding (LiT); "mlp": a trainable image-side head
    head_dim: int = 256  # width of the image head's output and of the joint space when head is not "none"
    head_width: int = 64  # channels of the conv head's layers
    head_layers: int = 3  # its 3x3 convolutions over the locked grid
    text_dim: int = 128  # width of the text transformer
    text_layers: int = 2  # its blocks (bidirectional self-attention, pre-norm)
    text_heads: int = 4  # attention heads
    text_len: int = 32  # text context in tokens (longer captions are truncated)
    text_vocab_size: int = 1024  # the text tokenizer's vocabulary
    text_pad_id: int = 0  # its PAD id (masked out of attention and pooling)
    grid_size: int = 8  # codes per side of the locked tokenizer
    codebook_size: int = 240  # its number of codes
    latent_dim: int = 3  # its quantized latent channels
    image_dim: int = field(init=False)  # the locked readout's width (derived)
    embed_dim: int = field(init=False)  # the joint space's width (derived)

    def __post_init__(self):
        if self.readout not in READOUTS:
            raise ValueError(f"unknown readout {self.readout!r}; choose one of {list(READOUTS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown image head {self.head!r}; choose one of {list(HEADS)}")
        if self.head == "conv" and (self.head_layers < 1 or self.head_width < 1):
            raise ValueError(
                f"the conv head needs head_layers >= 1 and head_width >= 1, got {self.head_layers} and "
                f"{self.head_width}"
            )
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim {self.text_dim} must be a multiple of text_heads {self.text_heads}")
        cells = self.grid_size * self.grid_size
        self.image_dim = cells * (self.codebook_size if self.readout == "onehot" else self.latent_dim)
        self.embed_dim = self.image_dim if self.head == "none" else self.head_dim

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict) -> LiTConfig:
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - known - {"image_dim", "embed_dim"})
        if unknown:
            raise ValueError(f"unknown LiT config fields {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})


class TextTower(nn.Module):
    """Text ids (B, T) -> (B, embed_dim): a small bidirectional transformer, mean-pooled over the real tokens."""

    def __init__(self, cfg: LiTConfig):
        super().__init__()
        self.pad_id = cfg.text_pad_id
        self.tok_emb = nn.Embedding(cfg.text_vocab_size, cfg.text_dim)
        self.pos_emb = nn.Parameter(torch.randn(cfg.text_len, cfg.text_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.text_dim,
            cfg.text_heads,
            4 * cfg.text_dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)
        self.proj = nn.Linear(cfg.text_dim, cfg.embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == self.pad_id  # (B, T)
        x = self.tok_emb(ids) + self.pos_emb[: ids.shape[1]]  # (B, T, C)
        # The null caption (all PAD) would leave attention nothing to look at: let it see its first position.
        attend_mask = pad.clone()
        attend_mask[:, 0] = False
        x = self.norm(self.blocks(x, src_key_padding_mask=attend_mask))
        keep = (~pad).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, C)
        return self.proj(pooled)


class ConvHead(nn.Module):
    """The locked grid (B, C, h, w) -> (B, head_dim): 3x3 convolutions shared by every position, then one
    linear map of the whole feature map, so where things are is kept.

    Why convolutions: a linear function of the grid (the locked readouts, or the first layer of the MLP head)
    is a sum of per-(position, code) weights, and in a new combination the codes at a shape's rim are ones
    no training image had at that place in that colour. On shapes, a linear probe of the one-hot grid reads
    shape at 0.985 on training combinations and 0.477 on held-out ones; a probe of two 3x3 convolutions on the
    latents (then a max pool) at 0.998 and 0.994. Shared filters learn what a silhouette's edge looks like in
    any colour."""

    def __init__(self, cfg: LiTConfig):
        super().__init__()
        channels = cfg.codebook_size if cfg.readout == "onehot" else cfg.latent_dim
        layers: list[nn.Module] = []
        for _ in range(cfg.head_layers):
            layers += [nn.Conv2d(channels, cfg.head_width, 3, padding=1), nn.GELU()]
            channels = cfg.head_width
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(channels * cfg.grid_size * cfg.grid_size, cfg.head_dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(grid).flatten(1))  # (B, C', h, w) -> (B, head_dim)


class ImageTextScorer(nn.Module):
    """Agreement of images with texts in a joint space learned against a locked image tokenizer."""

    def __init__(self, config: LiTConfig, image_tokenizer: ImageTokenizer, text_tokenizer):
        super().__init__()
        tc = image_tokenizer.config
        if (config.grid_size, config.codebook_size, config.latent_dim) != (
            tc.grid_size,
            tc.codebook_size,
            tc.latent_dim,
        ):
            raise ValueError(
                f"the LiT config expects a {config.grid_size}x{config.grid_size} grid of "
                f"{config.codebook_size} codes, the image tokenizer makes {tc.grid_size}x{tc.grid_size} "
                f"of {tc.codebook_size}"
            )
        self.config = config
        # The locked tower is kept out of the module tree: no optimizer, state_dict or .train() ever reaches it.
        object.__setattr__(self, "image_tokenizer", image_tokenizer.eval().requires_grad_(False))
        self.text_tokenizer = text_tokenizer
        self.text = TextTower(config)
        self.head = None
        if config.head == "mlp":
            self.head = nn.Sequential(
                nn.Linear(config.image_dim, config.head_dim), nn.GELU(), nn.Linear(config.head_dim, config.head_dim)
            )
        elif config.head == "conv":
            self.head = ConvHead(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def to(self, *args, **kwargs) -> ImageTextScorer:
        self.image_tokenizer.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    # --- the two towers ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> code grids (B, h, w) of the locked tokenizer."""
        return self.image_tokenizer.encode(images.to(self.image_tokenizer.device))

    def readout(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids (B, h, w) or (B, h*w) -> the locked image vector (B, image_dim), unit length."""
        codes = codes.reshape(codes.shape[0], -1).to(self.device).long()  # (B, h*w)
        with torch.no_grad():
            if self.config.readout == "onehot":
                x = F.one_hot(codes, self.config.codebook_size).float().flatten(1)  # (B, h*w*V)
            else:
                g = self.config.grid_size
                x = self.image_tokenizer.codes_to_latents(codes.reshape(-1, g, g)).float().flatten(1)  # (B, d*h*w)
        return F.normalize(x, dim=-1)

    def grid(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids (B, h, w) or (B, h*w) -> the locked features of each cell (B, C, h, w): the codes one-hot
        (C = codebook_size) or their quantized latents (C = latent_dim)."""
        g = self.config.grid_size
        codes = codes.reshape(-1, g, g).to(self.device).long()  # (B, h, w)
        with torch.no_grad():
            if self.config.readout == "onehot":
                return F.one_hot(codes, self.config.codebook_size).permute(0, 3, 1, 2).float()  # (B, V, h, w)
            return self.image_tokenizer.codes_to_latents(codes).float()  # (B, d, h, w)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if isinstance(self.head, ConvHead):
            return F.normalize(self.head(self.grid(codes)), dim=-1)  # (B, head_dim)
        x = self.readout(codes)
        return x if self.head is None else F.normalize(self.head(x), dim=-1)  # (B, embed_dim)

    def _cosines(self, codes: torch.Tensor, txt: torch.Tensor, paired: bool = False) -> torch.Tensor:
        """Cosines of code grids (Bi, h, w) with unit text embeddings (Bt, D): (Bi, Bt), or (B,) when paired.

        The locked one-hot readout is never built: its dot product with a text vector is the sum of that
        vector's entries at (position, code) of each cell, a gather (one-hot products cost h*w*V per pair)."""
        if self.config.readout != "onehot" or self.head is not None:
            img = self.embed_codes(codes)
            return (img * txt).sum(-1) if paired else img @ txt.T
        codes = codes.reshape(codes.shape[0], -1).to(self.device).long()  # (Bi, cells)
        cells = codes.shape[1]
        idx = codes + torch.arange(cells, device=codes.device) * self.config.codebook_size  # (Bi, cells)
        if paired:
            return txt.gather(1, idx).sum(-1) / math.sqrt(cells)  # (B,)
        return txt[:, idx.flatten()].reshape(len(txt), *idx.shape).sum(-1).T / math.sqrt(cells)  # (Bi, Bt)

    def text_ids(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        import warnings

        with warnings.catch_warnings():  # a long prompt is truncated to the text context: that is fine here
            warnings.simplefilter("ignore")
            return self.text_tokenizer(list(texts), self.config.text_len).to(self.device)

    def embed_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids.to(self.device)).float(), dim=-1)  # (B, embed_dim)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.embed_text_ids(self.text_ids(texts))

    # --- scores -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_codes(self, codes: torch.Tensor, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(N,) cosine agreement of code grid i with text i, in [-1, 1]; each row alone (batch-independent)."""
        if len(codes) != len(texts):
            raise ValueError(f"{len(codes)} images but {len(texts)} texts: score pairs them one to one")
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(
                self._cosines(codes[i : i + batch_size], self.embed_texts(texts[i : i + batch_size]), True).cpu()
            )
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def similarity_codes(self, codes: torch.Tensor, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(N_images, N_texts) cosine similarities: retrieval and zero-shot classification."""
        was = self.training
        self.eval()
        txt = torch.cat([self.embed_texts(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
        sim = torch.cat([self._cosines(c, txt).cpu() for c in codes.split(batch_size)])
        self.train(was)
        return sim

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """float images (N, 3, H, W) in [0, 1] and N texts -> (N,) agreement of image i with text i."""
        return self.score_codes(self.encode_images(images), texts)

    def check_image_tokenizer(self, image_tokenizer: ImageTokenizer, what: str = "the pipeline") -> None:
        """A scorer reads the codes of the tokenizer it was trained against; any other one is refused."""
        mine, theirs = self.image_tokenizer.fingerprint(), image_tokenizer.fingerprint()
        if mine != theirs:
            raise ValueError(
                f"the scorer was trained on image tokenizer {mine}, but {what} uses {theirs}: train "
                f"a scorer on this tokenizer (`python train.py lit --tokenizer DIR`)"
            )

    # --- training ---------------------------------------------------------------------------------------
    def loss(
        self,
        text_ids: torch.Tensor,
        codes: torch.Tensor,
        negative_ids: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Symmetric contrastive loss (CLIP/LiT) over the batch. Rows with the same caption are all positives
        of each other (a small captioned set repeats captions within a batch).

        negative_ids (B, K, T): captions known not to describe image i (hard negatives, e.g. its caption with
        one attribute changed), added to image i's candidate texts. ignore (B, B) bool: pairs (image i, text j)
        that may match although the captions differ (text j leaves unsaid what tells them apart), left out of
        both softmaxes rather than pushed apart."""
        txt = self.embed_text_ids(text_ids)  # (B, D)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # CLIP caps the temperature at 1/100
        logits = scale * self._cosines(codes, txt)  # (B, B): image i against text j
        same = (text_ids[:, None, :] == text_ids[None, :, :]).all(-1)  # (B, B)
        if ignore is not None:
            # A large finite logit, not -inf: a zero target times log_softmax(-inf) would be NaN.
            logits = logits.masked_fill(ignore.to(logits.device) & ~same, IGNORED_LOGIT)
        target = same.float() / same.sum(1, keepdim=True)
        t2i = F.cross_entropy(logits.T, target)
        if negative_ids is not None:
            B, K, T = negative_ids.shape
            neg = self.embed_text_ids(negative_ids.reshape(B * K, T))  # (B*K, D)
            hard = scale * self._cosines(codes.repeat_interleave(K, 0), neg, paired=True).reshape(B, K)
            logits, target = torch.cat([logits, hard], 1), torch.cat([target, target.new_zeros(B, K)], 1)
        loss = 0.5 * (F.cross_entropy(logits, target) + t2i)
        acc = (target.gather(1, logits.argmax(1, keepdim=True)) > 0).float().mean()
        return loss, {"acc": acc.detach(), "scale": scale.detach()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- persistence ------------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "model_type": MODEL_TYPE,
            "lit": self.config.to_dict(),
            "image_tokenizer": self.image_tokenizer.fingerprint(),
            "text_tokenizer": self.text_tokenizer.fingerprint(),
        }

    def save_pretrained(self, path: str | os.PathLike, state: dict | None = None) -> None:
        path = Path(path)
        self.image_tokenizer.save_pretrained(path / "image_tokenizer")
        self.text_tokenizer.save_pretrained(path / "text_tokenizer")
        save_weights(path / "model.safetensors", state if state is not None else self.state_dict())
        # config.json last: a directory with a config names weights that are already in place.
        atomic_write_bytes(path / "config.json", (json.dumps(self.config_dict(), indent=2) + "\n").encode())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> ImageTextScorer:
        from .text import TextTokenizer

        path = Path(path)
        missing = [
            n
            for n in ("config.json", "model.safetensors", "image_tokenizer", "text_tokenizer")
            if not (path / n).exists()
        ]
        if missing:
            raise FileNotFoundError(
                f"{path} is not an ImageTextScorer: missing {', '.join(missing)} (train one "
                f"with `python train.py lit --out {path}`)"
            )
        raw = read_json_file(path / "config.json")
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path / 'config.json'} describes {raw.get('model_type')!r}, not {MODEL_TYPE!r}")
        if not isinstance(raw.get("lit"), dict):
            raise ValueError(f"{path / 'config.json'} has no 'lit' object (the scorer's architecture)")
        image_tok = ImageTokenizer.from_pretrained(path / "image_tokenizer", device=device)
        text_tok = TextTokenizer.from_pretrained(path / "text_tokenizer")
        for name, tok in (("image_tokenizer", image_tok), ("text_tokenizer", text_tok)):
            if raw.get(name) and raw[name] != tok.fingerprint():
                raise ValueError(
                    f"{path / name} is not the {name.replace('_', ' ')} this scorer was trained with "
                    f"(fingerprint {tok.fingerprint()}, config.json expects {raw[name]})"
                )
        scorer = cls(LiTConfig.from_dict(raw["lit"]), image_tok, text_tok)
        load_state_strict(scorer, str(path / "model.safetensors"))
        return scorer.to(device).eval()


def lit_config(image_tokenizer: ImageTokenizer, text_tokenizer, **overrides) -> LiTConfig:
    """The config of a scorer over these two tokenizers (overrides: readout, head, text_dim, ...)."""
    tc = image_tokenizer.config
    return LiTConfig(
        grid_size=tc.grid_size,
        codebook_size=tc.codebook_size,
        latent_dim=tc.latent_dim,
        text_vocab_size=text_tokenizer.vocab_size,
        text_pad_id=text_tokenizer.pad_id,
        **overrides,
    )


# --- evaluation ---------------------------------------------------------------------------------------------
def retrieval_recall(sim: torch.Tensor, texts: list[str], images_captions: list[str], ks=(1, 5)) -> dict:
    """Text-to-image recall@k over `sim` (N_images, N_texts): for each distinct text, is one of the images
    captioned with it among the k most similar? (A set with repeated captions has several right images.)"""
    distinct = sorted(set(texts))
    col = {t: i for i, t in enumerate(texts)}
    cols = torch.tensor([col[t] for t in distinct])
    order = sim[:, cols].T.argsort(dim=1, descending=True)  # (N_distinct, N_images)
    out = {}
    for k in ks:
        hits = [any(images_captions[j] == t for j in order[i, :k].tolist()) for i, t in enumerate(distinct)]
        out[f"retrieval_r{k}"] = sum(hits) / max(len(hits), 1)
    return out
