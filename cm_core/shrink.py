"""A shrunk memory bank: p(y'|ŷ) pulled toward keeping ŷ, with a strength learned from the preference samples alone.

With 1-5 % of a dataset as preference samples a bank row holds one or two samples, and the plain bank trusts a
single count as fully as fifty: one sample where the model said "music" and the user meant "radio" moves every
later "music" away from itself. The shrunk conditional is the posterior mean under a Dirichlet prior that puts
mass ``alpha`` on keeping ŷ (only where ŷ is one of the user's labels; otherwise there is nothing to keep)::

    q(y'|ŷ) = (n(ŷ, y') + alpha·[y' = ŷ]) / (N(ŷ) + alpha)

``alpha`` is chosen by the leave-one-out log-likelihood of the samples' own labels: each sample is predicted from
the bank without it (a row left empty keeps ŷ, as the bank does for an answer it never saw). ``alpha = 0`` is the
plain bank, so the data decide whether to shrink at all. With 1-5 % of a dataset only rows holding two samples or
more say anything about ``alpha``, and two or three of them can decide by a hair, so the choice follows a standard-
error rule (as glmnet and CART pick a penalty, with two standard errors instead of their one): the LARGEST
``alpha`` whose likelihood is within two standard errors (of the paired per-sample difference) of the best. A bank
gets to move ŷ only where its evidence is significant at about the 5 % level. When no answer is one of the user's
labels ``alpha`` has no effect and is 0. Pure functions over plain data.
"""
from __future__ import annotations

import math
from typing import Collection, Mapping

ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
SE_RULE = 2.0  # standard errors of slack: keep ŷ unless trusting the bank is better at about the 5 % level
FLOOR = 0.01  # share of uniform mass in the likelihood, so that one impossible label does not decide alone


def shrunk_conditional(response: str, row: Mapping[str, int], alpha: float,
                       labels: Collection[str]) -> dict[str, float]:
    """q(y'|ŷ) for one bank row (labels seen with ``response``, with counts); empty when there is no evidence
    and nothing to keep."""
    prior = alpha if response in labels else 0.0
    total = sum(row.values()) + prior
    if total <= 0:
        return {}
    out = {y: c / total for y, c in row.items()}
    if prior:
        out[response] = out.get(response, 0.0) + prior / total
    return out


def loo_terms(counts: Mapping[str, Mapping[str, int]], alpha: float,
              labels: Collection[str]) -> list[tuple[float, int]]:
    """(log-likelihood of a held-out sample's label, how many samples share it) for each (answer, label) cell."""
    k = max(1, len(labels))
    out = []
    for response, row in counts.items():
        for label, c in row.items():
            held = {y: m - (y == label) for y, m in row.items() if m - (y == label) > 0}
            q = shrunk_conditional(response, held, alpha, labels) or {response: 1.0}  # no evidence: keep ŷ
            out.append((math.log((1 - FLOOR) * q.get(label, 0.0) + FLOOR / k), c))
    return out


def _mean(terms: list[tuple[float, int]]) -> float:
    n = sum(c for _, c in terms)
    return sum(t * c for t, c in terms) / n if n else 0.0


def loo_loglik(counts: Mapping[str, Mapping[str, int]], alpha: float, labels: Collection[str]) -> float:
    """Mean leave-one-out log-likelihood of the samples' labels under the bank shrunk by ``alpha``."""
    return _mean(loo_terms(counts, alpha, labels))


def _paired_gap(best: list[tuple[float, int]], other: list[tuple[float, int]]) -> tuple[float, float]:
    """Mean per-sample log-likelihood lost by ``other`` against ``best``, and its standard error."""
    diffs = [(b - o, c) for (b, c), (o, _) in zip(best, other)]
    n = sum(c for _, c in diffs)
    if n < 2:
        return 0.0, 0.0
    mean = sum(d * c for d, c in diffs) / n
    var = sum(c * (d - mean) ** 2 for d, c in diffs) / (n - 1)
    return mean, math.sqrt(var / n)


def se_rule(terms: Mapping[float, list[tuple[float, int]]]) -> tuple[float, float]:
    """(chosen, best): the best alpha by mean held-out likelihood, and the largest whose paired per-sample loss
    against it is within ``SE_RULE`` standard errors. ``terms``: alpha -> (log-likelihood, weight) per sample."""
    scores = {a: _mean(t) for a, t in terms.items()}
    best = max(terms, key=lambda a: (round(scores[a], 12), -a))
    gaps = {a: _paired_gap(terms[best], t) for a, t in terms.items()}
    return max(a for a in terms if gaps[a][0] <= SE_RULE * gaps[a][1] + 1e-12), best


def choose_alpha(counts: Mapping[str, Mapping[str, int]], labels: Collection[str],
                 alphas=ALPHAS) -> dict[str, object]:
    """The prior strength by the standard-error rule (``SE_RULE``) over the leave-one-out likelihood, with every
    candidate's score and the best one's (stored in the bank's metadata and the results JSON, so a reader sees how clear the
    choice was)."""
    labels = set(labels)
    terms = {a: loo_terms(counts, a, labels) for a in alphas}
    scores = {a: _mean(terms[a]) for a in alphas}
    chosen, best = se_rule(terms)
    if not any(r in labels for r in counts):
        chosen = 0.0  # no answer is a user label: nothing to keep, alpha has no effect
    return {"alpha": chosen, "best_alpha": best, "rule": f"largest within {SE_RULE:g} standard errors of the best",
            "loo_loglik": {str(a): round(s, 6) for a, s in scores.items()}}
