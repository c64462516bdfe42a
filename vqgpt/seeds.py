"""The rows of a sampling call: prompts checked, one negative prompt and one seed per image.

TextToImage (vqgpt/pipeline.py) and the reranker (vqgpt/rerank.py) both turn a call's prompts, negative prompts
and seeds into rows this way, so that the same seed draws the same image through either.
"""

from __future__ import annotations

import numbers
import secrets

import torch

SEED_LIMIT = 2**62  # every image's seed is an int in [0, SEED_LIMIT): int64 arithmetic never overflows
FRESH_SEEDS = 2**31  # seed=None draws from [0, FRESH_SEEDS): short enough to read back and type


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
            raise ValueError(
                f"{what} {t!r:.80} is not valid text (lone surrogates: bytes that were not UTF-8)"
            ) from None
    return list(texts)


def negative_rows(negative_prompt, n_prompts: int, num_images: int) -> list[str] | None:
    """One negative prompt per image (prompt-major), from one for all prompts or one per prompt; None stays."""
    if negative_prompt is None:
        return None
    negatives = _text_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * n_prompts
    if len(negatives) != n_prompts:
        raise ValueError(
            f"negative_prompt has {len(negatives)} entries for {n_prompts} prompts: give one string, or one per prompt"
        )
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
