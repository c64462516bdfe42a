"""Inference dtype: TextToImage.from_pretrained(torch_dtype=...), sample.py --dtype; bf16 sampling on a CPU."""

import copy

import pytest
import torch

from vqgpt.generate import SamplingConfig, decode_one_token, generate, prefill
from vqgpt.model import GPT, gpt_config
from vqgpt.pipeline import TextToImage, resolve_dtype


def _peaked_tiny_gpt(seed: int = 0) -> GPT:
    """A tiny random GPT whose logits spread like a trained one's (its head starts at zero otherwise)."""
    torch.manual_seed(seed)
    cfg = gpt_config("tiny", text_vocab_size=300, text_pad_id=0, text_len=8, image_vocab_size=64, image_grid=(8, 8))
    gpt = GPT(cfg).eval()
    torch.nn.init.normal_(gpt.head.weight, std=0.5)  # logits with a std of about 4
    return gpt


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown torch_dtype 'half-ish'"):
        resolve_dtype("half-ish", "cpu")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        resolve_dtype(torch.int8, "cpu")


def test_bf16_sampling_on_a_cpu_agrees_with_fp32():
    """Teacher-forced on the same codes, the bf16 GPT's logits stay within 5% of the logit spread of fp32's at
    every step (measured: 2.6% at worst); sampled with the same seeds, at least 80% of the codes are the same
    (measured: 90%; a near tie flipped in bf16 changes the rest of that image) and every first code is."""
    gpt = _peaked_tiny_gpt()
    g16 = copy.deepcopy(gpt).to(torch.bfloat16)
    text, seeds = torch.randint(1, 300, (8, 8), generator=torch.Generator().manual_seed(1)), torch.arange(8)
    sampling = SamplingConfig(cfg_scale=3.0, top_k=None, temperature=1.0)
    codes32, codes16 = generate(gpt, text, sampling, seeds), generate(g16, text, sampling, seeds)
    assert codes16.dtype == torch.long and codes16.shape == codes32.shape
    agree = (codes16 == codes32).float().mean().item()
    assert agree >= 0.8, f"only {agree:.0%} of the bf16 codes equal the fp32 ones"
    assert torch.equal(codes16[:, 0, 0], codes32[:, 0, 0]), "the first codes (from the prefill) differ"
    cfg, flat = gpt.config, codes32.view(8, -1)
    worst = 0.0
    with torch.inference_mode():
        gpt.setup_cache(8), g16.setup_cache(8)
        pairs = [(prefill(gpt, text), prefill(g16, text))]
        for k in range(cfg.n_image - 1):
            pos = torch.tensor(cfg.image_start + k)
            pairs.append((decode_one_token(gpt, flat[:, k], pos), decode_one_token(g16, flat[:, k], pos)))
        for ref, low in pairs:
            assert low.dtype == torch.bfloat16
            worst = max(worst, ((low.float() - ref).abs().max() / ref.std()).item())
    assert worst < 0.05, f"bf16 logits off by {worst:.3f} of the logit spread"


def test_from_pretrained_torch_dtype(tmp_path):
    from vqgpt.text import TextTokenizer
    from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

    tok = ImageTokenizer(tokenizer_config("tiny", image_size=16, fsq_levels=(4, 4)))
    text = TextTokenizer.train(["a red square", "a blue circle"] * 5, vocab_size=300)
    gpt = GPT(
        gpt_config(
            "tiny",
            text_vocab_size=text.vocab_size,
            text_pad_id=text.pad_id,
            text_len=8,
            image_vocab_size=tok.codebook_size,
            image_grid=(tok.grid_size, tok.grid_size),
        )
    )
    torch.nn.init.normal_(gpt.head.weight, std=0.5)
    TextToImage(gpt, tok, text, SamplingConfig()).save_pretrained(tmp_path / "m")
    fp32 = TextToImage.from_pretrained(tmp_path / "m")  # "auto" on a CPU
    bf16 = TextToImage.from_pretrained(tmp_path / "m", torch_dtype="bf16")
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert next(bf16.image_tokenizer.parameters()).dtype == torch.float32, "the image decoder stays in fp32"
    codes32 = fp32.generate_codes(["a red square"], num_images=4, seed=3)
    codes16 = bf16.generate_codes(["a red square"], num_images=4, seed=3)
    assert (codes16 == codes32).float().mean() >= 0.75
    assert fp32.to(dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown torch_dtype"):
        TextToImage.from_pretrained(tmp_path / "m", torch_dtype="fp8")


def test_sample_script_dtype_flag():
    import sample

    assert sample.parse_args(["--ckpt", "x"]).dtype == "auto"
    assert sample.parse_args(["--ckpt", "x", "--dtype", "bf16"]).dtype == "bf16"
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "x", "--dtype", "int8"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_cuda_with_the_kernels_and_a_cuda_graph():
    """On a GPU: the bf16 GPT through the Triton kernels (attn_backend "triton": a failed self-check raises)
    draws the same codes eagerly and replayed as a CUDA graph, and mostly the fp32 model's codes."""
    gpt = _peaked_tiny_gpt().cuda()
    gpt.config.attn_backend = "triton"
    g16 = copy.deepcopy(gpt).to(torch.bfloat16)
    text, seeds = torch.randint(1, 300, (8, 8), generator=torch.Generator().manual_seed(1)), torch.arange(8)
    sampling = SamplingConfig(cfg_scale=3.0, top_k=16, temperature=1.0)
    eager = generate(g16, text, sampling, seeds)
    graph = generate(g16, text, sampling, seeds, cuda_graph=True)
    assert torch.equal(eager, graph), "the CUDA graph replay drew other codes than the eager loop"
    agree = (eager == generate(gpt, text, sampling, seeds)).float().mean().item()
    assert agree >= 0.8, f"only {agree:.0%} of the bf16 codes equal the fp32 ones on the GPU"
