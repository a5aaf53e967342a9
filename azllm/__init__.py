"""azllm: build a language model from scratch for a low-resource language (Azerbaijani first)."""

from azllm.errors import AzllmError

__version__ = "0.1.0"
__all__ = ["AzllmError", "__version__"]
