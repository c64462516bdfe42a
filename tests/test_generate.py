"""Sampling: cached decoding vs full recompute, the sampler's support and distribution, the
counter-based noise, classifier-free guidance and its schedules, seed independence, validation."""

import math

import pytest
import torch

import vqgpt.generate
from vqgpt.generate import (
    MASK32,
    SamplingConfig,
    counter_uniform,
    decode_one_token,
    exponential_noise,
    exponential_noise_table,
    generate,
    logits_to_probs,
    philox4x32,
    prefill,
    rank_keys,
    sample,
    sample_seeded,
    top_k_ranked,
)
from vqgpt.model import GPT, GPTConfig

V = 64


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: on a shared 2-core machine extra intra-op threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT in eval mode with a random output head (the real init zeros it, i.e. uniform logits)."""
    config = dict(text_vocab_size=V, text_len=8, image_vocab_size=V, image_grid=(4, 4), dim=32, n_layer=2, n_head=4)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**config, **overrides}))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def prompts(B: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, V, (B, 8), generator=g)
    text[:, 5:] = 0  # right-padded captions
    return text


@torch.no_grad()
def naive_generate(model: GPT, text: torch.Tensor, sampling: SamplingConfig, seeds: torch.Tensor) -> torch.Tensor:
    """Reference sampler: no cache, the whole sequence recomputed at every step, guidance from two
    separate forward passes (conditional, and with the all-PAD null caption)."""
    B, N = text.shape[0], model.config.n_image
    null = torch.full_like(text, model.config.text_pad_id)
    codes = torch.zeros(B, N, dtype=torch.long)
    for k, s in enumerate(sampling.scales(N)):
        logits = model(text, codes[:, : k + 1])[:, k]
        if s != 1:
            uncond = model(null, codes[:, : k + 1])[:, k]
            logits = uncond + s * (logits - uncond)
        codes[:, k] = sample(logits, sampling, exponential_noise(seeds, k, V))
    return codes.view(B, *model.config.image_grid)


# ---------------------------------------------------------------------------------------------------
# Cached decoding


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cached_decoding_matches_full_recompute(n_kv_head):
    model = tiny_model(n_kv_head=n_kv_head)
    model.setup_cache(5)  # larger than the batch: the first rows of the cache are used
    text = prompts(3)
    codes = torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor(model.config.image_start)
    with torch.no_grad():
        cached = [prefill(model, text)]
        for k in range(1, 16):
            cached.append(decode_one_token(model, codes[:, k - 1], pos))
            pos += 1
        for k in range(16):  # recompute everything up to step k, as if there were no cache
            full = model(text, codes[:, : k + 1])[:, k]
            torch.testing.assert_close(cached[k], full, rtol=1e-5, atol=1e-5, msg=f"step {k}")


def test_forward_cached_needs_a_cache():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.forward_cached(text_ids=prompts(1))
    model.setup_cache(1)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        model.forward_cached(text_ids=prompts(2))


# ---------------------------------------------------------------------------------------------------
# The sampler


# Random123's published known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(tuple(torch.tensor([c]) for c in counter), tuple(torch.tensor([k]) for k in key))
    assert [w.item() for w in words] == list(expected)


def test_counter_uniform_layout():
    """key = seed (low, high word), counter = (vocab index, step, 0, 0), 23 bits of the first word."""
    seeds = torch.tensor([0, 7, 2**40 + 3, -5])
    u = counter_uniform(seeds, 9, 50)
    for b, seed in enumerate(seeds.tolist()):
        seed &= (1 << 64) - 1  # a negative seed is its two's complement
        key = (torch.tensor([seed & MASK32]), torch.tensor([seed >> 32]))
        for i in (0, 1, 49):
            bits = philox4x32((torch.tensor([i]), torch.tensor([9]), torch.tensor([0]), torch.tensor([0])), key)[0]
            assert u[b, i].item() == ((bits.item() >> 9) + 0.5) / 2**23
    assert 0 < u.min() and u.max() < 1
    # Drawing at chosen indices gives the same numbers as drawing the whole vocabulary.
    idx = torch.tensor([[3, 49, 0], [1, 1, 2], [7, 8, 9], [49, 48, 47]])
    assert torch.equal(counter_uniform(seeds, 9, idx), u.gather(1, idx))


def test_noise_is_a_function_of_seed_step_index_only():
    seeds = torch.arange(2000)
    u = counter_uniform(seeds, 0, V)
    assert torch.equal(counter_uniform(seeds[[7, 3]], 0, V), u[[7, 3]])  # batch composition is irrelevant
    assert not torch.equal(counter_uniform(seeds, 1, V), u)  # each step draws fresh noise
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert exponential_noise(seeds, 0, V).mean().item() == pytest.approx(1.0, abs=0.01)
    step_tensor = counter_uniform(seeds[:4], torch.tensor(3), V)  # step as a device tensor (graph capture)
    assert torch.equal(step_tensor, counter_uniform(seeds[:4], 3, V))


def test_noise_table_holds_each_steps_noise():
    seeds = torch.tensor([3, 2**40 + 7])
    table = exponential_noise_table(seeds, 5, 50)  # (B, N, V)
    assert table.shape == (2, 5, 50)
    for k in range(5):
        assert torch.equal(table[:, k], exponential_noise(seeds, k, 50))


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(top_k=10), SamplingConfig(top_k=20, top_p=0.8, temperature=0.7), SamplingConfig()]
)
def test_sample_seeded_draws_noise_only_where_it_matters(sampling):
    """Noise for the top-k candidates only gives the same tokens as noise for the whole vocabulary."""
    logits = torch.randn(3000, V, generator=torch.Generator().manual_seed(4)) * 2
    seeds = torch.arange(3000) * 7
    expected = sample(logits, sampling, exponential_noise(seeds, 5, V))
    assert torch.equal(sample_seeded(logits, sampling, seeds, 5), expected)
    drawn = exponential_noise(seeds, 5, V)  # that step's noise drawn beforehand (generate's noise table)
    assert torch.equal(sample_seeded(logits, sampling, seeds, 5, noise=drawn), expected)


def test_top_k_1_is_greedy():
    logits = torch.randn(500, V, generator=torch.Generator().manual_seed(0))
    noise = exponential_noise(torch.arange(500), 0, V)
    greedy = sample(logits, SamplingConfig(temperature=0.0), noise)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingConfig(top_k=1, temperature=1.7), noise), greedy)


def test_the_tie_rule_ranks_equal_values_by_lower_index():
    """top-k keeps exactly k tokens, the lower indices of a tie across the k-th value (torch.topk over the floats
    would keep whichever its algorithm meets first), and the ranking is value first, then index."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0, 3.0, 2.0, -0.5, -2.0]])
    vals, idx = top_k_ranked(logits, 3)
    assert idx.tolist() == [[6, 1, 2]] and vals.tolist() == [[3.0, 2.0, 2.0]]
    order = torch.sort(rank_keys(logits), descending=True).indices
    assert order.tolist() == [[6, 1, 2, 3, 5, 7, 0, 4, 8, 9]]
    probs = logits_to_probs(logits, 1.0, 3, 1.0)
    assert torch.nonzero(probs[0]).flatten().tolist() == [1, 2, 6]
    # top-p cuts a tie the same way: four equal tokens of 0.24 each; the mass before the fourth (0.72) is
    # past 0.6, so the lower three stay
    flat = torch.zeros(1, 10).index_fill_(1, torch.tensor([3, 4, 8, 9]), 5.0)
    kept = torch.nonzero(logits_to_probs(flat, 1.0, None, 0.6)[0]).flatten().tolist()
    assert kept == [3, 4, 8]
    assert torch.nonzero(logits_to_probs(flat, 1.0, 6, 0.6)[0]).flatten().tolist() == [3, 4, 8]


