"""The Hugging Face Hub round trip: repo ids to local snapshots, pushes, model cards (the figures in a card are
recorded by vqgpt/records.py).

    path = snapshot("owner/name", what="text-to-image model", revision="v1")   # a local directory
    push_folder("saved/dir", "owner/name")                                     # upload a save_pretrained dir
    push_pretrained(model, "owner/name", commit_message="...")                 # save_pretrained, then push
    model_card(config, kind="text-to-image")                                   # README.md with YAML metadata

Only the standard library is imported here: huggingface_hub is imported where a hub repo is used, so the
image tokenizer keeps needing torch, vector-quantize-pytorch and safetensors alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LIBRARY = "vqgpt"
CARD_NAME = "README.md"
# The licence a model inherits from its training data ("license" in the card's metadata) and the credit
# line it must carry. Data not listed here: the card says "other" and asks for the data's licence.
DATA_LICENSES = {
    "openmoji": (
        "cc-by-sa-4.0",
        "OpenMoji graphics by [OpenMoji](https://openmoji.org), licensed "
        "[CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/): this model, and images "
        "drawn by it, carry that licence and attribution.",
    ),
    "shapes": ("mit", "procedural shapes rendered by vqgpt itself (MIT)."),
}
EXAMPLE_PROMPTS = {"openmoji": "green apple", "shapes": "a large red circle in the center on a white background"}
# Evaluation figures shown in a card (the leaf names of `python -m vqgpt.eval` JSON); config.json keeps all.
HEADLINE = (
    "psnr",
    "ssim",
    "usage",
    "perplexity",
    "recall",
    "mean",
    "judge_accuracy",
    "ceiling",
    "samples",
    "true",
    "shuffled",
    "retrieval_r1",
    "retrieval_r5",
    "unsaid_entropy_ratio",
    "pairwise",
)


# ----------------------------------------------------------------------------------------------------
# Repo ids and snapshots


def looks_local(path: str) -> bool:
    """Is `path` meant as a local path rather than a hub repo id 'owner/name'? A mistyped `runs/tokk` must
    not become a network request (slow, and it sends the path away): any path whose first part exists here
    (`runs/`), or that is absolute, relative (./, ../, ~) or not of the form owner/name, is local."""
    if path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(path).exists():
        return True
    return Path(path.split("/")[0]).exists()


def snapshot(
    name: str | os.PathLike,
    *,
    what: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """The local directory holding `name`: itself when it is a directory, else the hub repo's snapshot,
    downloaded into (or, offline, found in) huggingface_hub's cache. Errors are one line saying what to do."""
    local = Path(name)
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} selects a version of a hub repo; {name} is a local directory")
        return local
    if looks_local(str(name)):
        raise FileNotFoundError(f"no {what} directory at {str(name)!r} (a local path: the hub was not asked)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{str(name)!r} is not a local directory, and loading hub repos needs "
            f"huggingface_hub: pip install huggingface_hub"
        ) from None
    from ._version import __version__

    try:
        return Path(
            snapshot_download(
                str(name),
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                allow_patterns=allow_patterns,
                library_name=LIBRARY,
                library_version=__version__,
            )
        )
    except Exception as e:  # network, auth, missing repo or revision: one actionable line
        raise FileNotFoundError(_download_error(str(name), what, revision, e)) from e


