"""TextToImage: the image tokenizer, the text tokenizer and the GPT, saved and loaded as one directory.

    pipe = TextToImage.from_pretrained("runs/t2i")
    out = pipe(["a green apple"], num_images=4, cfg_scale=3.0, top_k=100, seed=0)
    out.images[0].save("apple.png"); out.seeds   # PIL images, and the seed that draws each one again

Layout of a saved pipeline (what `train.py gpt --out DIR` writes):

    DIR/config.json          {"model_type": "vqgpt-text-to-image", "gpt": GPTConfig, "sampling": defaults,
                              "image_tokenizer": fingerprint, "text_tokenizer": fingerprint,
                              "trained_on": {"data", "include", "exclude", "limit"} (train.py writes it),
                              "versions": {"vqgpt", "vector-quantize-pytorch", "torch"} (what wrote it),
                              "evaluation": {name: {"figures", "command"}} (`vqgpt.eval --record`)}
    DIR/README.md            the model card: licence of the training data, figures, sampling defaults, usage
    DIR/model.safetensors    GPT weights
    DIR/image_tokenizer/     ImageTokenizer.save_pretrained
    DIR/text_tokenizer/      TextTokenizer.save_pretrained

A LoRA fine-tune (`train.py gpt --init BASE --lora-rank R`) saves `adapter/` and a "base" entry in
config.json instead of model.safetensors; loading it loads the base too (see vqgpt/adapters.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .adapters import ADAPTER_DIR, Adapter, grow_text_vocab, load_adapter, save_adapter
from .generate import SamplingConfig, generate
from .io import MAX_LABEL as MAX_LABEL  # re-exported, as image_grid: sample.py, train.py, vqgpt.eval get them here
from .io import (
    atomic_write_bytes,
    atomic_write_json,
    load_state_strict,
    read_json_file,
    save_weights,
    to_pil_list,
    weights_fingerprint,
)
from .io import image_grid as image_grid
from .model import GPT, GPTConfig
from .seeds import FRESH_SEEDS as FRESH_SEEDS  # re-exported: app.py gets it here
from .seeds import _check_num_images, _text_list, image_seeds, negative_rows
from .tokenizer import ImageTokenizer

MODEL_TYPE = "vqgpt-text-to-image"
OUTPUT_TYPES = ("pil", "pt", "np")
# What a hub snapshot of a pipeline fetches: the public format, never a pushed run's checkpoints/ or samples/.
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "README.md",
    "image_tokenizer/*",
    "text_tokenizer/*",
    "adapter/*",
    "scorer/*",
]


@dataclass
class TextToImageOutput:
    """What a TextToImage call returns (diffusers' ImagePipelineOutput, plus what reproduces each image)."""

    images: list | torch.Tensor | np.ndarray  # output_type "pil": PIL images; "pt": (N, 3, H, W); "np": (N, H, W, 3)
    seeds: list[int]  # image k's seed: pipe(prompts[k], seed=seeds[k]) with the same settings draws it again
    prompts: list[str]  # image k's prompt
    negative_prompts: list[str] | None = None  # image k's negative prompt (None: the null caption)
    scores: list[float] | None = None  # with rerank: image k's score, the best of its candidates (vqgpt/rerank.py)

    def __getitem__(self, index):
        raise TypeError(
            "a TextToImage call returns an output object, not a list: use out.images[k] (and out.seeds[k], its seed)"
        )


class TextToImage:
    def __init__(
        self,
        gpt: GPT,
        image_tokenizer: ImageTokenizer,
        text_tokenizer,
        sampling=None,
        adapter=None,
        trained_on: dict | None = None,
    ):
        check_compatible(gpt.config, image_tokenizer, text_tokenizer)
        self.gpt = gpt
        self.image_tokenizer = image_tokenizer
        self.text_tokenizer = text_tokenizer
        self.sampling = sampling or SamplingConfig()
        self.adapter = adapter  # an adapters.Adapter when the GPT carries unmerged LoRA adapters
        self.trained_on = trained_on  # the training data and caption filter, for evaluations (vqgpt/eval.py)
        self.scorer = None  # an ImageTextScorer (vqgpt/lit.py) saved in DIR/scorer/: the default for rerank=N
        self.evaluation: dict | None = None  # recorded evaluation figures (`python -m vqgpt.eval ... --record`)

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
    def generate_codes(
        self,
        prompts: str | list[str],
        num_images: int = 1,
        seed: int | list[int] = 0,
        progress=False,
        compile: bool = False,
        cuda_graph: bool = False,
        batch_size: int | None = None,
        negative_prompt: str | list[str] | None = None,
        **kw,
    ):
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
            raise ValueError(
                "negative_prompt acts through guidance, which is off (cfg_scale=1): "
                "pass cfg_scale != 1, or leave negative_prompt out"
            )
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        step, text_len = batch_size or len(rows), self.gpt.config.text_len
        out = []
        for start in range(0, len(rows), step):
            text_ids = self.text_tokenizer(rows[start : start + step], text_len)
            uncond = None if negatives is None else self.text_tokenizer(negatives[start : start + step], text_len)
            out.append(
                generate(
                    self.gpt,
                    text_ids,
                    cfg,
                    torch.tensor(seeds[start : start + step]),
                    progress=progress,
                    compile=compile,
                    cuda_graph=cuda_graph,
                    uncond_ids=uncond,
                )
            )
        return torch.cat(out)

    def __call__(
        self,
        prompt: str | list[str],
        num_images: int | None = None,
        *,
        seed: int | list[int] | None = None,
        negative_prompt: str | list[str] | None = None,
        output_type: str = "pil",
        batch_size: int = 64,
        guidance_scale: float | None = None,
        num_images_per_prompt: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        rerank: int = 1,
        scorer=None,
        min_score: float | None = None,
        max_rounds: int = 1,
        **kw,
    ) -> TextToImageOutput:
        """Sample num_images images per prompt -> TextToImageOutput(images, seeds, prompts), prompt-major.

        seed: an int (image k of the call gets seed + k), a list (one seed per image), or None: a fresh seed,
        reported in out.seeds, so that pipe(out.prompts[k], seed=out.seeds[k]) draws image k again. Same seeds
        -> same images, whatever batch_size. Sampling settings (cfg_scale, top_k, top_p, temperature,
        cfg_schedule, cfg_interval) default to the checkpoint's. diffusers' names work too: guidance_scale
        (= cfg_scale), num_images_per_prompt (= num_images), generator (a torch.Generator, or one per image,
        that the seeds are drawn from); output_type "pil" (a list of PIL images), "pt" (float (N, 3, H, W) in
        [0, 1]) or "np" (float32 (N, H, W, 3) in [0, 1]).
        rerank=N: each image is the best of N candidates by `scorer` (an ImageTextScorer, its directory, or
        "self"; default the one saved with the pipeline, else "self"), its score in out.scores; min_score and
        max_rounds resample the images still below min_score (vqgpt/rerank.py). rerank=1 is plain sampling.
        """
        n = _one_of("num_images", num_images, "num_images_per_prompt", num_images_per_prompt, 1)
        cfg_scale = _one_of("cfg_scale", kw.pop("cfg_scale", None), "guidance_scale", guidance_scale, None)
        if cfg_scale is not None:
            kw["cfg_scale"] = cfg_scale
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
        prompts = _text_list(prompt, "prompt")
        seeds = image_seeds(seed, generator, len(prompts) * _check_num_images(n))
        scores = None
        if rerank != 1 or scorer is not None or min_score is not None:
            from .rerank import rerank_codes

            codes, scores, seeds = rerank_codes(
                self,
                prompts,
                n,
                seed=seeds,
                rerank=rerank,
                scorer=scorer,
                min_score=min_score,
                max_rounds=max_rounds,
                batch_size=batch_size,
                negative_prompt=negative_prompt,
                **kw,
            )
            scores = scores.tolist()
        else:
            codes = self.generate_codes(prompts, n, seeds, batch_size=batch_size, negative_prompt=negative_prompt, **kw)
        images = [_pixels_as(self.image_tokenizer.decode(c), output_type) for c in codes.split(batch_size)]
        if output_type == "pil":
            images = [im for chunk in images for im in chunk]
        else:
            images = torch.cat(images) if output_type == "pt" else np.concatenate(images)
        return TextToImageOutput(
            images=images,
            seeds=seeds,
            prompts=[p for p in prompts for _ in range(n)],
            negative_prompts=negative_rows(negative_prompt, len(prompts), n),
            scores=scores,
        )

    # --- persistence ------------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        from .hub import versions

        return {
            "model_type": MODEL_TYPE,
            "gpt": self.gpt.config.to_dict(),
            "sampling": asdict(self.sampling),
            "image_tokenizer": self.image_tokenizer.fingerprint(),
            "text_tokenizer": self.text_tokenizer.fingerprint(),
            "versions": versions(),  # what wrote it; never needed to read it
            **({"trained_on": self.trained_on} if self.trained_on is not None else {}),
            **({"evaluation": self.evaluation} if self.evaluation else {}),
        }

    def save_pretrained(
        self, path: str | os.PathLike, gpt_state: dict | None = None, *, repo_id: str | None = None
    ) -> None:
        """Write the pipeline directory and its model card (README.md); `gpt_state` overrides the GPT's own
        state_dict (e.g. gathered shards); repo_id: the hub repo the card's usage snippet names.

        With unmerged LoRA adapters only the adapters are written, with a reference to their base.
        """
        from .hub import CARD_NAME, model_card

        path = Path(path)
        self.image_tokenizer.save_pretrained(path / "image_tokenizer", model_card=False)
        self.text_tokenizer.save_pretrained(path / "text_tokenizer")
        config = self.config_dict()
        if self.adapter is not None:
            save_adapter(path / ADAPTER_DIR, self.adapter.peft_model, gpt_state)
            base = os.path.relpath(Path(self.adapter.base_path).resolve(), path.resolve())
            config["base"] = {"path": base, "gpt": self.adapter.base_fingerprint}
        else:
            save_weights(path / "model.safetensors", gpt_state if gpt_state is not None else self.gpt.state_dict())
        if self.scorer is not None:
            self.scorer.check_image_tokenizer(self.image_tokenizer)
            self.scorer.save_pretrained(path / SCORER_DIR)
        card = model_card(
            config, kind="text-to-image", repo_id=repo_id, where=str(path), n_params=self.gpt.num_params()
        )
        atomic_write_bytes(path / CARD_NAME, card.encode())
        # config.json last: a directory with a config names weights that are already in place.
        atomic_write_json(path / "config.json", config)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """save_pretrained into a fresh directory (the model, its tokenizers and card; no training state) and
        upload it to the hub repo `repo_id`, created if need be -> the commit's URL."""
        from .hub import push_pretrained

        if self.adapter is not None:
            raise ValueError(
                "this pipeline holds LoRA adapters over a local base model: merge_adapter() first, "
                "so that the hub repo holds a model that loads on its own"
            )
        return push_pretrained(
            self,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message or "Upload vqgpt text-to-image model",
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype | str = "auto",
        base: str | os.PathLike | None = None,
        merge: bool = True,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> TextToImage:
        """Load a pipeline directory, or a hub repo "owner/name" (huggingface_hub's snapshot_download: revision
        a branch, tag or commit; token for private repos; cache_dir instead of the hub cache). For a LoRA
        fine-tune, its base is loaded from the path recorded at training time (or `base`), checked, and the
        adapter attached: merged into the weights unless `merge=False`. torch_dtype: the GPT's dtype, "auto"
        (bfloat16 on CUDA, float32 elsewhere), a torch dtype or one of its names ("fp32", "bf16", "fp16", ...);
        the image tokenizer stays in float32."""
        from .hub import snapshot

        dtype = resolve_dtype(torch_dtype, device)  # a bad name fails before anything is loaded
        path = snapshot(
            path,
            what="text-to-image model",
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=HUB_FILES,
        )
        config = read_config(path)
        image_tok, text_tok = _load_tokenizers(path, config, device)
        sampling = _saved_sampling(path, config, image_tok.codebook_size)
        if "base" in config:
            gpt, adapter = _load_lora_gpt(path, config, base, device)
        else:
            gpt, adapter = GPT(GPTConfig.from_dict(config["gpt"])), None
            load_state_strict(gpt, str(path / "model.safetensors"))
        pipe = cls(gpt.to(device).eval(), image_tok, text_tok, sampling, adapter, config.get("trained_on"))
        pipe.evaluation = config.get("evaluation")
        if merge:
            pipe.merge_adapter()
        return _with_scorer(pipe.to(dtype=dtype), path, device)


def _load_tokenizers(path: Path, config: dict, device):
    """The image and text tokenizers of a pipeline directory, each checked against the fingerprint its
    config.json recorded at training time."""
    from .text import TextTokenizer

    image_tok = ImageTokenizer.from_pretrained(path / "image_tokenizer", device=device)
    text_tok = TextTokenizer.from_pretrained(path / "text_tokenizer")
    for name, tok in (("image_tokenizer", image_tok), ("text_tokenizer", text_tok)):
        if config.get(name) and config[name] != tok.fingerprint():
            raise ValueError(
                f"{path / name} is not the {name.replace('_', ' ')} this GPT was trained with "
                f"(fingerprint {tok.fingerprint()}, config.json expects {config[name]})"
            )
    return image_tok, text_tok


def _saved_sampling(path: Path, config: dict, codebook_size: int) -> SamplingConfig:
    """The sampling defaults a config.json holds, checked as a call's own settings would be."""
    known = {f.name for f in fields(SamplingConfig)}
    unknown = sorted(set(config.get("sampling") or {}) - known)
    if unknown:
        raise ValueError(f"{path / 'config.json'}: unknown sampling settings {unknown}; known: {sorted(known)}")
    sampling = SamplingConfig(**(config.get("sampling") or {}))
    try:
        sampling.validate(codebook_size)
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: saved sampling defaults are invalid: {e}") from None
    return sampling


def _load_lora_gpt(path: Path, config: dict, base: str | os.PathLike | None, device) -> tuple[GPT, Adapter]:
    """A LoRA fine-tune's GPT: its base (checked), the text vocabulary grown to the fine-tune's (the new rows
    come from the adapter), the adapter attached unmerged."""
    gpt, base_path = load_base_gpt(path, config, base, device)
    gpt = grow_text_vocab(gpt, config["gpt"]["text_vocab_size"])
    gpt.config.cfg_dropout = config["gpt"]["cfg_dropout"]
    peft_model = load_adapter(gpt, path / ADAPTER_DIR)
    return gpt, Adapter(peft_model, base_path, config["base"]["gpt"])


def load_base_gpt(adapter_dir: Path, config: dict, base: str | os.PathLike | None, device) -> tuple[GPT, str]:
    """The base GPT a LoRA adapter was trained on, checked against the fingerprint recorded in config.json."""
    recorded = config["base"]
    base_path = Path(base) if base is not None else (adapter_dir / recorded["path"])
    if (
        base_path.resolve() == Path(adapter_dir).resolve()
        or (base_path / "config.json").is_file()
        and "base" in read_config(base_path)
    ):
        # a base that is itself an adapter (or this very directory) would recurse without end
        raise ValueError(
            f"the base of the LoRA adapter in {adapter_dir}, {base_path}, is not a plain model; "
            f"an adapter's base must be one (merge a LoRA base first: python -m vqgpt.finetune merge)"
        )
    try:
        base_pipe = TextToImage.from_pretrained(base_path, device=device)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the LoRA adapter in {adapter_dir} needs its base model, expected at {base_path}: {e}. "
            "Pass the base's directory: TextToImage.from_pretrained(DIR, base=BASE_DIR)"
        ) from e
    fp = weights_fingerprint(base_pipe.gpt)
    if fp != recorded["gpt"]:
        raise ValueError(
            f"{base_path} is not the base the adapter in {adapter_dir} was trained on (its GPT weights have "
            f"fingerprint {fp}, the adapter expects {recorded['gpt']}); pass the right base directory"
        )
    return base_pipe.gpt, str(base_path)


SCORER_DIR = "scorer"  # a LiT scorer saved inside a pipeline directory is loaded with it


def _with_scorer(pipe: TextToImage, path: Path, device) -> TextToImage:
    if (path / SCORER_DIR).is_dir():
        from .lit import ImageTextScorer

        pipe.scorer = ImageTextScorer.from_pretrained(path / SCORER_DIR, device=device)
        pipe.scorer.check_image_tokenizer(pipe.image_tokenizer, f"the pipeline {path}")
    return pipe


def _one_of(name: str, value, alias: str, alias_value, default):
    """A setting that has two names (ours and diffusers'): either may be given, not both."""
    if value is not None and alias_value is not None:
        raise ValueError(f"{name} and {alias} are the same setting (ours and diffusers' name): pass one of them")
    return value if value is not None else alias_value if alias_value is not None else default


def _pixels_as(pixels: torch.Tensor, output_type: str):
    """float (b, 3, H, W) in [0, 1] -> a list of PIL images, the tensor itself, or float32 (b, H, W, 3)."""
    if output_type == "pt":
        return pixels
    if output_type == "np":
        return pixels.permute(0, 2, 3, 1).float().cpu().numpy()
    return to_pil_list(pixels)


DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


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
        raise ValueError(
            f"unknown torch_dtype {torch_dtype!r}; choose 'auto', a torch dtype or one of {sorted(DTYPE_NAMES)}"
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"torch_dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


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
