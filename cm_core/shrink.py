"""A shrunk memory bank: p(y'|ŷ) pulled toward keeping ŷ, with a strength learned from the preference samples alone.

With 1-5 % of a dataset as preference samples a bank row holds one or two samples, and the plain bank trusts a
single count as fully as fifty: one sample where the model said "music" and the user meant "radio" moves every
later "music" away from itself. The shrunk conditional is the posterior mean under a Dirichlet prior that puts
mass ``alpha`` on keeping ŷ (only where ŷ is one of the user's labels; otherwise there is nothing to keep)::

    q(y'|ŷ) = (n(ŷ, y') + alpha·[y' = ŷ]) / (N(ŷ) + alpha)

``alpha`` is chosen by the leave-one-out log-likelihood of the samples' own labels: each sample is predicted from
the bank without it (a row left empty keeps ŷ, as the bank does for an answer it never saw). ``alpha = 0`` is the
plain bank, so the data decide whether to shrink at all. Pure functions over plain data.
"""
from __future__ import annotations

import math
from typing import Collection, Mapping

ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
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


def loo_loglik(counts: Mapping[str, Mapping[str, int]], alpha: float, labels: Collection[str]) -> float:
    """Mean leave-one-out log-likelihood of the samples' labels under the bank shrunk by ``alpha``."""
    k = max(1, len(labels))
    total, n = 0.0, 0
    for response, row in counts.items():
        for label, c in row.items():
            held = {y: m - (y == label) for y, m in row.items() if m - (y == label) > 0}
            q = shrunk_conditional(response, held, alpha, labels) or {response: 1.0}  # no evidence: keep ŷ
            p = (1 - FLOOR) * q.get(label, 0.0) + FLOOR / k
            total += c * math.log(p)
            n += c
    return total / n if n else 0.0


def choose_alpha(counts: Mapping[str, Mapping[str, int]], labels: Collection[str],
                 alphas=ALPHAS) -> dict[str, object]:
    """The prior strength with the best leave-one-out likelihood (ties: the smaller), and every candidate's score
    (stored in the bank's metadata and the results JSON, so a reader sees how clear the choice was)."""
    labels = set(labels)
    scores = {a: loo_loglik(counts, a, labels) for a in alphas}
    best = max(alphas, key=lambda a: (round(scores[a], 12), -a))
    return {"alpha": best, "loo_loglik": {str(a): round(s, 6) for a, s in scores.items()}}
