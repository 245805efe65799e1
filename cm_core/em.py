"""The soft form's p(y'|ŷ) fitted by maximum likelihood (EM) on the base's whole p(ŷ|x_i), not counted from one
sampled answer per preference sample.

The soft form models the user's label as p(y*|x) = Σ_ŷ p(y*|ŷ) p(ŷ|x). The counted bank keeps one answer drawn
from each sample's p(ŷ|x_i) and throws the rest away; with a weak model (its top answer right one time in five)
that draw is mostly noise, and a bank of 1-5 % of a dataset cannot average it out. Here p(y'|ŷ) is the maximum
a posteriori estimate of that very model on the samples: each sample's label explained by the base's full
distribution over its answers. Which answer ŷ stood for the label is the latent variable, so EM finds it (as
Dawid and Skene estimate a labeller's confusion matrix).

Each row has a Dirichlet prior: ``alpha`` on keeping ŷ (only where ŷ is one of the user's labels, as in
:mod:`cm_core.shrink`) plus ``EPS`` on every label, so that a row the samples barely touch stays near "keep ŷ",
or near uniform where there is nothing to keep. ``alpha`` is chosen by K-fold cross-validated likelihood of the
samples' labels with shrink's standard-error rule (the largest ``alpha`` within two standard errors of the best).
Pure functions over plain data and numpy.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .shrink import ALPHAS, FLOOR, SE_RULE, se_rule

EPS = 0.01  # prior pseudo-count on each (answer, label) cell
FOLDS = 5
MAX_ITER = 500
TOL = 1e-7  # stop when the mean log-likelihood per sample gains less than this
KEEP_FROM = 1e-4  # conditional probabilities below this are dropped from the stored rows


def _matrices(sample_probs: Sequence[Mapping[str, float]], sample_labels: Sequence[str], labels: Sequence[str]):
    responses = sorted({r for p in sample_probs for r in p})
    col = {r: j for j, r in enumerate(responses)}
    P = np.zeros((len(sample_probs), len(responses)))
    for i, p in enumerate(sample_probs):
        for r, v in p.items():
            P[i, col[r]] = v
    P /= np.maximum(P.sum(1, keepdims=True), 1e-300)
    index = {y: k for k, y in enumerate(labels)}
    Y = np.array([index[y] for y in sample_labels], dtype=int)
    keep = np.array([index.get(r, -1) for r in responses])  # the label each answer keeps, -1: none
    return responses, P, Y, keep


def _prior(keep: np.ndarray, n_labels: int, alpha: float) -> np.ndarray:
    prior = np.full((len(keep), n_labels), EPS)
    rows = np.flatnonzero(keep >= 0)
    prior[rows, keep[rows]] += alpha
    return prior


def fit_transition(P: np.ndarray, Y: np.ndarray, keep: np.ndarray, n_labels: int, alpha: float) -> np.ndarray:
    """M[ŷ, y'] = p(y'|ŷ), the MAP estimate by EM. ``P``: samples × answers, p(ŷ|x_i); ``Y``: each sample's label
    index; ``keep``: the label index each answer keeps (-1: none)."""
    prior = _prior(keep, n_labels, alpha)
    M = prior / prior.sum(1, keepdims=True)
    last = -np.inf
    for _ in range(MAX_ITER):
        joint = P * M[:, Y].T  # p(ŷ|x_i) p(y_i|ŷ): samples × answers
        lik = np.maximum(joint.sum(1, keepdims=True), 1e-300)
        counts = prior.copy()
        np.add.at(counts.T, Y, joint / lik)  # expected (answer, label) counts
        M = counts / counts.sum(1, keepdims=True)
        ll = float(np.log(lik).mean())
        if ll - last < TOL:
            break
        last = ll
    return M


def _heldout_terms(P, Y, keep, n_labels, alpha, seed) -> np.ndarray:
    """Each sample's log-likelihood of its label under the transition fitted without its fold."""
    order = np.random.default_rng(seed).permutation(len(Y))
    out = np.zeros(len(Y))
    for f in range(FOLDS):
        held = order[f::FOLDS]
        fit = np.setdiff1d(order, held)
        M = fit_transition(P[fit], Y[fit], keep, n_labels, alpha)
        q = (P[held] @ M)[np.arange(len(held)), Y[held]]
        out[held] = np.log((1 - FLOOR) * q + FLOOR / n_labels)
    return out


def fit_em(sample_probs: Sequence[Mapping[str, float]], sample_labels: Sequence[str], labels: Sequence[str],
           alphas=ALPHAS, seed: int = 0) -> dict[str, object]:
    """The fitted p(y'|ŷ) as plain JSON-able data (``conditional``: answer -> {label: p}), with the chosen prior
    strength, the best one by cross-validation, the rule, and every candidate's mean held-out log-likelihood."""
    labels = list(labels)
    if not sample_probs:
        raise ValueError("fit_em needs at least one preference sample with p(ŷ|x)")
    responses, P, Y, keep = _matrices(sample_probs, sample_labels, labels)
    can_keep = bool((keep >= 0).any())
    grid = tuple(alphas) if can_keep else (0.0,)  # nothing to keep: alpha has no effect
    terms = {}
    if len(Y) >= 2 * FOLDS:
        terms = {a: _heldout_terms(P, Y, keep, len(labels), a, seed) for a in grid}
    scores = {a: float(t.mean()) for a, t in terms.items()}
    if not terms:  # too few samples to cross-validate: trust ŷ the most the grid allows
        chosen = best = grid[-1]
    elif len(grid) == 1:
        chosen = best = grid[0]
    else:
        chosen, best = se_rule({a: [(float(v), 1) for v in t] for a, t in terms.items()})
    M = fit_transition(P, Y, keep, len(labels), chosen)
    conditional = {}
    for r, row in zip(responses, M):
        kept = {labels[k]: float(v) for k, v in enumerate(row) if v >= KEEP_FROM}
        total = sum(kept.values())
        conditional[r] = {y: round(v / total, 6) for y, v in sorted(kept.items(), key=lambda kv: -kv[1])}
    return {"alpha": chosen, "best_alpha": best, "rule": f"largest within {SE_RULE:g} standard errors of the best "
            f"({FOLDS}-fold cross-validated likelihood)", "eps": EPS, "n_samples": len(Y),
            "cv_loglik": {str(a): round(s, 6) for a, s in scores.items()}, "conditional": conditional}
