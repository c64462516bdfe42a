"""LiT: the scorer trained by `train.py lit` against the locked image tokenizer, reranking, the unsaid captions."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqgpt import data as vdata
from vqgpt.lit import ImageTextScorer, LiTConfig, lit_config, retrieval_recall
from vqgpt.metrics import data_entropy, entropy
from vqgpt.rerank import rerank_codes, self_scores
from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the script, run in this process: no interpreter start-up per stage)

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40)}
LIT = [
    "--batch-size",
    "16",
    "--eval-every",
    "1000",
    "--log-every",
    "10",
    "--device",
    "cpu",
    "--lr",
    "3e-3",
    "--text-vocab",
    "300",
    "--wandb",
    "disabled",
]


def _tokenizer(seed: int) -> ImageTokenizer:
    torch.manual_seed(seed)  # untrained: a locked tower needs no training to be locked
    return ImageTokenizer(tokenizer_config("tiny", fsq_levels=(5, 4, 3))).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder of 48 captioned 32x32 squares (4 colours x left/right), a tokenizer, and a scorer trained on them."""
    root = tmp_path_factory.mktemp("lit")
    folder = root / "folder"
    folder.mkdir()
    lines = []
    for i in range(48):
        name, rgb = list(COLORS.items())[i % 4]
        side = "left" if (i // 4) % 2 == 0 else "right"
        im = Image.new("RGB", (32, 32), "white")
        x0 = 2 + (i % 3) if side == "left" else 16 + (i % 3)
        im.paste(rgb, (x0, 8 + (i % 5), x0 + 12, 20 + (i % 5)))
        im.save(folder / f"img{i:02d}.png")
        lines.append(json.dumps({"file_name": f"img{i:02d}.png", "text": f"a {name} square on the {side}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    tok = _tokenizer(0)
    tok.save_pretrained(root / "tok")
    mp = pytest.MonkeyPatch()
    mp.setenv("VQGPT_CACHE", str(root / "cache"))
    train.main(
        [
            "lit",
            "--data",
            str(folder),
            "--tokenizer",
            str(root / "tok"),
            "--out",
            str(root / "lit"),
            "--steps",
            "60",
            *LIT,
        ]
    )
    yield root, folder, tok
    mp.undo()


def _pairs(folder: Path, tok: ImageTokenizer):
    images, captions = vdata.load_image_tensors(str(folder), "train", 32)
    return tok.encode(images.float() / 255), captions


def test_train_lit_locks_the_image_tower_and_the_loss_falls(setup):
    root, folder, tok = setup
    scorer = ImageTextScorer.from_pretrained(root / "lit")
    # the image tower is exactly the tokenizer it was given, and no checkpoint holds (or trained) its weights
    saved = scorer.image_tokenizer.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in tok.state_dict().items())
    assert scorer.image_tokenizer.fingerprint() == tok.fingerprint()
    from safetensors.torch import load_file

    for weights in [root / "lit" / "model.safetensors", *(root / "lit" / "checkpoints").glob("*/model.safetensors")]:
        assert not any(k.startswith(("image_tokenizer", "encoder", "decoder")) for k in load_file(str(weights)))
    assert not any(p is q for p in scorer.parameters() for q in scorer.image_tokenizer.parameters())
    # the loss falls: the trained text tower against the same model at its initial (seeded) weights
    codes, captions = _pairs(folder, tok)
    torch.manual_seed(0)
    fresh = ImageTextScorer(scorer.config, scorer.image_tokenizer, scorer.text_tokenizer)
    ids = scorer.text_ids(captions)
    with torch.no_grad():
        before, after = fresh.loss(ids, codes)[0].item(), scorer.loss(ids, codes)[0].item()
    assert after < 0.7 * before, (before, after)
    sim = scorer.similarity_codes(codes, captions)
    assert retrieval_recall(sim, captions, captions)["retrieval_r1"] >= 0.5


def test_resume_continues_exactly(setup, tmp_path, monkeypatch):
    root, folder, _ = setup
    monkeypatch.setenv("VQGPT_CACHE", str(root / "cache"))
    from safetensors.torch import load_file

    run = tmp_path / "run"
    args = ["lit", "--data", str(folder), "--tokenizer", str(root / "tok"), *LIT, "--save-every", "10", "--steps", "20"]
    train.main([*args, "--out", str(run)])
    final = load_file(str(run / "model.safetensors"))
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000020")  # as if it had been stopped after step 10's checkpoint
    train.main([*args, "--resume", str(run)])
    again = load_file(str(run / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


def test_scores_are_batch_independent(setup):
    root, folder, tok = setup
    scorer = ImageTextScorer.from_pretrained(root / "lit")
    images, captions = vdata.load_image_tensors(str(folder), "train", 32)
    x, texts = images[:9].float() / 255, captions[:9][::-1]  # mismatched pairs too
    whole = scorer(x, texts)
    alone = torch.cat([scorer(x[i : i + 1], texts[i : i + 1]) for i in range(9)])
    chunked = scorer.score_codes(tok.encode(x), texts, batch_size=4)
    assert whole.shape == (9,) and torch.allclose(whole, alone, atol=1e-5) and torch.allclose(whole, chunked, atol=1e-5)
    sim = scorer.similarity_codes(tok.encode(x), texts)  # (9, 9): its diagonal is the paired score
    assert torch.allclose(sim.diagonal(), whole, atol=1e-5)


def _pipeline(tok: ImageTokenizer, scorer: ImageTextScorer):
    from vqgpt.generate import SamplingConfig
    from vqgpt.model import GPT, gpt_config
    from vqgpt.pipeline import TextToImage

    text_tok = scorer.text_tokenizer
    torch.manual_seed(1)
    gpt = GPT(
        gpt_config(
            "tiny",
            text_vocab_size=text_tok.vocab_size,
            text_pad_id=text_tok.pad_id,
            text_len=8,
            image_vocab_size=tok.codebook_size,
            image_grid=(tok.grid_size, tok.grid_size),
        )
    ).eval()
    return TextToImage(gpt, tok, text_tok, SamplingConfig(cfg_scale=1.5))


PROMPTS = ["a red square on the left", "a blue square on the right"]


def test_rerank_one_is_plain_sampling_and_seeds_reproduce(setup):
    root, _, tok = setup
    scorer = ImageTextScorer.from_pretrained(root / "lit")
    pipe = _pipeline(tok, scorer)
    plain = pipe.generate_codes(PROMPTS, 3, seed=5)
    for which in (scorer, "self"):
        codes, scores, seeds = rerank_codes(pipe, PROMPTS, 3, seed=5, rerank=1, scorer=which)
        assert torch.equal(codes, plain) and seeds == list(range(5, 11))
    codes, scores, seeds = rerank_codes(pipe, PROMPTS, 3, seed=5, rerank=4, scorer=scorer, batch_size=5)
    again, scores2, _ = rerank_codes(pipe, PROMPTS, 3, seed=5, rerank=4, scorer=scorer)
    assert torch.equal(codes, again) and torch.allclose(scores, scores2, atol=1e-6)  # batch size changes nothing
    rows = [p for p in PROMPTS for _ in range(3)]
    assert torch.all(scores >= scorer.score_codes(plain, rows) - 1e-6)  # the best of 4 includes the plain one
    for r in range(6):  # each chosen seed alone redraws its image
        assert torch.equal(pipe.generate_codes([rows[r]], 1, seed=int(seeds[r]))[0], codes[r])
    # resampling rounds: below an unreachable score every round runs, and a row's best only improves
    more, more_scores, _ = rerank_codes(pipe, PROMPTS, 3, seed=5, rerank=4, scorer=scorer, min_score=2.0, max_rounds=3)
    assert torch.all(more_scores >= scores - 1e-6) and not torch.equal(more_scores, scores)
    # the self score is the GPT's evidence for the caption: it is higher for the caption than for the null one
    ev = self_scores(pipe, codes, rows)
    assert ev.shape == (6,) and torch.isfinite(ev).all()


def test_a_scorer_of_another_image_tokenizer_is_refused(setup):
    root, _, _ = setup
    scorer = ImageTextScorer.from_pretrained(root / "lit")
    pipe = _pipeline(_tokenizer(7), scorer)
    with pytest.raises(ValueError, match="trained on image tokenizer .* but the pipeline uses"):
        rerank_codes(pipe, PROMPTS, 1, rerank=2, scorer=scorer)
    with pytest.raises(ValueError, match="trained on image tokenizer"):
        pipe(PROMPTS, rerank=2, scorer=scorer)
    with pytest.raises(ValueError, match="rerank must be an int >= 1"):
        rerank_codes(pipe, PROMPTS, 1, rerank=0, scorer="self")


def test_pipeline_call_reranks_and_carries_its_scorer(setup, tmp_path):
    root, _, tok = setup
    scorer = ImageTextScorer.from_pretrained(root / "lit")
    pipe = _pipeline(tok, scorer)
    plain = pipe(PROMPTS, num_images=2, seed=3, output_type="pt")
    same = pipe(PROMPTS, num_images=2, seed=3, output_type="pt", rerank=1, scorer=scorer)
    assert torch.equal(plain.images, same.images) and same.seeds == plain.seeds and len(same.scores) == 4
    best = pipe(PROMPTS, num_images=2, seed=3, output_type="pt", rerank=3, scorer=scorer)
    assert all(b >= s - 1e-6 for b, s in zip(best.scores, same.scores))
    redraw = pipe(best.prompts[1], seed=best.seeds[1], output_type="pt")  # a chosen image's seed redraws it
    assert torch.allclose(redraw.images[0], best.images[1], atol=1 / 255)  # the decoder rounds by batch size
    pipe.scorer = scorer
    pipe.save_pretrained(tmp_path / "t2i")
    from vqgpt.pipeline import TextToImage

    loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    assert loaded.scorer is not None and loaded.scorer.config == scorer.config
    again = loaded(PROMPTS, num_images=2, seed=3, output_type="pt", rerank=3)  # the saved scorer is the default
    assert torch.equal(again.images, best.images) and again.scores == pytest.approx(best.scores, abs=1e-6)


def test_saved_scorer_checks_its_files(setup, tmp_path):
    root, _, tok = setup
    with pytest.raises(FileNotFoundError, match="not an ImageTextScorer"):
        ImageTextScorer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown readout"):
        LiTConfig(readout="pooled")
    scorer = ImageTextScorer.from_pretrained(root / "lit")
    head = ImageTextScorer(
        lit_config(tok, scorer.text_tokenizer, head="mlp", readout="latent"), tok, scorer.text_tokenizer
    )
    head.save_pretrained(tmp_path / "head")
    back = ImageTextScorer.from_pretrained(tmp_path / "head")
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(back(x, PROMPTS + [""]), head(x, PROMPTS + [""]), atol=1e-6)
    _tokenizer(7).save_pretrained(tmp_path / "head" / "image_tokenizer")  # a swapped tower is noticed
    with pytest.raises(ValueError, match="not the image tokenizer this scorer was trained with"):
        ImageTextScorer.from_pretrained(tmp_path / "head")


def test_shapes_captions_leave_attributes_unsaid():
    specs = vdata.shapes_split_specs("train", limit=4000)
    rng = random.Random("shapes-unsaid-0")  # the stream _shapes_rows draws from
    unsaid = [vdata.draw_unsaid(rng) for _ in specs]
    share = sum(bool(u) for u in unsaid) / len(unsaid)
    assert abs(share - vdata.UNSAID_PROB) < 0.03
    assert {a for u in unsaid for a in u} == set(vdata.UNSAID_ATTRS)  # the shape is always said
    for spec, u in zip(specs[:200], unsaid):
        said = vdata.parse_partial_caption(vdata.shape_caption(spec, u))
        assert set(said) == set(vdata._ATTRS) - set(u) and all(getattr(spec, k) == v for k, v in said.items())
    assert vdata.shape_caption(specs[0], ("size", "position", "background")) == f"a {specs[0].color} {specs[0].shape}"
    with pytest.raises(ValueError, match="not a shapes caption"):
        vdata.parse_partial_caption("a red")


def test_entropy_of_unsaid_attributes():
    assert entropy(["a", "b"] * 50) == pytest.approx(0.6931, abs=1e-4)
    assert entropy(["a"] * 10) == 0 and entropy(["a"] * 10, miller_madow=True) == 0
    assert entropy(["a", "b"], miller_madow=True) == pytest.approx(0.6931 + 0.25, abs=1e-4)
    train_specs = [s for s in vdata.all_specs() if not vdata.is_held_out(s)]
    h = data_entropy({"shape": "circle", "color": "red"}, "size", train_specs)
    assert 0.6 < h <= 0.6932  # two sizes, nearly balanced among the training combinations


def test_sample_script_reranks_and_refuses_a_foreign_scorer(setup, tmp_path, capsys):
    import sample

    root, _, tok = setup
    scorer = ImageTextScorer.from_pretrained(root / "lit")
    _pipeline(tok, scorer).save_pretrained(tmp_path / "t2i")
    sample.main(
        [
            "--ckpt",
            str(tmp_path / "t2i"),
            "--prompt",
            PROMPTS[0],
            "--n",
            "2",
            "--rerank",
            "3",
            "--scorer",
            str(root / "lit"),
            "--out",
            str(tmp_path / "grid.png"),
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert printed.count("score ") == 2 and (tmp_path / "grid.png").is_file()
    other = ImageTextScorer(scorer.config, _tokenizer(7), scorer.text_tokenizer)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit) as exit_:
        sample.main(
            [
                "--ckpt",
                str(tmp_path / "t2i"),
                "--prompt",
                PROMPTS[0],
                "--rerank",
                "2",
                "--scorer",
                str(tmp_path / "other"),
                "--out",
                str(tmp_path / "g2.png"),
                "--device",
                "cpu",
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: the scorer was trained on image tokenizer")
    assert "Traceback" not in err


def _batch(scorer, captions, n=6):
    """n distinct captions and random code grids of the scorer's tokenizer."""
    g, V = scorer.config.grid_size, scorer.config.codebook_size
    return scorer.text_ids(captions[:n]), torch.randint(0, V, (n, g, g), generator=torch.Generator().manual_seed(0))


def test_hard_negatives_and_ignored_pairs_enter_the_loss(setup):
    root, _, _ = setup
    scorer = ImageTextScorer.from_pretrained(root / "lit")
    captions = [f"a {c} square on the {s}" for c in COLORS for s in ("left", "right")]
    ids, codes = _batch(scorer, captions)
    with torch.no_grad():
        plain = scorer.loss(ids, codes)[0]
        # every pair but the true one left out: each softmax holds its positive alone, so the loss is 0
        alone = scorer.loss(ids, codes, ignore=~torch.eye(6, dtype=torch.bool))[0]
        assert torch.isfinite(alone) and alone.item() == pytest.approx(0.0, abs=1e-6)
        assert scorer.loss(ids, codes, ignore=torch.zeros(6, 6, dtype=torch.bool))[0].item() == pytest.approx(
            plain.item(), abs=1e-6
        )
        # extra captions for each image only add terms to its softmax: the loss rises, and stays finite
        negatives = scorer.text_ids([captions[(i + 1) % 8] for i in range(6) for _ in range(2)]).reshape(6, 2, -1)
        hard = scorer.loss(ids, codes, negative_ids=negatives)[0]
        assert torch.isfinite(hard) and hard.item() > plain.item()


def test_conv_head_scores_batch_independently_and_round_trips(setup, tmp_path):
    root, _, tok = setup
    text_tok = ImageTextScorer.from_pretrained(root / "lit").text_tokenizer
    torch.manual_seed(0)
    conv = ImageTextScorer(
        lit_config(tok, text_tok, head="conv", readout="latent", head_width=8, head_layers=2), tok, text_tok
    )
    assert conv.config.embed_dim == conv.config.head_dim
    assert not any(p is q for p in conv.parameters() for q in tok.parameters())
    x = torch.rand(5, 3, 32, 32)
    texts = (PROMPTS * 3)[:5]
    whole = conv(x, texts)
    alone = torch.cat([conv(x[i : i + 1], texts[i : i + 1]) for i in range(5)])
    assert whole.shape == (5,) and torch.allclose(whole, alone, atol=1e-5)
    conv.save_pretrained(tmp_path / "conv")
    back = ImageTextScorer.from_pretrained(tmp_path / "conv")
    assert back.config == conv.config and torch.allclose(back(x, texts), whole, atol=1e-6)
    loss, _ = conv.loss(*_batch(conv, [f"a {c} square on the {s}" for c in COLORS for s in ("left", "right")]))
    loss.backward()  # the head learns; the locked tower gets no gradient
    assert conv.head.proj.weight.grad is not None and all(p.grad is None for p in tok.parameters())
    with pytest.raises(ValueError, match="head_layers"):
        LiTConfig(head="conv", head_layers=0)
