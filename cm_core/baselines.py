"""Classifiers a user could train instead of prompting an LLM, fitted on exactly CM's preference samples,
and the zero-sample label-name similarity. Each is a :class:`~cm_core.methods.Method`, so CM can wrap it too.
"""
from __future__ import annotations

import warnings
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
        self._check_fitted()
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


class TrainedEmbeddingMethod(EmbeddingMethod):
    """A classifier fitted on the preference samples. CM's bank counts its answers on those same samples, and a
    classifier answering its own training rows is near-perfect, which would make the bank an identity. So its
    answers to its samples are out-of-fold: each comes from a copy fitted without that sample's fold."""

    needs_samples = True
    folds = 5

    def _fit_xy(self, X, y):
        raise NotImplementedError

    def _fit_quietly(self, X, y) -> None:
        with warnings.catch_warnings():
            # few samples per label is the normal case here (1-5 % of a dataset), not a regression problem
            warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
            self._fit_xy(X, y)

    def _fit(self, samples):
        self._fit_quietly(self.emb.encode([s.text for s in samples]), [s.label for s in samples])

    def predict_samples(self, samples, seed: int = 0):
        samples = list(samples)
        texts = [s.text for s in samples]
        if len(samples) < 2 * self.folds:  # too few to hold any fold out
            return self.predict(texts)
        from sklearn.model_selection import KFold
        X = self.emb.encode(texts)
        y = np.array([s.label for s in samples], dtype=object)
        oof: dict[int, dict[str, float]] = {}
        for fit_idx, held in KFold(self.folds, shuffle=True, random_state=seed).split(X):
            copy = self._clone()
            copy._fit_quietly(X[fit_idx], y[fit_idx].tolist())
            for i, d in zip(held, copy._dists(X[held])):
                oof[int(i)] = d
        return [_restricted(oof[i], self.labels) for i in range(len(samples))]

    def _clone(self) -> "TrainedEmbeddingMethod":
        raise NotImplementedError

    def _dists(self, X) -> list[dict[str, float]]:
        raise NotImplementedError

    def _probs(self, texts):
        return self._dists(self.emb.encode(texts))


class KNN(TrainedEmbeddingMethod):
    """k nearest preference samples by cosine, votes weighted by similarity (scikit-learn)."""

    name = "knn"

    def __init__(self, labels, embedder=None, k: int = 5):
        super().__init__(labels, embedder)
        self.k = k

    def _fit_xy(self, X, y):
        from sklearn.neighbors import KNeighborsClassifier
        self.model_ = KNeighborsClassifier(n_neighbors=min(self.k, len(y)), metric="cosine", weights="distance")
        self.model_.fit(X, y)

    def _clone(self):
        return KNN(self.labels, self.embedder, self.k)

    def _dists(self, X):
        p = self.model_.predict_proba(X)
        return [dict(zip(self.model_.classes_, row.tolist())) for row in p]


class LogReg(TrainedEmbeddingMethod):
    """Multinomial logistic regression on the embeddings (scikit-learn)."""

    name = "logreg"

    def __init__(self, labels, embedder=None, C: float = 10.0):
        super().__init__(labels, embedder)
        self.C = C

    def _fit_xy(self, X, y):
        from sklearn.linear_model import LogisticRegression
        self.single_ = y[0] if len(set(y)) == 1 else None  # sklearn needs two classes
        if self.single_ is None:
            self.model_ = LogisticRegression(C=self.C, max_iter=2000).fit(X, y)

    def _clone(self):
        return LogReg(self.labels, self.embedder, self.C)

    def _dists(self, X):
        if self.single_ is not None:
            return [{self.single_: 1.0} for _ in range(len(X))]
        p = self.model_.predict_proba(X)
        return [dict(zip(self.model_.classes_, row.tolist())) for row in p]


class SetFit(EmbeddingMethod):
    """SetFit (the ``setfit`` library): the sentence encoder fine-tuned contrastively on pairs of preference samples
    (same label / different label), then a logistic-regression head on its embeddings: what practitioners pick for
    few-shot text classification. Each fit trains its own copy of the encoder; the shared one is never touched.

    ``num_iterations`` pairs per sample and one epoch: SetFit's recipe at a budget a CPU affords per user (its
    default of 20 pairs per sample takes minutes per fit on 150+ samples). ``max_length`` 64 tokens: SetFit pads
    every training pair to the encoder's maximum otherwise (256 for MiniLM), several times the cost."""

    name = "setfit"
    needs_samples = True
    supports_cm = False  # its answers to its own training samples are near-perfect: a bank of them is an identity

    def __init__(self, labels, embedder=None, num_iterations: int = 5, epochs: int = 1, batch_size: int = 16,
                 max_length: int = 64, seed: int = 0):
        super().__init__(labels, embedder)
        self.num_iterations, self.epochs, self.batch_size, self.seed = num_iterations, epochs, batch_size, seed
        self.max_length = max_length  # tokens per text in training: the datasets' queries are short

    def _fit(self, samples):
        import contextlib
        import copy
        import io
        import tempfile

        import datasets
        from setfit import SetFitModel, Trainer, TrainingArguments
        from sklearn.linear_model import LogisticRegression
        samples = list(samples)
        labels = [s.label for s in samples]
        if len(set(labels)) < 2:  # nothing to contrast: every query gets the one label seen
            self.single_ = labels[0]
            return
        self.single_ = None
        body = copy.deepcopy(self.emb.model)  # the shared encoder stays as it is
        model = SetFitModel(model_body=body, model_head=LogisticRegression(max_iter=2000))
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, batch_size=self.batch_size, num_epochs=self.epochs,
                                     num_iterations=self.num_iterations, seed=self.seed, save_strategy="no",
                                     max_length=self.max_length,
                                     report_to="none", show_progress_bar=False, logging_strategy="no")
            train = datasets.Dataset.from_dict({"text": [s.text for s in samples], "label": labels})
            # the trainer logs its settings and metrics and torch warns about pinned memory on a CPU: library chatter
            # that would land in every report, not information about the run
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
                warnings.filterwarnings("ignore", message=".*pin_memory.*")
                Trainer(model=model, args=args, train_dataset=train).train()
        self.model_ = model

    def _probs(self, texts):
        if self.single_ is not None:
            return [{self.single_: 1.0} for _ in texts]
        p = self.model_.predict_proba(list(texts), as_numpy=True, show_progress_bar=False)
        classes = list(self.model_.model_head.classes_)
        return [dict(zip(classes, row.tolist())) for row in p]

    def predict_samples(self, samples, seed: int = 0):
        from .errors import CMError
        raise CMError("setfit answers its own training samples near-perfectly, so a CM bank over it would be an "
                      "identity; CM over SetFit (out-of-fold refits of the encoder) is not offered")