def test_generate_top_k_1_equals_temperature_0():
    model = tiny_model()
    text, seeds = prompts(2), torch.tensor([3, 4])
    a = generate(model, text, SamplingConfig(cfg_scale=2.0, top_k=1), seeds)
    b = generate(model, text, SamplingConfig(cfg_scale=2.0, temperature=0.0), seeds + 100)
    assert torch.equal(a, b)


def _draws(logits: torch.Tensor, sampling: SamplingConfig, n: int) -> torch.Tensor:
    """n independent draws from one row of logits, one seed per draw."""
    seeds = torch.arange(n)
    return sample(logits.expand(n, -1), sampling, exponential_noise(seeds, 0, logits.shape[-1]))


def test_tokens_outside_top_k_are_never_drawn():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 2
    allowed = set(logits.topk(5).indices.tolist())
    drawn = set(_draws(logits, SamplingConfig(top_k=5), 4000).tolist())
    assert drawn == allowed  # nothing outside, and the support is not degenerate


def test_tokens_outside_top_p_are_never_drawn():
    probs = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.05] + [0.1 / (V - 5)] * (V - 5))
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(2))
    logits = probs.log()[perm]  # shuffled so order in the vocab means nothing
    # mass 0.35 + 0.25 = 0.60 < 0.7, so the nucleus for top_p = 0.7 is the three most likely tokens
    nucleus = {perm.tolist().index(i) for i in range(3)}
    assert set(_draws(logits, SamplingConfig(top_p=0.7), 4000).tolist()) == nucleus
    # with top_k = 2 the nucleus is taken within the top 2 (renormalized 0.58 / 0.42): top_p 0.5 keeps one
    assert set(_draws(logits, SamplingConfig(top_k=2, top_p=0.5), 500).tolist()) == {perm.tolist().index(0)}


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(top_k=8, temperature=0.7), SamplingConfig(top_p=0.9, temperature=1.3)]
)
def test_sampled_frequencies_match_the_distribution(sampling):
    """Pearson chi-square against probabilities computed independently (float64, explicit sort)."""
    n, vocab = 20000, 12
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    z = logits.double() / sampling.temperature
    order = z.argsort(descending=True)
    keep = order[: sampling.top_k] if sampling.top_k else order
    p = torch.softmax(z[keep], 0)
    if sampling.top_p < 1:
        keep = keep[: int((p.cumsum(0) - p < sampling.top_p).sum())]
    expected = torch.zeros(vocab, dtype=torch.float64)
    expected[keep] = torch.softmax(z[keep], 0)
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    torch.testing.assert_close(probs.double(), expected)

    counts = torch.bincount(_draws(logits, sampling, n), minlength=vocab).double()
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    chi2 = ((counts[support] - n * expected[support]) ** 2 / (n * expected[support])).sum().item()
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), f"chi2 {chi2:.1f} with {dof} dof"  # ~1e-4 false alarm


