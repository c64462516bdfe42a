"""The pipeline call as diffusers users write it: the output object, seeds, aliases, negative prompts, output types."""

import numpy as np
import pytest
import torch

from vqgpt.generate import SamplingConfig, exponential_noise, sample
from vqgpt.model import GPT, gpt_config
from vqgpt.pipeline import TextToImage, TextToImageOutput
from vqgpt.text import TextTokenizer
from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

CAPTIONS = ["a red square", "a blue circle", "a green star on the left", "a yellow moon"]


@pytest.fixture(scope="module")
def pipe():
    """An untrained tiny pipeline (16 px, 4x4 codes) whose GPT head is random, so that prompts and seeds matter."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = ImageTokenizer(tokenizer_config("tiny", image_size=16, fsq_levels=(4, 4)))
    text = TextTokenizer.train(CAPTIONS * 5, vocab_size=300)
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
    torch.nn.init.normal_(gpt.head.weight, std=1.0)
    return TextToImage(gpt.eval(), tok.eval(), text, SamplingConfig(cfg_scale=3.0, top_k=8))


def pixels(out: TextToImageOutput) -> np.ndarray:
    return np.stack([np.asarray(im) for im in out.images])


def same_image(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The decoder's convolutions round differently at another batch size; other codes differ by far more."""
    return torch.allclose(a, b, atol=1e-4)


def test_the_call_returns_images_and_their_seeds(pipe):
    out = pipe(["a red square", "a blue circle"], num_images=2, seed=5)
    assert isinstance(out, TextToImageOutput) and len(out.images) == 4 and out.images[0].size == (16, 16)
    assert out.seeds == [5, 6, 7, 8]
    assert out.prompts == ["a red square"] * 2 + ["a blue circle"] * 2 and out.negative_prompts is None
    with pytest.raises(TypeError, match=r"out\.images\[k\]"):  # code written for the old bare list
        out[0]
    assert np.array_equal(pixels(out), pixels(pipe(["a red square", "a blue circle"], num_images=2, seed=5)))


def test_no_seed_draws_fresh_seeds_that_reproduce_each_image(pipe):
    a, b = pipe("a red square", num_images=3), pipe("a red square", num_images=3)
    assert a.seeds != b.seeds and len(set(a.seeds)) == 3
    assert not np.array_equal(pixels(a), pixels(b))
    k = 2  # any image of the call, drawn again on its own from its reported seed
    first = pipe("a red square", num_images=3, output_type="pt")
    assert same_image(pipe(first.prompts[k], seed=first.seeds[k], output_type="pt").images[0], first.images[k])