def _download_error(name: str, what: str, revision: str | None, e: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local = "or pass a local directory written by save_pretrained"
    if isinstance(e, RevisionNotFoundError):
        return f"the hub repo {name!r} has no revision {revision!r}: pass an existing branch, tag or commit"
    if isinstance(e, RepositoryNotFoundError):
        return (
            f"no {what} {name!r} on the hub, or it is private or gated: check the name, or log in with "
            f"access to it (`hf auth login`, or token=...), {local}"
        )
    if isinstance(e, HFValidationError):
        return f"{name!r} is neither a local directory nor a valid hub repo id (owner/name)"
    if isinstance(e, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:
        return (
            f"{what} {name!r}{_at(revision)} is not in the hub cache and HF_HUB_OFFLINE is set: unset it "
            f"to download the repo, {local}"
        )
    if isinstance(e, LocalEntryNotFoundError):
        return (
            f"cannot reach the hub ({constants.ENDPOINT}) for {what} {name!r}{_at(revision)}, and it is not "
            f"in the cache: check the network (or HF_ENDPOINT), {local}"
        )
    return f"could not fetch {what} {name!r} from the hub ({type(e).__name__}: {_first_line(e)}); {local}"


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create `repo_id` if need be and upload `folder` (a save_pretrained directory) -> the commit's URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise OSError("push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    from huggingface_hub import constants

    api = HfApi(token=token, library_name=LIBRARY)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message or f"Upload {LIBRARY} model",
        )
    except Exception as e:
        raise OSError(
            f"could not push to the hub repo {repo_id!r} at {constants.ENDPOINT} "
            f"({type(e).__name__}: {_first_line(e)}): check the network and that you are logged in "
            f"with write access (`hf auth login`, or token=...)"
        ) from e
    return info.commit_url


def push_pretrained(model, repo_id: str, *, commit_message: str, **push) -> str:
    """`model.save_pretrained` into a fresh directory (the model card names `repo_id`), then push_folder it
    (push: token, private, revision, commit_message) -> the commit's URL."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, repo_id=repo_id)
        return push_folder(tmp, repo_id, commit_message=commit_message, **push)


# ----------------------------------------------------------------------------------------------------
# Versions, evaluations and model cards


def versions() -> dict:
    """The versions a checkpoint was written with (config.json "versions"; readers never need them)."""
    from importlib.metadata import PackageNotFoundError, version

    from ._version import __version__

    out = {"vqgpt": __version__}
    for name in ("vector-quantize-pytorch", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def data_license(trained_on: dict | None) -> tuple[str, str]:
    """(licence id for the card's metadata, the credit line) of a model's training data."""
    data = (trained_on or {}).get("data")
    if data in DATA_LICENSES:
        return DATA_LICENSES[data]
    if data is None:
        return "other", "not recorded: set `license` above to that of the training data."
    return "other", f"`{data}`: set `license` above to that of this data, and credit it as its licence asks."


def model_card(
    config: dict, *, kind: str, repo_id: str | None = None, where: str | None = None, n_params: int | None = None
) -> str:
    """A model card (README.md: YAML metadata, then what the model is, its data, figures, defaults, usage)
    from what its config.json holds. kind: "text-to-image" or "image-tokenizer"; the usage snippet loads
    repo_id, else `where` (a local directory); n_params: the model's size, when known."""
    trained_on = config.get("trained_on")
    license_id, credit = data_license(trained_on)
    data = (trained_on or {}).get("data")
    meta = {
        "license": license_id,
        "library_name": LIBRARY,
        "pipeline_tag": "text-to-image" if kind == "text-to-image" else "image-feature-extraction",
        "tags": [LIBRARY, "autoregressive", kind],
    }
    if data and looks_hub_dataset(data):
        meta["datasets"] = [data]
    name = repo_id or ("a vqgpt text-to-image model" if kind == "text-to-image" else "a vqgpt image tokenizer")
    parts = [
        "---",
        *(_yaml_line(k, v) for k, v in meta.items()),
        "---",
        "",
        f"# {name}",
        "",
        _summary(config, kind, n_params),
        "",
        "## Training data",
        "",
        _data_line(trained_on, credit),
        "",
    ]
    parts += ["## Evaluation", "", *_evaluation_lines(config.get("evaluation")), ""]
    if kind == "text-to-image":
        sampling = config.get("sampling") or {}
        parts += [
            "## Sampling defaults",
            "",
            "| setting | value |",
            "|---|---|",
            *(f"| `{k}` | {v} |" for k, v in sampling.items()),
            "",
        ]
    parts += ["## Usage", "", *_usage(kind, repo_id or where or "DIR", EXAMPLE_PROMPTS.get(data, "green apple")), ""]
    v = config.get("versions") or {}
    if v:
        parts += ["## Versions", "", ", ".join(f"{k} {ver}" for k, ver in v.items() if ver), ""]
    return "\n".join(parts)


def looks_hub_dataset(data: str) -> bool:
    """An owner/name that is not a local path or a shard pattern: the hub's `datasets` metadata can link it."""
    return not looks_local(data) and not any(c in data for c in "{}*?[")


def _yaml_line(key: str, value) -> str:
    return f"{key}: {json.dumps(value)}"  # JSON scalars and lists are YAML too


def _summary(config: dict, kind: str, n_params: int | None) -> str:
    tok = config if kind == "image-tokenizer" else None
    size = f"{n_params / 1e6:.1f}M-parameter " if n_params else ""
    if tok is None:
        g = config.get("gpt") or {}
        return (
            f"A text-to-image model trained with vqgpt: an image tokenizer turns images into a "
            f"{'x'.join(map(str, g.get('image_grid', [])))} grid of codes from a codebook of "
            f"{g.get('image_vocab_size')}, and a {size}decoder-only GPT ({g.get('n_layer')} layers, width "
            f"{g.get('dim')}) draws those codes from a caption, with classifier-free guidance."
        )
    return (
        f"An image tokenizer trained with vqgpt: a convolutional {size}VQ-VAE with a "
        f"{tok.get('quantizer')} quantizer that turns {tok.get('image_size')} px images into a grid of codes "
        f"and back."
    )


def _data_line(trained_on: dict | None, credit: str) -> str:
    if not trained_on:
        return f"Training data {credit}"
    filters = ", ".join(f"{k} `{trained_on[k]}`" for k in ("include", "exclude", "limit") if trained_on.get(k))
    return f"`{trained_on.get('data')}`{f' ({filters})' if filters else ''}: {credit}"


def _evaluation_lines(evaluation: dict | None) -> list[str]:
    if not evaluation:
        return ["Not evaluated yet: `python -m vqgpt.eval ... --ckpt DIR --record` adds its figures here."]
    lines = ["| evaluation | figure | value |", "|---|---|---|"]
    for what, record in evaluation.items():
        figures = record.get("figures", {}) if isinstance(record, dict) else {}
        lines += [f"| {what} | `{k}` | {v:.4g} |" for k, v in figures.items() if k.split(".")[-1] in HEADLINE]
    commands = [r["command"] for r in evaluation.values() if isinstance(r, dict) and r.get("command")]
    return lines + ["", "Measured with:", "", "```bash", *commands, "```"] if commands else lines


def _usage(kind: str, where: str, prompt: str) -> list[str]:
    if kind == "image-tokenizer":
        return [
            "```python",
            "from vqgpt import ImageTokenizer",
            f'tok = ImageTokenizer.from_pretrained("{where}")',
            "codes = tok.encode(images)   # float (B, 3, H, W) in [0, 1] -> long (B, h, w)",
            "images = tok.decode(codes)",
            "```",
        ]
    return [
        "```python",
        "from vqgpt import TextToImage",
        f'pipe = TextToImage.from_pretrained("{where}")',
        f'out = pipe("{prompt}", num_images=4)   # the sampling defaults above; seed=... to repeat a draw',
        'out.images[0].save("sample.png"); print(out.seeds)',
        "```",
        "",
        "```bash",
        f'python sample.py --ckpt {where} --prompt "{prompt}" --n 4 --out sample.png',
        "```",
    ]