# ---------------------------------------------------------------------------------------------------
# generate: guidance, seeds, schedules


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(cfg_scale=3.0, top_k=20),
        SamplingConfig(cfg_scale=2.0, cfg_schedule="linear", top_p=0.9),
        SamplingConfig(cfg_scale=4.0, cfg_schedule="interval", cfg_interval=5, temperature=0.8),
        SamplingConfig(cfg_scale=1.0),
    ],
    ids=["constant", "linear", "interval", "no-cfg"],
)
@pytest.mark.parametrize("table_max", [0, 2**17], ids=["noise-per-step", "noise-table"])
def test_generate_matches_naive_reference(sampling, table_max, monkeypatch):
    """Both ways generate draws its noise (each step's, or the whole image's up front) give the reference's codes."""
    monkeypatch.setattr(vqgpt.generate, "NOISE_TABLE_MAX", table_max)
    model = tiny_model()
    text, seeds = prompts(3), torch.tensor([10, 11, 12])
    codes = generate(model, text, sampling, seeds)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert torch.equal(codes, naive_generate(model, text, sampling, seeds))


def _rows_seen(model: GPT, monkeypatch) -> list[int]:
    rows = []
    original = model.forward_cached

    def spy(**kwargs):
        x = kwargs.get("text_ids", kwargs.get("codes"))
        rows.append(x.shape[0])
        return original(**kwargs)

    monkeypatch.setattr(model, "forward_cached", spy)
    return rows


def test_cfg_scale_1_skips_unconditional_rows(monkeypatch):
    model = tiny_model()
    text, seeds = prompts(3), torch.tensor([1, 2, 3])
    rows = _rows_seen(model, monkeypatch)
    plain = generate(model, text, SamplingConfig(cfg_scale=1.0, top_k=10), seeds)
    assert rows and set(rows) == {3}
    rows.clear()
    off = SamplingConfig(cfg_scale=5.0, cfg_schedule="interval", cfg_interval=0, top_k=10)  # never on
    assert torch.equal(generate(model, text, off, seeds), plain)
    assert set(rows) == {3}
    rows.clear()
    guided = generate(model, text, SamplingConfig(cfg_scale=3.0, top_k=10), seeds)
    assert set(rows) == {6}  # conditional + unconditional in one batch
    assert not torch.equal(guided, plain)


