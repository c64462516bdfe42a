"""The feedback loop at sampling: draw N candidates per requested image, score them, keep the best.

DALL-E (Ramesh et al. 2021) and minDALL-E rerank their samples with CLIP. vqgpt scores with the LiT scorer
trained against its own image tokenizer (`vqgpt/lit.py`), or without any second model with the GPT's own
evidence for the caption, log p(x | caption) - log p(x | null caption) (the two rows classifier-free guidance
already runs; here teacher-forced over the sampled codes). `min_score` and `max_rounds` resample the images
still below a score: the founding documents' "regenerate until it meets the criterion".

    codes, scores, seeds = rerank_codes(pipe, ["a red circle"], 4, seed=0, rerank=8, scorer=scorer)

Seeds: output row r has the seed plain sampling gives it, seed + r; its candidate k of round q is drawn with
seed + r + (q * N + k) * CANDIDATE_STRIDE (mod 2**62). So candidate 0 of round 0 is the plain sample (rerank=1 is plain
sampling), candidates never share a seed with another row's (fewer than 2**40 rows), the images depend neither
on the batch nor on how the rows are split into calls, and `seeds[r]` alone redraws the chosen image:
pipe(prompt, seed=seeds[r]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .seeds import SEED_LIMIT

SELF = "self"  # scorer="self": the GPT's own evidence for the caption, no second model
CANDIDATE_STRIDE = 2**40  # seed distance between a row's candidates
MAX_CANDIDATES = 4096  # per image, all rounds: candidate seeds stay apart below SEED_LIMIT = 2**62


def candidate_seeds(row_seeds: list[int], rerank: int, round_: int = 0) -> torch.Tensor:
    """LongTensor (rerank, rows): the seed of candidate k of each output row in round `round_` (module doc)."""
    k = torch.arange(rerank, dtype=torch.long)[:, None] + round_ * rerank
    return (torch.tensor(row_seeds, dtype=torch.long)[None, :] + k * CANDIDATE_STRIDE) % SEED_LIMIT


@torch.no_grad()
def self_scores(pipe, codes: torch.Tensor, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(N,) log p(codes | text) - log p(codes | null caption) in nats, teacher-forced at temperature 1."""
    gpt, out = pipe.gpt, []
    was = gpt.training
    gpt.eval()
    device = gpt.head.weight.device
    for i in range(0, len(texts), batch_size):
        c = codes[i : i + batch_size].flatten(1).to(device)  # (b, h*w)
        ids = pipe.text_tokenizer(texts[i : i + batch_size], gpt.config.text_len).to(device)
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
            raise ValueError(
                f"scorer must be an ImageTextScorer, a directory of one, or 'self'; got {type(scorer).__name__}"
            )
        scorer.check_image_tokenizer(pipe.image_tokenizer)
    return scorer


def score_codes(pipe, scorer, codes: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """(N,) agreement of each code grid with its text: higher is better, whichever the scorer."""
    if scorer == SELF:
        return self_scores(pipe, codes, texts)
    return scorer.score_codes(codes, texts)


def rerank_codes(
    pipe,
    prompts: str | list[str],
    num_images: int = 1,
    *,
    seed: int | list[int] = 0,
    rerank: int = 8,
    scorer=None,
    min_score: float | None = None,
    max_rounds: int = 1,
    batch_size: int = 64,
    negative_prompt: str | list[str] | None = None,
    **kw,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(codes (R, h, w), scores (R,), seeds) for R = len(prompts) * num_images rows, prompt-major: each row the
    best of `rerank` candidates, all drawn in one call of `pipe.generate_codes` (batch_size rows at a time).
    seed: an int (row r's plain seed is seed + r) or one seed per row, as for the pipeline. With min_score,
    rows whose best is still below it get `rerank` fresh candidates again, up to max_rounds rounds in all; a row
    keeps its best candidate so far. kw: sampling settings and generate_codes' options (compile, progress)."""
    from .seeds import _text_list, image_seeds, negative_rows

    prompts = _text_list(prompts, "prompts")
    for name, value in (("rerank", rerank), ("max_rounds", max_rounds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if rerank * max_rounds > MAX_CANDIDATES:
        raise ValueError(f"rerank x max_rounds = {rerank * max_rounds} candidates per image; at most {MAX_CANDIDATES}")
    if max_rounds > 1 and min_score is None:
        raise ValueError("max_rounds > 1 resamples the images below min_score: pass min_score too")
    scorer = resolve_scorer(pipe, scorer)
    rows = [p for p in prompts for _ in range(num_images)]
    negatives = negative_rows(negative_prompt, len(prompts), num_images)
    R = len(rows)
    row_seeds = image_seeds(seed, None, R)
    best_codes, best_scores, best_seeds = None, torch.full((R,), -float("inf")), list(row_seeds)
    todo = torch.arange(R)  # output rows still to (re)sample
    for q in range(max_rounds):
        seeds = candidate_seeds(row_seeds, rerank, q)[:, todo]  # (N, r)
        texts = [rows[i] for i in todo.tolist()] * rerank  # candidate-major, as seeds.flatten()
        neg = None if negatives is None else [negatives[i] for i in todo.tolist()] * rerank
        codes = pipe.generate_codes(
            texts, 1, seeds.flatten().tolist(), batch_size=batch_size, negative_prompt=neg, **kw
        ).cpu()  # (N * r, h, w)
        scores = score_codes(pipe, scorer, codes, texts).float().reshape(rerank, len(todo))  # (N, r)
        top, k = scores.max(0)  # (r,): the first best candidate on ties
        pick = torch.arange(len(todo))
        codes = codes.reshape(rerank, len(todo), *codes.shape[1:])[k, pick]  # (r, h, w)
        if best_codes is None:
            best_codes = codes.new_zeros((R, *codes.shape[1:]))
        better = top > best_scores[todo]
        best_codes[todo[better]] = codes[better]
        best_scores[todo[better]] = top[better]
        for row, s in zip(todo[better].tolist(), seeds[k, pick][better].tolist()):
            best_seeds[row] = s
        if min_score is None:
            break
        todo = torch.nonzero(best_scores < min_score).flatten()
        if not len(todo):
            break
    return best_codes, best_scores, best_seeds
