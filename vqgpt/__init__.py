"""vqgpt: autoregressive text-to-image generation with a VQ image tokenizer and a decoder-only GPT.

`import vqgpt` stays light: it imports torch and the image tokenizer only. The text-to-image pipeline
(which needs transformers) is imported on first use of `vqgpt.TextToImage`.
"""

from ._version import __version__ as __version__
from .tokenizer import ImageTokenizer, TokenizerConfig

__all__ = ["ImageTokenizer", "TokenizerConfig", "TextToImage", "ImageTextScorer"]


def __getattr__(name: str):
    if name == "TextToImage":
        from .pipeline import TextToImage

        return TextToImage
    if name == "ImageTextScorer":
        from .lit import ImageTextScorer

        return ImageTextScorer
    raise AttributeError(f"module 'vqgpt' has no attribute {name!r}")
