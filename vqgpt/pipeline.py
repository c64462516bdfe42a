"""TextToImage: the image tokenizer, the text tokenizer and the GPT, saved and loaded as one directory.

    pipe = TextToImage.from_pretrained("runs/t2i")
    out = pipe(["a green apple"], num_images=4, cfg_scale=3.0, top_k=100, seed=0)
    out.images[0].save("apple.png"); out.seeds   # PIL images, and the seed that draws each one again

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
import numbers
import os
import secrets
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, read_json_file, save_weights
from .generate import SamplingConfig, generate
from .model import GPT, GPTConfig
from .tokenizer import ImageTokenizer, load_state_strict

MODEL_TYPE = "vqgpt-text-to-image"
OUTPUT_TYPES = ("pil", "pt", "np")
SEED_LIMIT = 2**62  # every image's seed is an int in [0, SEED_LIMIT): int64 arithmetic never overflows
FRESH_SEEDS = 2**31  # seed=None draws from [0, FRESH_SEEDS): short enough to read back and type


@dataclass
class TextToImageOutput:
    """What a TextToImage call returns (diffusers' ImagePipelineOutput, plus what reproduces each image)."""

    images: list | torch.Tensor | np.ndarray  # output_type "pil": PIL images; "pt": (N, 3, H, W); "np": (N, H, W, 3)
    seeds: list[int]  # image k's seed: pipe(prompts[k], seed=seeds[k]) with the same settings draws it again
    prompts: list[str]  # image k's prompt
    negative_prompts: list[str] | None = None  # image k's negative prompt (None: the null caption)

    def __getitem__(self, index):
        raise TypeError("a TextToImage call returns an output object, not a list: use out.images[k] "
                        "(and out.seeds[k], its seed)")


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

    def to(self, device) -> TextToImage:
        self.gpt.to(device)
        self.image_tokenizer.to(device)
        return self

    # --- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_codes(self, prompts: str | list[str], num_images: int = 1, seed: int | list[int] = 0,
                       progress=False, compile: bool = False, cuda_graph: bool = False,
                       batch_size: int | None = None, negative_prompt: str | list[str] | None = None, **kw):
        """Codes (len(prompts) * num_images, h, w), prompt-major; image j of prompt i uses seed + i * num_images
        + j, or seed[i * num_images + j] for a list of seeds (one per image).

        negative_prompt: the caption of the guidance rows (one for all prompts, or one per prompt) instead of
        the null caption: guidance then pushes away from it. "" is the null caption itself.
        batch_size: rows sampled at once (the KV cache is allocated for that many); the images do not depend
        on it. compile / cuda_graph: the decode step through torch.compile (CPU) or replayed as a CUDA graph
        (GPU); see `vqgpt.generate.generate`. Both pay a one-time cost that a large batch of images amortises.
        """
        prompts = _text_list(prompts, "prompts")
        _check_num_images(num_images)
        rows = [p for p in prompts for _ in range(num_images)]
        seeds = image_seeds(seed, None, len(rows))
        negatives = negative_rows(negative_prompt, len(prompts), num_images)
        unknown = set(kw) - {f.name for f in fields(SamplingConfig)}
        if unknown:
            raise TypeError(f"unknown sampling arguments {sorted(unknown)}")
        cfg = SamplingConfig(**{**asdict(self.sampling), **kw})
        cfg.validate(self.gpt.config.image_vocab_size)
        if negatives is not None and all(s == 1 for s in cfg.scales(self.gpt.config.n_image)):
            raise ValueError("negative_prompt acts through guidance, which is off (cfg_scale=1): "
                             "pass cfg_scale != 1, or leave negative_prompt out")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        step, text_len = batch_size or len(rows), self.gpt.config.text_len
        out = []
        for start in range(0, len(rows), step):
            text_ids = self.text_tokenizer(rows[start:start + step], text_len)
            uncond = None if negatives is None else self.text_tokenizer(negatives[start:start + step], text_len)
            out.append(generate(self.gpt, text_ids, cfg, torch.tensor(seeds[start:start + step]), progress=progress,
                                compile=compile, cuda_graph=cuda_graph, uncond_ids=uncond))
        return torch.cat(out)

    def __call__(self, prompt: str | list[str], num_images: int | None = None, *, seed: int | list[int] | None = None,
                 negative_prompt: str | list[str] | None = None, output_type: str = "pil", batch_size: int = 64,
                 guidance_scale: float | None = None, num_images_per_prompt: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, **kw) -> TextToImageOutput:
        """Sample num_images images per prompt -> TextToImageOutput(images, seeds, prompts), prompt-major.

        seed: an int (image k of the call gets seed + k), a list (one seed per image), or None: a fresh seed,
        reported in out.seeds, so that pipe(out.prompts[k], seed=out.seeds[k]) draws image k again. Same seeds
        -> same images, whatever batch_size. Sampling settings (cfg_scale, top_k, top_p, temperature,
        cfg_schedule, cfg_interval) default to the checkpoint's. diffusers' names work too: guidance_scale
        (= cfg_scale), num_images_per_prompt (= num_images), generator (a torch.Generator, or one per image,
        that the seeds are drawn from); output_type "pil" (a list of PIL images), "pt" (float (N, 3, H, W) in
        [0, 1]) or "np" (float32 (N, H, W, 3) in [0, 1]).
        """
        n = _one_of("num_images", num_images, "num_images_per_prompt", num_images_per_prompt, 1)
        cfg_scale = _one_of("cfg_scale", kw.pop("cfg_scale", None), "guidance_scale", guidance_scale, None)
        if cfg_scale is not None:
            kw["cfg_scale"] = cfg_scale
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
        prompts = _text_list(prompt, "prompt")
        seeds = image_seeds(seed, generator, len(prompts) * _check_num_images(n))
        codes = self.generate_codes(prompts, n, seeds, batch_size=batch_size, negative_prompt=negative_prompt, **kw)
        images = [_pixels_as(self.image_tokenizer.decode(c), output_type) for c in codes.split(batch_size)]
        if output_type == "pil":
            images = [im for chunk in images for im in chunk]
        else:
            images = torch.cat(images) if output_type == "pt" else np.concatenate(images)
        return TextToImageOutput(images=images, seeds=seeds, prompts=[p for p in prompts for _ in range(n)],
                                 negative_prompts=negative_rows(negative_prompt, len(prompts), n))

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
                        base: str | os.PathLike | None = None, merge: bool = True) -> TextToImage:
        """Load a pipeline directory. For a LoRA fine-tune, its base is loaded from the path recorded at
        training time (or `base`), checked, and the adapter attached: merged into the weights unless
        `merge=False`."""
        from .text import TextTokenizer

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
            return cls(gpt.to(device).eval(), image_tok, text_tok, sampling, trained_on=trained_on)
        from .finetune import ADAPTER_DIR, Adapter, grow_text_vocab, load_adapter, load_base_gpt, weights_fingerprint

        gpt, base_path = load_base_gpt(path, config, base, device)
        fingerprint = weights_fingerprint(gpt)
        gpt = grow_text_vocab(gpt, config["gpt"]["text_vocab_size"])  # new rows come from the adapter
        gpt.config.cfg_dropout = config["gpt"]["cfg_dropout"]
        peft_model = load_adapter(gpt, path / ADAPTER_DIR)
        pipe = cls(gpt.to(device).eval(), image_tok, text_tok, sampling, Adapter(peft_model, base_path, fingerprint),
                   trained_on)
        return pipe.merge_adapter() if merge else pipe