def test_same_seed_same_codes_whatever_the_batch():
    model = tiny_model()
    text, seeds = prompts(4), torch.tensor([101, 202, 303, 404])
    sampling = SamplingConfig(cfg_scale=3.0, top_k=32)
    full = generate(model, text, sampling, seeds)
    alone = generate(model, text[2:3], sampling, seeds[2:3])
    assert torch.equal(alone[0], full[2])
    perm = torch.tensor([3, 0, 2])
    assert torch.equal(generate(model, text[perm], sampling, seeds[perm]), full[perm])
    # Same prompt, different seeds: different images.
    same_prompt = generate(model, text[:1].expand(2, -1), sampling, torch.tensor([1, 2]))
    assert not torch.equal(same_prompt[0], same_prompt[1])


def test_generate_restores_training_mode_and_shows_progress(capsys):
    model = tiny_model().train()
    generate(model, prompts(1), SamplingConfig(), torch.tensor([0]), progress=True)
    assert model.training
    assert "sampling" in capsys.readouterr().err


def test_cfg_schedules():
    assert SamplingConfig(cfg_scale=3.0).scales(4) == [3.0] * 4
    assert SamplingConfig(cfg_scale=3.0, cfg_schedule="linear").scales(5) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert SamplingConfig(cfg_scale=3.0, cfg_schedule="interval", cfg_interval=2).scales(4) == [3, 3, 1, 1]


def test_kernels_backend_draws_the_same_codes(monkeypatch):
    """attn_backend="triton" routes prefill/decode attention and the fused CFG sampler through vqgpt.kernels (on a
    CPU: the Triton interpreter, which conftest.py turns on), and draws the PyTorch path's codes."""
    kernels = pytest.importorskip("vqgpt.kernels")
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real_sample = kernels.cfg_sample

    def spy(logits, **kwargs):
        calls.append((logits.shape[0], kwargs["top_k"]))
        return real_sample(logits, **kwargs)

    monkeypatch.setattr(kernels, "cfg_sample", spy)
    model = tiny_model(n_kv_head=2, image_grid=(2, 4))  # 8 codes: the interpreter runs ~100 launches per image
    text, seeds = prompts(3), torch.tensor([5, 6, 7])
    for sampling in [
        SamplingConfig(cfg_scale=3.0, top_k=20, top_p=0.9),
        SamplingConfig(cfg_scale=2.0, cfg_schedule="interval", cfg_interval=4, temperature=0.8),
        SamplingConfig(cfg_scale=1.0, temperature=1.2),
    ]:
        model.config.attn_backend = "torch"
        expected = generate(model, text, sampling, seeds)
        model.config.attn_backend = "triton"
        calls.clear()
        assert torch.equal(generate(model, text, sampling, seeds), expected), sampling
        assert len(calls) == model.config.n_image
        assert calls[0] == (6 if sampling.cfg_scale != 1 else 3, sampling.top_k or 0)


