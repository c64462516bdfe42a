"""The feedback loop at sampling: draw N candidates per requested image, score them, keep the best.

DALL-E (Ramesh et al. 2021) and minDALL-E rerank their samples with CLIP. vqgpt scores with the LiT scorer
trained against its own image tokenizer (`vqgpt/lit.py`), or without any second model with the GPT's own
evidence for the caption, log p(x | caption) - log p(x | null caption) (the two rows classifier-free guidance
already runs; here teacher-forced over the sampled codes). `min_score` and `max_rounds` resample the images
still below a score: the founding documents' "regenerate until it meets the criterion".

    codes, scores, seeds = rerank_codes(pipe, ["a red circle"], 4, seed=0, rerank=8, scorer=scorer)

Seeds: output row r has the seed plain sampling gives it, seed + r; its candidate k of round q is drawn with
seed + r + (q * N + k) * CANDIDATE_STRIDE. So candidate 0 of round 0 is the plain sample (rerank=1 is plain
sampling), candidates never share a seed with another row's (fewer than 2**40 rows), the images depend neither
on the batch nor on how the rows are split into calls, and `seeds[r]` alone redraws the chosen image:
pipe(prompt, seed=seeds[r]).
"""

from __future__ import annotations

from dataclasses import asdict, fields

import torch
import torch.nn.functional as F

from .generate import SamplingConfig, generate

SELF = "self"  # scorer="self": the GPT's own evidence for the caption, no second model
CANDIDATE_STRIDE = 2**40  # seed distance between a row's candidates (seeds stay below 2**62 for 4096 candidates)


def sampling_config(pipe, **kw) -> SamplingConfig:
    """The pipeline's saved sampling defaults overridden by kw, validated."""
    unknown = set(kw) - {f.name for f in fields(SamplingConfig)}
    if unknown:
        raise TypeError(f"unknown sampling arguments {sorted(unknown)}")
    cfg = SamplingConfig(**{**asdict(pipe.sampling), **kw})
    cfg.validate(pipe.gpt.config.image_vocab_size)
    return cfg


def candidate_seeds(seed: int, rows: int, rerank: int, round_: int = 0) -> torch.Tensor:
    """LongTensor (rerank, rows): the seed of candidate k of output row r in round `round_` (module doc)."""
    k = torch.arange(rerank, dtype=torch.long)[:, None] + round_ * rerank
    return int(seed) + torch.arange(rows, dtype=torch.long)[None, :] + k * CANDIDATE_STRIDE


def sample_rows(pipe, texts: list[str], seeds: torch.Tensor, cfg: SamplingConfig, batch_size: int,
                **generate_kw) -> torch.Tensor:
    """Codes (len(texts), h, w): row i is texts[i] drawn with seeds[i], batch_size rows at a time."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids = pipe.text_tokenizer(texts[i:i + batch_size], pipe.gpt.config.text_len)
        out.append(generate(pipe.gpt, ids, cfg, seeds[i:i + batch_size], **generate_kw).cpu())
    return torch.cat(out)


@torch.no_grad()
def self_scores(pipe, codes: torch.Tensor, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(N,) log p(codes | text) - log p(codes | null caption) in nats, teacher-forced at temperature 1."""
    gpt, out = pipe.gpt, []
    was = gpt.training
    gpt.eval()
    device = gpt.head.weight.device
    for i in range(0, len(texts), batch_size):
        c = codes[i:i + batch_size].flatten(1).to(device)  # (b, h*w)
        ids = pipe.text_tokenizer(texts[i:i + batch_size], gpt.config.text_len).to(device)
        null = torch.full_like(ids, gpt.config.text_pad_id)
        logp = F.log_softmax(gpt(torch.cat([ids, null]), torch.cat([c, c])).float(), -1)  # (2b, h*w, V)
        per_row = logp.gather(-1, torch.cat([c, c])[..., None]).squeeze(-1).sum(1)  # (2b,)
        cond, uncond = per_row.chunk(2)
        out.append((cond - uncond).cpu())
    gpt.train(was)
    return torch.cat(out)


def resolve_scorer(pipe, scorer, device=None):
    """None -> the scorer saved with the pipeline, else "self"; a path -> ImageTextScorer.from_pretrained.
    A LiT scorer must have been trained on this pipeline's image tokenizer (it reads its codes)."""
    if scorer is None:
        scorer = getattr(pipe, "scorer", None) or SELF
    if isinstance(scorer, str) and scorer != SELF:
        from .lit import ImageTextScorer

        scorer = ImageTextScorer.from_pretrained(scorer, device=device or pipe.device)
    if scorer != SELF:
        if not hasattr(scorer, "score_codes"):
            raise ValueError(f"scorer must be an ImageTextScorer, a directory of one, or 'self'; got "
                             f"{type(scorer).__name__}")
        scorer.check_image_tokenizer(pipe.image_tokenizer)
    return scorer


def score_codes(pipe, scorer, codes: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """(N,) agreement of each code grid with its text: higher is better, whichever the scorer."""
    if scorer == SELF:
        return self_scores(pipe, codes, texts)
    return scorer.score_codes(codes, texts)


def rerank_codes(pipe, prompts: list[str], num_images: int = 1, *, seed: int = 0, rerank: int = 8, scorer=None,
                 min_score: float | None = None, max_rounds: int = 1, batch_size: int = 64,
                 generate_kw: dict | None = None, **sampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (R, h, w), scores (R,), seeds (R,)) for R = len(prompts) * num_images rows, prompt-major: each row
    the best of `rerank` candidates drawn in one batch. With min_score, rows whose best is still below it get
    `rerank` fresh candidates again, up to max_rounds rounds in all; a row keeps its best candidate so far."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(rerank, int) or isinstance(rerank, bool) or rerank < 1:
        raise ValueError(f"rerank must be an int >= 1 (candidates per image), got {rerank!r}")
    if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
    if max_rounds > 1 and min_score is None:
        raise ValueError("max_rounds > 1 resamples images below min_score: pass min_score too")
    cfg = sampling_config(pipe, **sampling)
    scorer = resolve_scorer(pipe, scorer)
    rows = [p for p in prompts for _ in range(num_images)]
    R = len(rows)
    best_codes, best_scores, best_seeds = None, torch.full((R,), -float("inf")), torch.zeros(R, dtype=torch.long)
    todo = torch.arange(R)  # output rows still to (re)sample
    for q in range(max_rounds):
        seeds = candidate_seeds(seed, R, rerank, q)[:, todo]  # (N, r)
        texts = [rows[i] for i in todo.tolist()] * rerank  # candidate-major, as seeds.flatten()
        codes = sample_rows(pipe, texts, seeds.flatten(), cfg, batch_size, **(generate_kw or {}))  # (N*r, h, w)
        scores = score_codes(pipe, scorer, codes, texts).float().reshape(rerank, len(todo))  # (N, r)
        top, k = scores.max(0)  # (r,): the first best candidate on ties
        codes = codes.reshape(rerank, len(todo), *codes.shape[1:])[k, torch.arange(len(todo))]  # (r, h, w)
        if best_codes is None:
            best_codes = codes.new_zeros((R, *codes.shape[1:]))
        better = top > best_scores[todo]
        rows_better = todo[better]
        best_codes[rows_better] = codes[better]
        best_scores[rows_better] = top[better]
        best_seeds[rows_better] = seeds[k, torch.arange(len(todo))][better]
        if min_score is None:
            break
        todo = torch.nonzero(best_scores < min_score).flatten()
        if not len(todo):
            break
    return best_codes, best_scores, best_seeds