def test_a_seed_list_gives_one_seed_per_image(pipe):
    out = pipe(["a red square", "a yellow moon"], seed=[41, 7], output_type="pt")
    assert out.seeds == [41, 7]
    assert same_image(out.images[1], pipe("a yellow moon", seed=7, output_type="pt").images[0])
    with pytest.raises(ValueError, match="3 seeds for 2 images"):
        pipe(["a red square", "a yellow moon"], seed=[1, 2, 3])
    for bad in (-1, 2**62, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seeds must be ints"):
            pipe("a red square", seed=bad)


def test_diffusers_names_are_the_same_settings(pipe):
    ours = pipe("a blue circle", num_images=2, cfg_scale=2.0, seed=3, output_type="pt").images
    theirs = pipe("a blue circle", num_images_per_prompt=2, guidance_scale=2.0, seed=3, output_type="pt").images
    assert torch.equal(ours, theirs) and ours.shape == (2, 3, 16, 16)
    assert not torch.equal(ours, pipe("a blue circle", num_images=2, cfg_scale=1.0, seed=3, output_type="pt").images)
    with pytest.raises(ValueError, match="cfg_scale and guidance_scale are the same setting"):
        pipe("a blue circle", cfg_scale=2.0, guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_images and num_images_per_prompt"):
        pipe("a blue circle", num_images=2, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="num_images must be an int >= 1"):
        pipe("a blue circle", num_images_per_prompt=0)


def test_a_generator_fixes_the_seeds(pipe):
    a = pipe("a red square", num_images=2, generator=torch.Generator().manual_seed(0))
    b = pipe("a red square", num_images=2, generator=torch.Generator().manual_seed(0))
    assert a.seeds == b.seeds and a.seeds[1] == a.seeds[0] + 1 and np.array_equal(pixels(a), pixels(b))
    c = pipe("a red square", num_images=2, generator=torch.Generator().manual_seed(1))
    assert c.seeds != a.seeds
    per_image = pipe("a red square", num_images=2, generator=[torch.Generator().manual_seed(i) for i in (0, 1)])
    assert per_image.seeds == [a.seeds[0], c.seeds[0]]
    with pytest.raises(ValueError, match="seed or generator"):
        pipe("a red square", seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="1 generators for 2 images"):
        pipe("a red square", num_images=2, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="torch.Generator"):
        pipe("a red square", generator=0)


def test_output_types_hold_the_same_pixels(pipe):
    pil = pipe(["a red square", "a blue circle"], seed=9).images
    pt = pipe(["a red square", "a blue circle"], seed=9, output_type="pt").images
    arr = pipe(["a red square", "a blue circle"], seed=9, output_type="np").images
    assert pt.shape == (2, 3, 16, 16) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    assert arr.shape == (2, 16, 16, 3) and arr.dtype == np.float32
    assert np.array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), np.round(arr * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="unknown output_type 'latent'"):
        pipe("a red square", output_type="latent")


@torch.no_grad()
def reference_codes(pipe, prompt: str, uncond_text: str, scale: float, seed: int) -> torch.Tensor:
    """No cache, the whole sequence recomputed each step, guidance from a second pass given `uncond_text`."""
    gpt, cfg = pipe.gpt, SamplingConfig(cfg_scale=scale, top_k=8)
    cond_ids, uncond_ids = pipe.text_tokenizer([prompt, uncond_text], gpt.config.text_len).split(1)
    N, V = gpt.config.n_image, gpt.config.image_vocab_size
    codes = torch.zeros(1, N, dtype=torch.long)
    for k in range(N):
        c, u = gpt(cond_ids, codes[:, : k + 1])[:, k], gpt(uncond_ids, codes[:, : k + 1])[:, k]
        codes[:, k] = sample(u + scale * (c - u), cfg, exponential_noise(torch.tensor([seed]), k, V))
    return codes.view(1, *gpt.config.image_grid)


def test_negative_prompt_is_the_caption_of_the_guidance_rows(pipe):
    prompt, negative = "a red square", "a blue circle"
    codes = pipe.generate_codes([prompt], seed=4, cfg_scale=3.0, top_k=8, negative_prompt=negative)
    assert torch.equal(codes, reference_codes(pipe, prompt, negative, 3.0, 4))
    plain = pipe.generate_codes([prompt], seed=4, cfg_scale=3.0, top_k=8)
    assert torch.equal(plain, reference_codes(pipe, prompt, "", 3.0, 4)) and not torch.equal(plain, codes)
    assert torch.equal(plain, pipe.generate_codes([prompt], seed=4, cfg_scale=3.0, top_k=8, negative_prompt=""))
    out = pipe(
        [prompt, "a yellow moon"], num_images=2, seed=4, negative_prompt=[negative, "a red square"], output_type="pt"
    )
    assert out.negative_prompts == [negative] * 2 + ["a red square"] * 2
    alone = pipe("a yellow moon", seed=6, negative_prompt="a red square", output_type="pt").images[0]
    assert same_image(out.images[2], alone)  # per-prompt negatives, and the batch does not change an image
    with pytest.raises(ValueError, match="guidance, which is off"):
        pipe(prompt, cfg_scale=1.0, negative_prompt=negative)
    with pytest.raises(ValueError, match="3 entries for 2 prompts"):
        pipe([prompt, prompt], negative_prompt=["a", "b", "c"])
