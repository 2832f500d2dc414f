"""Text generation from a trained model: ``generate`` (batched, cached decoding with greedy / temperature / top-p
sampling), ``load_for_generation`` (a run directory, checkpoint, exported Hugging Face directory or .pt file, with
its tokenizer) and the ``attnres-generate`` command (``cli.py``)."""

from .loading import LoadedModel, load_for_generation
from .sampling import GenerationError, SamplingConfig, generate, next_tokens

__all__ = ["GenerationError", "LoadedModel", "SamplingConfig", "generate", "load_for_generation", "next_tokens"]
