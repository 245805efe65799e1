"""Classifiers a user could train instead of prompting an LLM, fitted on exactly CM's preference samples,
and the zero-sample label-name similarity. Each is a :class:`~cm_core.methods.Method`, so CM can wrap it too.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .embeddings import get_embedder
from .methods import Method, Prediction, softmax


def _restricted(probs: dict[str, float], cands: Sequence[str]) -> Prediction:
    """Best label among ``cands`` and the distribution renormalized over them."""
    sub = {c: probs.get(c, 0.0) for c in cands}
    total = sum(sub.values())
    if total > 0:
        sub = {k: v / total for k, v in sub.items()}
    else:
        sub = {k: 1.0 / len(cands) for k in cands}
    return Prediction(max(cands, key=lambda c: (sub[c], -list(cands).index(c))), sub)


class EmbeddingMethod(Method):
    def __init__(self, labels: Sequence[str], embedder=None):
        self.labels = list(labels)
        self.embedder = embedder

    @property
    def emb(self):
        if self.embedder is None:
            self.embedder = get_embedder()
        return self.embedder

    def _probs(self, texts: Sequence[str]) -> list[dict[str, float]]:
        raise NotImplementedError

    def predict(self, texts, candidates=None):
        dists = self._probs(texts)
        if candidates is None:
            return [_restricted(d, self.labels) for d in dists]
        return [_restricted(d, c) for d, c in zip(dists, candidates)]


class LabelSimilarity(EmbeddingMethod):
    """Cosine similarity of the query to each label's name; needs no samples at all."""

    name = "label_similarity"

    def __init__(self, labels, embedder=None, temperature: float = 0.05):
        super().__init__(labels, embedder)
        self.temperature = temperature

    def _probs(self, texts):
        sims = self.emb.encode(texts) @ self.emb.encode(self.labels).T
        return [dict(zip(self.labels, softmax(row, self.temperature).tolist())) for row in sims]


class KNN(EmbeddingMethod):
    """k nearest preference samples by cosine, votes weighted by similarity (scikit-learn)."""

    name = "knn"

    def __init__(self, labels, embedder=None, k: int = 5):
        super().__init__(labels, embedder)
        self.k = k

    def fit(self, samples):
        from sklearn.neighbors import KNeighborsClassifier
        samples = list(samples)
        self.model_ = KNeighborsClassifier(n_neighbors=min(self.k, len(samples)), metric="cosine", weights="distance")
        self.model_.fit(self.emb.encode([s.text for s in samples]), [s.label for s in samples])
        return self

    def _probs(self, texts):
        p = self.model_.predict_proba(self.emb.encode(texts))
        return [dict(zip(self.model_.classes_, row.tolist())) for row in p]


class LogReg(EmbeddingMethod):
    """Multinomial logistic regression on the embeddings (scikit-learn)."""

    name = "logreg"

    def __init__(self, labels, embedder=None, C: float = 10.0):
        super().__init__(labels, embedder)
        self.C = C

    def fit(self, samples):
        from sklearn.linear_model import LogisticRegression
        samples = list(samples)
        y = [s.label for s in samples]
        X = self.emb.encode([s.text for s in samples])
        self.single_ = y[0] if len(set(y)) == 1 else None  # sklearn needs two classes
        if self.single_ is None:
            self.model_ = LogisticRegression(C=self.C, max_iter=2000).fit(X, y)
        return self

    def _probs(self, texts):
        if self.single_ is not None:
            return [{self.single_: 1.0} for _ in texts]
        p = self.model_.predict_proba(self.emb.encode(texts))
        return [dict(zip(self.model_.classes_, row.tolist())) for row in p]
