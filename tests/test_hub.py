"""The hub round trip, offline through the real huggingface_hub: a hub cache in the library's own layout
(checked by its scan_cache_dir), loaded with HF_HUB_OFFLINE=1; model cards; errors that say what to do."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from vqgpt.generate import SamplingConfig
from vqgpt.model import GPT, gpt_config
from vqgpt.pipeline import TextToImage
from vqgpt.text import TextTokenizer
from vqgpt.tokenizer import ImageTokenizer, tokenizer_config

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...]) -> None:
    """Lay `folder` out as huggingface_hub caches a download of `repo_id` at `commit`: content-addressed
    blobs/, snapshots/<commit>/ of relative symlinks to them, and refs/<name> files holding the commit."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also where huggingface_hub read it at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def tiny_tokenizer(seed: int) -> ImageTokenizer:
    torch.manual_seed(seed)
    return ImageTokenizer(tokenizer_config("tiny", image_size=16, fsq_levels=(4, 4))).eval()


def tiny_pipeline(trained_on: dict | None = None) -> TextToImage:
    tok = tiny_tokenizer(0)
    text = TextTokenizer.train(["green apple", "red heart", "blue car"] * 5, vocab_size=300)
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
    return TextToImage(gpt.eval(), tok, text, SamplingConfig(cfg_scale=2.0, top_k=8), trained_on=trained_on)


def test_tokenizer_from_the_hub_cache_by_revision(tmp_path, offline):
    for name, seed in (("a", 1), ("b", 2)):
        tiny_tokenizer(seed).save_pretrained(tmp_path / name)
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "vqgpt-test/tok", tmp_path / "a", COMMIT_A, refs=("v1",))
    put_in_hub_cache(cache, "vqgpt-test/tok", tmp_path / "b", COMMIT_B, refs=("main",))
    (repo,) = huggingface_hub.scan_cache_dir(cache).repos  # the library reads the layout as its own
    assert repo.repo_id == "vqgpt-test/tok" and {r.commit_hash for r in repo.revisions} == {COMMIT_A, COMMIT_B}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "v1"}

    want_a, want_b = tiny_tokenizer(1).fingerprint(), tiny_tokenizer(2).fingerprint()
    assert want_a != want_b
    assert ImageTokenizer.from_pretrained("vqgpt-test/tok", cache_dir=cache).fingerprint() == want_b
    assert ImageTokenizer.from_pretrained("vqgpt-test/tok", cache_dir=cache, revision="v1").fingerprint() == want_a
    by_commit = ImageTokenizer.from_pretrained("vqgpt-test/tok", cache_dir=cache, revision=COMMIT_A, token="hf_x")
    assert by_commit.fingerprint() == want_a
    with pytest.raises(FileNotFoundError, match=r"at revision 'v2' is not in the hub cache and HF_HUB_OFFLINE"):
        ImageTokenizer.from_pretrained("vqgpt-test/tok", cache_dir=cache, revision="v2")


def test_pipeline_from_the_hub_cache_runs_its_card_snippet(tmp_path, offline, monkeypatch):
    pipe = tiny_pipeline({"data": "openmoji", "include": None, "exclude": "skin tone", "limit": None})
    pipe.save_pretrained(tmp_path / "t2i", repo_id="vqgpt-test/t2i")
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "vqgpt-test/t2i", tmp_path / "t2i", COMMIT_A, refs=("main",))
    loaded = TextToImage.from_pretrained("vqgpt-test/t2i", cache_dir=cache)
    codes = pipe.generate_codes(["green apple"], 2, seed=3)
    assert torch.equal(loaded.generate_codes(["green apple"], 2, seed=3), codes)
    assert loaded.trained_on["exclude"] == "skin tone" and loaded.sampling == pipe.sampling

    card = (tmp_path / "t2i" / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    assert 'from_pretrained("vqgpt-test/t2i")' in snippet
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # the snippet passes no cache_dir
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})  # the card's usage snippet, as written, against the hub cache
    assert (tmp_path / "sample.png").is_file()


