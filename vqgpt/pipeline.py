"""TextToImage: the image tokenizer, the text tokenizer and the GPT, saved and loaded as one directory.

    pipe = TextToImage.from_pretrained("runs/t2i")
    images = pipe(["a green apple"], num_images=4, cfg_scale=3.0, top_k=100, seed=0)   # list of PIL images

Layout of a saved pipeline (what `train.py gpt --out DIR` writes):

    DIR/config.json          {"model_type": "vqgpt-text-to-image", "gpt": GPTConfig, "sampling": defaults,
                              "image_tokenizer": fingerprint, "text_tokenizer": fingerprint,
                              "trained_on": {"data", "include", "exclude", "limit"} (train.py writes it)}
    DIR/model.safetensors    GPT weights
    DIR/image_tokenizer/     ImageTokenizer.save_pretrained
    DIR/text_tokenizer/      TextTokenizer.save_pretrained

A LoRA fine-tune (`train.py gpt --init BASE --lora-rank R`) saves `adapter/` and a "base" entry in
config.json instead of model.safetensors; loading it loads the base too (see vqgpt/finetune.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes, read_json_file, save_weights
from .generate import SamplingConfig, generate
from .model import GPT, GPTConfig
from .tokenizer import ImageTokenizer, load_state_strict

MODEL_TYPE = "vqgpt-text-to-image"


class TextToImage:
    def __init__(self, gpt: GPT, image_tokenizer: ImageTokenizer, text_tokenizer, sampling=None, adapter=None,
                 trained_on: dict | None = None):
        check_compatible(gpt.config, image_tokenizer, text_tokenizer)
        self.gpt = gpt
        self.image_tokenizer = image_tokenizer
        self.text_tokenizer = text_tokenizer
        self.sampling = sampling or SamplingConfig()
        self.adapter = adapter  # finetune.Adapter when the GPT carries unmerged LoRA adapters
        self.trained_on = trained_on  # the training data and caption filter, for evaluations (vqgpt/eval.py)

    def merge_adapter(self) -> TextToImage:
        """Fold LoRA adapters into the GPT's weights (same outputs, plain layers); a no-op without them."""
        if self.adapter is not None:
            self.gpt = self.adapter.peft_model.merge_and_unload()
            self.adapter = None
        return self

    @property
    def device(self) -> torch.device:
        return self.gpt.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.head.weight.dtype

    def to(self, device=None, dtype: torch.dtype | str | None = None) -> TextToImage:
        """Move both models to `device`; `dtype` ("auto", a torch dtype or its name) casts the GPT only: the
        image tokenizer decodes in float32 (see resolve_dtype)."""
        if device is not None:
            self.gpt.to(device)
            self.image_tokenizer.to(device)
        if dtype is not None:
            self.gpt.to(resolve_dtype(dtype, self.device))
        return self

    # --- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_codes(self, prompts: list[str], num_images: int = 1, seed: int = 0, progress=False,
                       compile: bool = False, cuda_graph: bool = False, batch_size: int | None = None, **kw):
        """Codes (len(prompts) * num_images, h, w); image j of prompt i uses seed + i * num_images + j.

        batch_size: rows sampled at once (the KV cache is allocated for that many); the images do not depend
        on it. compile / cuda_graph: the decode step through torch.compile (CPU) or replayed as a CUDA graph
        (GPU); see `vqgpt.generate.generate`. Both pay a one-time cost that a large batch of images amortises.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt (use '' for an unconditional image)")
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__} {p!r:.60}")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"prompt {p!r:.80} is not valid text (lone surrogates: bytes that were not "
                                 f"UTF-8)") from None
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
        unknown = set(kw) - {f.name for f in fields(SamplingConfig)}
        if unknown:
            raise TypeError(f"unknown sampling arguments {sorted(unknown)}")
        cfg = SamplingConfig(**{**asdict(self.sampling), **kw})
        cfg.validate(self.gpt.config.image_vocab_size)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        rows = [p for p in prompts for _ in range(num_images)]
        step = batch_size or len(rows)
        out = []
        for start in range(0, len(rows), step):
            text_ids = self.text_tokenizer(rows[start:start + step], self.gpt.config.text_len)
            seeds = torch.arange(start, min(start + step, len(rows)), dtype=torch.long) + int(seed)
            out.append(generate(self.gpt, text_ids, cfg, seeds, progress=progress, compile=compile,
                                cuda_graph=cuda_graph))
        return torch.cat(out)

    def __call__(self, prompts, num_images: int = 1, *, seed: int = 0, batch_size: int = 64, **kw):
        """A list of PIL images, prompt-major. Same seed -> same images, whatever batch_size."""
        from PIL import Image

        codes = self.generate_codes(prompts, num_images, seed, batch_size=batch_size, **kw)
        out = []
        for chunk in codes.split(batch_size):
            pixels = self.image_tokenizer.decode(chunk)  # (b, 3, H, W) in [0, 1]
            arr = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
            out += [Image.fromarray(a) for a in arr]
        return out

    # --- persistence ------------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "model_type": MODEL_TYPE,
            "gpt": self.gpt.config.to_dict(),
            "sampling": asdict(self.sampling),
            "image_tokenizer": self.image_tokenizer.fingerprint(),
            "text_tokenizer": self.text_tokenizer.fingerprint(),
            **({"trained_on": self.trained_on} if self.trained_on is not None else {}),
        }

    def save_pretrained(self, path: str | os.PathLike, gpt_state: dict | None = None) -> None:
        """Write the pipeline directory; `gpt_state` overrides the GPT's own state_dict (e.g. gathered shards).

        With unmerged LoRA adapters only the adapters are written, with a reference to their base.
        """
        path = Path(path)
        self.image_tokenizer.save_pretrained(path / "image_tokenizer")
        self.text_tokenizer.save_pretrained(path / "text_tokenizer")
        config = self.config_dict()
        if self.adapter is not None:
            from .finetune import ADAPTER_DIR, save_adapter

            save_adapter(path / ADAPTER_DIR, self.adapter.peft_model, gpt_state)
            base = os.path.relpath(Path(self.adapter.base_path).resolve(), path.resolve())
            config["base"] = {"path": base, "gpt": self.adapter.base_fingerprint}
        else:
            save_weights(path / "model.safetensors", gpt_state if gpt_state is not None else self.gpt.state_dict())
        # config.json last: a directory with a config names weights that are already in place.
        atomic_write_bytes(path / "config.json", (json.dumps(config, indent=2) + "\n").encode())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype | str = "auto", base: str | os.PathLike | None = None,
                        merge: bool = True) -> TextToImage:
        """Load a pipeline directory. For a LoRA fine-tune, its base is loaded from the path recorded at
        training time (or `base`), checked, and the adapter attached: merged into the weights unless
        `merge=False`. torch_dtype: the GPT's dtype, "auto" (bfloat16 on CUDA, float32 elsewhere), a torch
        dtype or one of its names ("fp32", "bf16", "fp16", ...); the image tokenizer stays in float32."""
        from .text import TextTokenizer

        dtype = resolve_dtype(torch_dtype, device)  # a bad name fails before anything is loaded
        path = Path(path)
        config = read_config(path)
        image_tok = ImageTokenizer.from_pretrained(path / "image_tokenizer", device=device)
        text_tok = TextTokenizer.from_pretrained(path / "text_tokenizer")
        for name, tok in (("image_tokenizer", image_tok), ("text_tokenizer", text_tok)):
            if config.get(name) and config[name] != tok.fingerprint():
                raise ValueError(
                    f"{path / name} is not the {name.replace('_', ' ')} this GPT was trained with "
                    f"(fingerprint {tok.fingerprint()}, config.json expects {config[name]})"
                )
        known = {f.name for f in fields(SamplingConfig)}
        unknown = sorted(set(config.get("sampling") or {}) - known)
        if unknown:
            raise ValueError(f"{path / 'config.json'}: unknown sampling settings {unknown}; known: {sorted(known)}")
        sampling = SamplingConfig(**(config.get("sampling") or {}))
        try:
            sampling.validate(image_tok.codebook_size)
        except ValueError as e:
            raise ValueError(f"{path / 'config.json'}: saved sampling defaults are invalid: {e}") from None
        trained_on = config.get("trained_on")
        if "base" not in config:
            gpt = GPT(GPTConfig.from_dict(config["gpt"]))
            load_state_strict(gpt, str(path / "model.safetensors"))
            return cls(gpt.to(device, dtype).eval(), image_tok, text_tok, sampling, trained_on=trained_on)
        from .finetune import ADAPTER_DIR, Adapter, grow_text_vocab, load_adapter, load_base_gpt, weights_fingerprint

        gpt, base_path = load_base_gpt(path, config, base, device)
        fingerprint = weights_fingerprint(gpt)
        gpt = grow_text_vocab(gpt, config["gpt"]["text_vocab_size"])  # new rows come from the adapter
        gpt.config.cfg_dropout = config["gpt"]["cfg_dropout"]
        peft_model = load_adapter(gpt, path / ADAPTER_DIR)
        pipe = cls(gpt.to(device).eval(), image_tok, text_tok, sampling, Adapter(peft_model, base_path, fingerprint),
                   trained_on)
        return (pipe.merge_adapter() if merge else pipe).to(dtype=dtype)


DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(torch_dtype: torch.dtype | str, device: str | torch.device) -> torch.dtype:
    """The GPT's inference dtype: "auto" is bfloat16 on a CUDA device that has it (tensor-core kernels, half the
    KV-cache traffic) and float32 elsewhere; or a torch dtype, or one of DTYPE_NAMES."""
    if isinstance(torch_dtype, torch.dtype):
        dtype = torch_dtype
    elif torch_dtype == "auto":
        on_cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    elif torch_dtype in DTYPE_NAMES:
        dtype = DTYPE_NAMES[torch_dtype]
    else:
        raise ValueError(f"unknown torch_dtype {torch_dtype!r}; choose 'auto', a torch dtype or one of "
                         f"{sorted(DTYPE_NAMES)}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"torch_dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


MAX_LABEL = 60  # characters of a grid row's label


def image_grid(rows: list, labels: list[str] | None = None, pad: int = 2):
    """Tile rows of images (lists of PIL images, or float tensors (n, 3, H, W) in [0, 1]) into one PIL
    image, one row per entry, with an optional text label at the left of each row."""
    from PIL import Image, ImageDraw

    rows = [_to_pil_list(r) for r in rows]
    W, H = rows[0][0].size
    n = max(len(r) for r in rows)
    if labels:  # a label is one line of the default font, 6 px a character: long prompts are cut short
        labels = [s if len(s) <= MAX_LABEL else s[:MAX_LABEL - 3] + "..." for s in labels]
    label_w = 0 if not labels else 8 + 6 * max(len(s) for s in labels)
    grid = Image.new("RGB", (label_w + n * (W + pad) + pad, len(rows) * (H + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, images in enumerate(rows):
        for c, im in enumerate(images):
            grid.paste(im, (label_w + pad + c * (W + pad), pad + r * (H + pad)))
        if labels:
            draw.text((4, pad + r * (H + pad) + H // 2 - 5), labels[r], fill="black")
    return grid


def _to_pil_list(images) -> list:
    from PIL import Image

    if torch.is_tensor(images):
        arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(a) for a in arr.cpu().numpy()]
    return list(images)


def read_config(path: Path) -> dict:
    missing = [n for n in ("config.json", "image_tokenizer", "text_tokenizer") if not (path / n).exists()]
    if not (path / "model.safetensors").exists() and not (path / "adapter").exists():
        missing.append("model.safetensors")
    if missing:
        raise FileNotFoundError(
            f"{path} is not a TextToImage checkpoint: missing {', '.join(missing)} "
            f"(train one with `python train.py gpt --out {path}`)"
        )
    config = read_json_file(path / "config.json")
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path / 'config.json'} describes {config.get('model_type')!r}, not {MODEL_TYPE!r}")
    for key, kind in (("gpt", dict), ("sampling", dict), ("trained_on", dict), ("base", dict)):
        if key in config and config[key] is not None and not isinstance(config[key], kind):
            raise ValueError(f"{path / 'config.json'}: {key!r} must be a JSON object, got {config[key]!r:.60}")
    if not isinstance(config.get("gpt"), dict):
        raise ValueError(f"{path / 'config.json'} has no 'gpt' object (the GPT's architecture)")
    return config


def check_compatible(cfg: GPTConfig, image_tokenizer: ImageTokenizer, text_tokenizer) -> None:
    """The GPT's vocabularies and grid must be those of the two tokenizers it is paired with."""
    g = image_tokenizer.grid_size
    problems = []
    if cfg.image_vocab_size != image_tokenizer.codebook_size:
        problems.append(
            f"image codebook: GPT has {cfg.image_vocab_size} codes, tokenizer {image_tokenizer.codebook_size}"
        )
    if tuple(cfg.image_grid) != (g, g):
        problems.append(f"code grid: GPT models {tuple(cfg.image_grid)}, tokenizer makes {(g, g)}")
    if cfg.text_vocab_size != text_tokenizer.vocab_size:
        problems.append(f"text vocabulary: GPT has {cfg.text_vocab_size}, text tokenizer {text_tokenizer.vocab_size}")
    if cfg.text_pad_id != text_tokenizer.pad_id:
        problems.append(f"text pad id: GPT uses {cfg.text_pad_id}, text tokenizer {text_tokenizer.pad_id}")
    if problems:
        raise ValueError("the GPT does not match its tokenizers: " + "; ".join(problems))
