"""`import vqgpt` and the image tokenizer stay light: no wandb, datasets, transformers or triton."""

import subprocess
import sys

HEAVY = ["wandb", "datasets", "transformers", "triton", "tokenizers"]


def test_import_is_light_in_a_fresh_interpreter():
    code = (
        "import sys, json\n"
        "import vqgpt\n"
        "from vqgpt import ImageTokenizer\n"
        "from vqgpt.tokenizer import TokenizerConfig\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing vqgpt pulled in {out.stdout.strip()}"


def test_text_to_image_is_lazy():
    code = "import vqgpt, sys; print(vqgpt.TextToImage.__name__, 'vqgpt.pipeline' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["TextToImage", "True"]