def test_triton_backend_off_cuda_is_a_one_line_error(monkeypatch):
    """ "triton" means Triton or an error: on a CPU without the interpreter it no longer runs PyTorch quietly."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model()
    model.config.attn_backend = "triton"
    with pytest.raises(RuntimeError, match=r"^backend 'triton' needs (CUDA tensors, these are on cpu|the triton)"):
        generate(model, prompts(1), SamplingConfig(), torch.tensor([0]))


# Codes drawn by main (commit 71cda95, before the sampling rules were merged into one definition) on
# tiny_model(n_kv_head=2) for prompts(2) and seeds (7, 2**40 + 3), with the noise table and per step alike.
# Seeded sampling must keep giving exactly these images.
PINNED_DRAWS = {
    "cfg3-topk20": (
        SamplingConfig(cfg_scale=3.0, top_k=20),
        [
            [61, 46, 42, 42, 42, 31, 38, 37, 20, 21, 4, 8, 20, 21, 18, 52],
            [61, 46, 46, 42, 0, 43, 13, 1, 14, 37, 59, 12, 0, 21, 18, 15],
        ],
    ),
    "cfg2-topk10-topp0.8-t0.7": (
        SamplingConfig(cfg_scale=2.0, top_k=10, top_p=0.8, temperature=0.7),
        [
            [61, 46, 42, 42, 42, 42, 42, 0, 39, 62, 25, 7, 57, 26, 43, 46],
            [61, 46, 42, 42, 0, 35, 1, 14, 37, 57, 26, 43, 13, 1, 14, 60],
        ],
    ),
    "nocfg-topp0.9-t1.3": (
        SamplingConfig(cfg_scale=1.0, top_p=0.9, temperature=1.3),
        [
            [61, 46, 42, 29, 3, 10, 2, 44, 38, 35, 10, 25, 53, 22, 63, 21],
            [61, 46, 46, 42, 0, 43, 13, 1, 14, 37, 59, 12, 0, 21, 18, 30],
        ],
    ),
    "interval-cfg3-topk5": (
        SamplingConfig(cfg_scale=3.0, cfg_schedule="interval", cfg_interval=6, top_k=5),
        [
            [48, 55, 55, 55, 37, 57, 26, 0, 35, 22, 58, 36, 56, 39, 23, 49],
            [61, 46, 42, 42, 0, 11, 30, 5, 3, 36, 35, 22, 58, 44, 30, 5],
        ],
    ),
    "linear-cfg4": (
        SamplingConfig(cfg_scale=4.0, cfg_schedule="linear"),
        [
            [61, 46, 42, 42, 48, 16, 39, 44, 51, 14, 37, 53, 22, 58, 40, 41],
            [61, 46, 46, 42, 0, 43, 13, 1, 14, 37, 59, 12, 0, 21, 18, 15],
        ],
    ),
}


@pytest.mark.parametrize("table_max", [0, 2**17], ids=["noise-per-step", "noise-table"])
@pytest.mark.parametrize("name", list(PINNED_DRAWS))
def test_seeded_draws_are_those_of_before(name, table_max, monkeypatch):
    monkeypatch.setattr(vqgpt.generate, "NOISE_TABLE_MAX", table_max)
    sampling, expected = PINNED_DRAWS[name]
    codes = generate(tiny_model(n_kv_head=2), prompts(2), sampling, torch.tensor([7, 2**40 + 3]))
    assert codes.flatten(1).tolist() == expected


# ---------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(cfg_scale=float("inf")), "cfg_scale"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(cfg_schedule="cosine"), "cfg_schedule"),
        (dict(cfg_schedule="interval"), "needs cfg_interval"),
        (dict(cfg_schedule="interval", cfg_interval=-1), "cfg_interval"),
        (dict(cfg_interval=10), "only used with cfg_schedule='interval'"),
        (dict(top_k=0), r"top_k .*\[1, 64\]"),
        (dict(top_k=65), r"top_k .*\[1, 64\]"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), r"top_p must be in \[1e-06, 1\]"),
        # finite in Python, not in float32: every code would come out 0
        (dict(temperature=1e-40), "temperature"),
        (dict(cfg_scale=1e39), "cfg_scale"),
        (dict(top_p=1e-300), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_invalid_sampling_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs).validate(codebook_size=V)
    with pytest.raises(ValueError, match=match):  # and generate checks before doing any work
        generate(tiny_model(), prompts(1), SamplingConfig(**kwargs), torch.tensor([0]))


def test_valid_edge_configs_pass():
    SamplingConfig(cfg_scale=0.0, top_k=V, top_p=1.0, temperature=0.0).validate(V)
    SamplingConfig(cfg_schedule="interval", cfg_interval=0).validate(V)


def test_invalid_generate_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(0, 8, dtype=torch.long), SamplingConfig(), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="text context is 8"):
        generate(model, torch.zeros(2, 5, dtype=torch.long), SamplingConfig(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"seeds must be an integer tensor of shape \(2,\)"):
        generate(model, prompts(2), SamplingConfig(), torch.tensor([0]))
    with pytest.raises(ValueError, match="seeds must be an integer tensor"):
        generate(model, prompts(2), SamplingConfig(), torch.tensor([0.0, 1.0]))


def test_compiled_decode_step_draws_the_same_codes(monkeypatch):
    """generate(compile=True) (the decode step through torch.compile, a C++ build on a CPU) draws the plain
    call's codes, with the noise table and with per-step noise (a recompile: the step's inputs change)."""
    model = tiny_model()
    text, seeds = prompts(2), torch.tensor([4, 5])
    sampling = SamplingConfig(cfg_scale=3.0, top_k=10)
    plain = generate(model, text, sampling, seeds)
    assert torch.equal(generate(model, text, sampling, seeds, compile=True), plain)
    monkeypatch.setattr(vqgpt.generate, "NOISE_TABLE_MAX", 0)
    assert torch.equal(generate(model, text, sampling, seeds, compile=True), plain)


def test_functions_stay_short():
    """No function of vqgpt/generate.py or vqgpt/model.py over 80 lines (issue 18: generate was 126)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "vqgpt"
    for name in ("generate.py", "model.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= 80, f"vqgpt/{name}: {node.name} has {lines} lines"
