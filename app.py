"""The web demo: a gradio page over a trained text-to-image model.

    python app.py --ckpt runs/t2i                      # then open http://127.0.0.1:7860
    python app.py --ckpt runs/t2i --port 8080 --host 0.0.0.0

Every user shares one model through gradio's queue; requests that arrive together are sampled in one batch
(`batch=True`), so eight users at once cost about what one batch of their images costs, not eight calls.
The API endpoint is `/generate`: its first input is the prompt; the others (negative_prompt, num_images,
guidance, top_k, top_p, temperature, seed) default to the page's initial values (seed -1: a random one).

    from gradio_client import Client
    gallery, seeds = Client("http://127.0.0.1:7860/").predict("green apple", api_name="/generate")

A request the page would refuse (an empty prompt, top-k 0, 500 images) is a message in the page; through the
API it returns an empty gallery and the reason in place of the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vqgpt.cli import DEVICES, add_debug_flag

MAX_IMAGES = 8  # images one request may ask for: the page serves many users from one model
MAX_BATCH = 8  # requests sampled together
EXAMPLES = 8  # training captions offered as examples
SEED_LIMIT = 2**62  # as vqgpt.pipeline: seeds are ints in [0, 2**62)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a TextToImage directory (train.py gpt --out)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for other machines (default: %(default)s)"
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="auto: cuda when torch sees one, else cpu (default: %(default)s)",
    )
    add_debug_flag(p)
    p.add_argument(
        "--max-batch", type=int, default=MAX_BATCH, help="requests sampled together in one batch (default: %(default)s)"
    )
    return p.parse_args(argv)


# --- what the page shows about the model ----------------------------------------------------------------
def example_prompts(pipe, n: int = EXAMPLES) -> list[str]:
    """The model's own training captions: those train.py recorded with it (config.json "trained_on"
    "prompts"), else read from the data it names (a folder's metadata.jsonl, or an embedded set)."""
    own = pipe.trained_on or {}
    if own.get("prompts"):
        return [p for p in own["prompts"] if isinstance(p, str) and p.strip()][:n]
    data = own.get("data")
    if not isinstance(data, str):
        return []
    try:
        captions = _data_captions(data)
        if own.get("include") is not None or own.get("exclude") is not None:
            from vqgpt.data import caption_filter

            captions = [captions[i] for i in caption_filter(captions, own.get("include"), own.get("exclude"))]
    except (ImportError, OSError, ValueError):  # the data is not on this machine, or needs the train extra
        return []
    step = max(1, len(captions) // n)
    return list(dict.fromkeys(captions[::step]))[:n]


def _data_captions(data: str) -> list[str]:
    metadata = Path(data) / "metadata.jsonl"
    if metadata.is_file():
        lines = metadata.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines[:10_000] if line.strip()]
        return [r["text"] for r in records if isinstance(r, dict) and isinstance(r.get("text"), str)]
    from vqgpt import data as vdata

    if data == "shapes":
        return [vdata.shape_caption(s) for s in vdata.shapes_split_specs("train", limit=400)]
    if data == "openmoji":
        codes = [f.name[: -len(".svg")] for f in vdata._openmoji_files(None)]
        return [c for c in map(vdata.openmoji_caption, codes) if c]
    return []


def model_facts(pipe, ckpt: str) -> str:
    """The model card's facts as Markdown: size, data and licence, tokenizers, sampling defaults."""
    config, tok, own = pipe.gpt.config, pipe.image_tokenizer, pipe.trained_on or {}
    card = _card_metadata(Path(ckpt) / "README.md")
    rows = [
        (
            "model",
            f"a {pipe.gpt.num_params() / 1e6:.1f}M-parameter text-to-image GPT ({config.n_layer} layers, width "
            f"{config.dim}), from {ckpt}",
        ),
        (
            "images",
            f"{tok.image_size}x{tok.image_size} pixels, {tok.grid_size}x{tok.grid_size} codes of {tok.codebook_size}",
        ),
        (
            "trained on",
            ", ".join(f"{k} {v}" for k, v in own.items() if k != "prompts" and v is not None) or "not recorded",
        ),
        ("licence", card.get("license", "not recorded")),
        ("text", f"up to {config.text_len} tokens of a {pipe.text_tokenizer.vocab_size}-token vocabulary"),
        ("sampling defaults", ", ".join(f"{k} {v}" for k, v in asdict(pipe.sampling).items() if v is not None)),
    ]
    return "\n".join(f"- **{k}**: {v}" for k, v in rows)


def _card_metadata(path: Path) -> dict:
    """The YAML metadata of a model card (save_pretrained writes one), or {} without one."""
    if not path.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(path).data.to_dict()
    except (ImportError, OSError, ValueError):
        return {}


# --- requests ---------------------------------------------------------------------------------------------
def check_request(pipe, prompt, negative, n_images, guidance, top_k, top_p, temperature, seed) -> str | None:
    """What is wrong with one request, in a sentence for the page, or None."""
    from vqgpt.generate import SamplingConfig

    if not isinstance(prompt, str) or not prompt.strip():
        return "Type a prompt first (the examples below are captions the model was trained on)."
    if n_images is None or n_images != int(n_images) or not 1 <= n_images <= MAX_IMAGES:
        return f"Number of images must be a whole number from 1 to {MAX_IMAGES}, got {n_images}."
    codes = pipe.gpt.config.image_vocab_size
    if top_k is not None and (top_k != int(top_k) or not 1 <= top_k <= codes):
        return f"top-k must be a whole number from 1 to {codes} (the codebook: all codes), got {top_k}."
    if seed is not None and (seed != int(seed) or not -1 <= seed < SEED_LIMIT - MAX_IMAGES):
        return f"Seed must be a whole number from 0 to 2**62, or -1 for a random one, got {seed}."
    if negative and guidance == 1:
        return "A negative prompt acts through guidance: set guidance above 1, or clear the negative prompt."
    try:
        SamplingConfig(**{**asdict(pipe.sampling), **sampling_args(guidance, top_k, top_p, temperature)}).validate(
            pipe.gpt.config.image_vocab_size
        )
    except (ValueError, TypeError) as e:
        return f"Invalid sampling setting: {e}"
    return None


def sampling_args(guidance, top_k, top_p, temperature) -> dict:
    return {
        "cfg_scale": float(guidance),
        "top_k": None if top_k is None else int(top_k),
        "top_p": float(top_p),
        "temperature": float(temperature),
    }


def generate_batch(pipe, prompts, negatives, n_images, guidances, top_ks, top_ps, temperatures, seeds):
    """gradio's batched function: one list per input, one entry per request; returns (galleries, seed texts).

    Requests with the same sampling settings are sampled in one call, one row per image, each request with its
    own prompt, negative prompt and seeds (image j of a request with seed s has seed s + j, as pipe(prompt,
    num_images=n, seed=s) would). A request that is invalid (the validator stops those from the page) gets an
    empty gallery and the reason, without failing the others of its batch."""
    import secrets

    from vqgpt.pipeline import FRESH_SEEDS

    n, seeds = len(prompts), list(seeds)
    galleries, notes = [[] for _ in range(n)], [""] * n
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        problem = check_request(
            pipe, prompts[i], negatives[i], n_images[i], guidances[i], top_ks[i], top_ps[i], temperatures[i], seeds[i]
        )
        if problem:
            notes[i] = problem
            continue
        seeds[i] = int(seeds[i]) if seeds[i] is not None and seeds[i] >= 0 else secrets.randbelow(FRESH_SEEDS)
        key = tuple(sampling_args(guidances[i], top_ks[i], top_ps[i], temperatures[i]).items())
        groups.setdefault(key, []).append(i)
    for key, members in groups.items():
        rows = [(i, j) for i in members for j in range(int(n_images[i]))]
        negative = [negatives[i] or "" for i, _ in rows] if any(negatives[i] for i in members) else None
        try:
            out = pipe(
                [prompts[i] for i, _ in rows],
                num_images=1,
                seed=[seeds[i] + j for i, j in rows],
                negative_prompt=negative,
                **dict(key),
            )
        except (ValueError, TypeError) as e:
            for i in members:
                notes[i] = f"Could not sample: {e}"
            continue
        for (i, _), image, s in zip(rows, out.images, out.seeds):
            galleries[i].append((image, f"seed {s}"))
        for i in members:
            last = seeds[i] + int(n_images[i]) - 1
            notes[i] = f"seed {seeds[i]}" + (f" (images: seeds {seeds[i]} to {last})" if last > seeds[i] else "")
    return galleries, notes


# --- the page ---------------------------------------------------------------------------------------------
def build_demo(pipe, ckpt: str, max_batch: int = MAX_BATCH):
    import gradio as gr

    s, codes = pipe.sampling, pipe.gpt.config.image_vocab_size

    def check(prompt, negative_prompt, num_images, guidance, top_k, top_p, temperature, seed):
        """The page's check before a request joins the queue: a bad input is a message in the page."""
        problem = check_request(pipe, prompt, negative_prompt, num_images, guidance, top_k, top_p, temperature, seed)
        if problem:
            raise gr.Error(problem, duration=None)

    # The API's parameters are named after generate's (an input's default is its component's initial value, or
    # None where the argument defaults to None: top-k and the seed). With batch=True each argument is a list,
    # one entry per request. An API request that the page would have refused gets an empty gallery and the
    # reason in place of its seed (raising would fail the other requests of its batch).
    def generate(
        prompt,
        negative_prompt=None,
        num_images=None,
        guidance=None,
        top_k=None,
        top_p=None,
        temperature=None,
        seed=None,
    ):
        t0 = time.perf_counter()
        with torch.inference_mode():
            galleries, notes = generate_batch(
                pipe, prompt, negative_prompt, num_images, guidance, top_k, top_p, temperature, seed
            )
        print(
            f"batch of {len(prompt)} requests: {sum(map(len, galleries))} images in {time.perf_counter() - t0:.2f} s",
            flush=True,
        )
        return galleries, notes

    with gr.Blocks(title="vqgpt") as demo:
        gr.Markdown("# vqgpt\nAutoregressive text-to-image: a VQ image tokenizer and a GPT over its codes.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="e.g. " + (example_prompts(pipe, 1) or ["a cat"])[0])
                negative = gr.Textbox(
                    value="", label="Negative prompt", placeholder="guidance pushes away from this (optional)"
                )
                button = gr.Button("Generate", variant="primary")
                with gr.Accordion("Settings", open=True):
                    n_images = gr.Number(value=4, precision=0, label=f"Number of images (1 to {MAX_IMAGES})")
                    guidance = gr.Slider(1.0, 10.0, value=s.cfg_scale, step=0.5, label="Guidance (CFG scale)")
                    top_k = gr.Number(
                        value=s.top_k or codes, precision=0, label=f"top-k (codes sampled from; {codes}: all of them)"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=s.top_p, step=0.05, label="top-p")
                    temperature = gr.Slider(0.0, 2.0, value=s.temperature, step=0.05, label="Temperature (0: greedy)")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: a random one, shown after)")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png", elem_id="gallery")
                used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used")
        inputs = [prompt, negative, n_images, guidance, top_k, top_p, temperature, seed]
        examples = example_prompts(pipe)
        if examples:
            gr.Examples([[e] for e in examples], inputs=[prompt], label="Captions the model was trained on")
        gr.Markdown("### The model\n" + model_facts(pipe, ckpt))
        gr.on(
            [button.click, prompt.submit],
            check,
            inputs,
            None,
            concurrency_limit=None,
            api_visibility="private",
            show_progress="hidden",
        ).success(
            generate,
            inputs,
            [gallery, used],
            batch=True,
            max_batch_size=max_batch,
            api_name="generate",
            concurrency_limit=1,
        )
    return demo


def load_pipeline(ckpt: str, device: str):
    from vqgpt.cli import pick_device
    from vqgpt.pipeline import TextToImage

    return TextToImage.from_pretrained(ckpt, device=pick_device(device))


def main(argv=None):
    from vqgpt.cli import run_or_exit

    args = parse_args(argv)

    def serve():
        if args.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
        pipe = load_pipeline(args.ckpt, args.device)
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise ValueError("the web demo needs gradio: pip install 'vqgpt[app]'") from None
        demo = build_demo(pipe, args.ckpt, args.max_batch)
        print(f"serving {args.ckpt} on http://{args.host}:{args.port}", flush=True)
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, show_error=False, quiet=True
        )

    run_or_exit(serve, debug=args.debug, oom_hint=f"lower --max-batch (now {args.max_batch})")


if __name__ == "__main__":
    sys.exit(main())