def test_model_card_metadata_and_config_versions(tmp_path):
    pipe = tiny_pipeline({"data": "openmoji", "include": None, "exclude": None, "limit": None})
    pipe.save_pretrained(tmp_path / "t2i")
    card = huggingface_hub.ModelCard.load(tmp_path / "t2i" / "README.md")  # the hub's own card parser
    assert card.data.license == "cc-by-sa-4.0" and card.data.library_name == "vqgpt"
    assert card.data.pipeline_tag == "text-to-image"
    assert "OpenMoji" in card.text and "CC BY-SA 4.0" in card.text
    assert "| `cfg_scale` | 2.0 |" in card.text and "| `top_k` | 8 |" in card.text  # the sampling defaults
    assert "Not evaluated yet" in card.text
    assert not (tmp_path / "t2i" / "image_tokenizer" / "README.md").exists()  # one card per repo
    config = json.loads((tmp_path / "t2i" / "config.json").read_text())
    from importlib.metadata import version

    import vqgpt

    assert config["versions"]["vqgpt"] == vqgpt.__version__
    assert config["versions"]["vector-quantize-pytorch"] == version("vector-quantize-pytorch")
    tok_config = json.loads((tmp_path / "t2i" / "image_tokenizer" / "config.json").read_text())
    assert tok_config["versions"]["vector-quantize-pytorch"] == version("vector-quantize-pytorch")

    for f in (tmp_path / "t2i" / "config.json", tmp_path / "t2i" / "image_tokenizer" / "config.json"):
        old = json.loads(f.read_text())  # as written before versions were recorded
        del old["versions"]
        f.write_text(json.dumps(old))
    old_loaded = TextToImage.from_pretrained(tmp_path / "t2i")
    assert old_loaded.image_tokenizer.fingerprint() == pipe.image_tokenizer.fingerprint()

    tiny_pipeline({"data": "shapes"}).save_pretrained(tmp_path / "shapes")
    assert huggingface_hub.ModelCard.load(tmp_path / "shapes" / "README.md").data.license == "mit"
    tiny_pipeline({"data": "someone/photos"}).save_pretrained(tmp_path / "hubdata")
    data = huggingface_hub.ModelCard.load(tmp_path / "hubdata" / "README.md").data
    assert data.license == "other" and data.datasets == ["someone/photos"]
    tok = tiny_tokenizer(0)
    tok.trained_on = {"data": "openmoji"}
    tok.save_pretrained(tmp_path / "tok")
    tok_card = huggingface_hub.ModelCard.load(tmp_path / "tok" / "README.md")
    assert tok_card.data.license == "cc-by-sa-4.0" and "ImageTokenizer.from_pretrained" in tok_card.text
    assert ImageTokenizer.from_pretrained(tmp_path / "tok").trained_on == {"data": "openmoji"}


def test_recorded_evaluations_reach_config_and_card(tmp_path):
    from vqgpt.records import record_evaluation

    tiny_pipeline({"data": "openmoji"}).save_pretrained(tmp_path / "t2i")
    result = {"recall": 0.9375, "hits": 15, "n": 16, "prompts": ["a", "b"], "sampling": {"cfg_scale": 1.0}}
    record_evaluation(tmp_path / "t2i", "recall", result, "python -m vqgpt.eval recall --ckpt runs/t2i")
    saved = json.loads((tmp_path / "t2i" / "config.json").read_text())["evaluation"]["recall"]
    assert saved["figures"] == {"recall": 0.9375, "hits": 15, "n": 16, "sampling.cfg_scale": 1.0}
    card = (tmp_path / "t2i" / "README.md").read_text()
    assert "| recall | `recall` | 0.9375 |" in card and "python -m vqgpt.eval recall --ckpt runs/t2i" in card
    pipe = TextToImage.from_pretrained(tmp_path / "t2i")
    assert pipe.evaluation["recall"]["figures"]["recall"] == 0.9375
    pipe.save_pretrained(tmp_path / "again")  # the figures travel with the model
    assert "| recall | `recall` | 0.9375 |" in (tmp_path / "again" / "README.md").read_text()


def test_missing_or_unreachable_repos_are_one_line_errors(tmp_path, offline, monkeypatch):
    with pytest.raises(
        FileNotFoundError,
        match=r"'nobody/absent' is not in the hub cache and HF_HUB_OFFLINE is set: "
        r"unset it to download the repo, or pass a local directory",
    ) as e:
        TextToImage.from_pretrained("nobody/absent", cache_dir=tmp_path / "hub")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(
        FileNotFoundError,
        match=r"cannot reach the hub \(http://127.0.0.1:9\) for tokenizer "
        r"'nobody/absent', and it is not in the cache",
    ) as e:
        ImageTokenizer.from_pretrained("nobody/absent", cache_dir=tmp_path / "hub")
    assert "\n" not in str(e.value)
    with pytest.raises(
        OSError,
        match=r"could not push to the hub repo 'nobody/t2i' at http://127.0.0.1:9 .*"
        r"`hf auth login`",
    ) as e:
        tiny_tokenizer(0).push_to_hub("nobody/t2i", token="hf_x")
    assert "\n" not in str(e.value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="a local path: the hub was not asked"):
        TextToImage.from_pretrained("runs/t2i")  # `runs/` exists here: never a repo id
    with pytest.raises(ValueError, match="revision='v1' selects a version of a hub repo"):
        ImageTokenizer.from_pretrained(tmp_path / "runs", revision="v1")