def _one_of(name: str, value, alias: str, alias_value, default):
    """A setting that has two names (ours and diffusers'): either may be given, not both."""
    if value is not None and alias_value is not None:
        raise ValueError(f"{name} and {alias} are the same setting (ours and diffusers' name): pass one of them")
    return value if value is not None else alias_value if alias_value is not None else default


def _text_list(texts, what: str) -> list[str]:
    """A string or a list of strings -> a non-empty list of valid UTF-8 strings (else ValueError)."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise ValueError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"{what} is empty: pass at least one prompt (use '' for an unconditional image)")
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"{what} must be strings, got {type(t).__name__} {t!r:.60}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} {t!r:.80} is not valid text (lone surrogates: bytes that were not "
                             f"UTF-8)") from None
    return list(texts)


def negative_rows(negative_prompt, n_prompts: int, num_images: int) -> list[str] | None:
    """One negative prompt per image (prompt-major), from one for all prompts or one per prompt; None stays."""
    if negative_prompt is None:
        return None
    negatives = _text_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * n_prompts
    if len(negatives) != n_prompts:
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {n_prompts} prompts: "
                         f"give one string, or one per prompt")
    return [t for t in negatives for _ in range(num_images)]


def image_seeds(seed, generator, count: int) -> list[int]:
    """One seed per image: seed + k for an int, the list itself (one per image), drawn from `generator`
    (a torch.Generator: seed + k from one draw; a list of them: one draw each), or, for None, fresh."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator (two ways to fix the seeds), not both")
    if generator is not None:
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        if not all(isinstance(g, torch.Generator) for g in gens):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {generator!r:.80}")
        drawn = [int(torch.randint(FRESH_SEEDS, (), generator=g, device=g.device)) for g in gens]
        if isinstance(generator, (list, tuple)):
            if len(drawn) != count:
                raise ValueError(f"{len(drawn)} generators for {count} images: give one, or one per image")
            return drawn
        seed = drawn[0]
    if seed is None:
        seed = secrets.randbelow(FRESH_SEEDS)
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"{len(seed)} seeds for {count} images: give one int, or one seed per image")
        seeds = list(seed)
    else:
        seeds = [seed + k for k in range(count)] if _is_seed(seed) else [seed]
    bad = [s for s in seeds if not _is_seed(s) or not 0 <= s < SEED_LIMIT]
    if bad:
        raise ValueError(f"seeds must be ints in [0, 2**62), got {bad[0]!r:.40}")
    return [int(s) for s in seeds]


def _check_num_images(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_images must be an int >= 1, got {n!r}")
    return n


def _is_seed(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _pixels_as(pixels: torch.Tensor, output_type: str):
    """float (b, 3, H, W) in [0, 1] -> a list of PIL images, the tensor itself, or float32 (b, H, W, 3)."""
    if output_type == "pt":
        return pixels
    if output_type == "np":
        return pixels.permute(0, 2, 3, 1).float().cpu().numpy()
    return _to_pil_list(pixels)


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
