"""`import vqgpt` and the image tokenizer stay light: no wandb, datasets, transformers or triton, and no
huggingface_hub until a hub repo is asked for (a local save and load do without it)."""

import subprocess
import sys

HEAVY = ["wandb", "datasets", "transformers", "triton", "tokenizers"]


def test_import_is_light_in_a_fresh_interpreter():
    code = (
        "import sys, json\n"
        "import vqgpt\n"
        "from vqgpt import ImageTokenizer\n"
        "from vqgpt.tokenizer import TokenizerConfig, tokenizer_config\n"
        f"print(json.dumps([m for m in {HEAVY!r} + ['huggingface_hub'] if m in sys.modules]))\n"
        "import tempfile\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    ImageTokenizer(tokenizer_config('tiny')).save_pretrained(d)\n"
        "    ImageTokenizer.from_pretrained(d)\n"
        "print('huggingface_hub' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, hub_after_local_use = out.stdout.split()
    assert imported == "[]", f"importing vqgpt pulled in {imported}"
    assert hub_after_local_use == "False", "a local save and load imported huggingface_hub"


def test_text_to_image_is_lazy():
    code = "import vqgpt, sys; print(vqgpt.TextToImage.__name__, 'vqgpt.pipeline' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["TextToImage", "True"]
