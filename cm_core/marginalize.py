"""Marginalizing a base answer through the memory bank. Pure functions over plain data.

Hard form, per query: the bank's candidates for the base answer ŷ decide what happens:
  none    -> keep ŷ;
  one     -> ``single="map"``: the paper's formula maps ŷ to it; ``single="keep"``: the official code keeps ŷ;
  several -> the LLM (or the base predictor) chooses among those candidates only, for this query.
Soft form: p(y'|x) = Σ_ŷ p(y'|ŷ) p(ŷ|x), with p(y'|ŷ) = δ(y'=ŷ) for a ŷ the bank never saw.
Shrunk forms (:mod:`cm_core.shrink`): the same with p(y'|ŷ) pulled toward keeping ŷ; the hard one answers the
shrunk conditional's label when it holds more than half the mass, else re-asks among its candidates (ŷ included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Literal

from .bank import MemoryBank
from .shrink import shrunk_conditional

Action = Literal["keep", "map", "choose"]


@dataclass(frozen=True)
class Decision:
    action: Action
    label: str | None  # final label, or None when the choice among ``candidates`` is still to be made
    candidates: dict[str, int]


def decide(base_answer: str, bank: MemoryBank, single: str = "map") -> Decision:
    cands = bank.candidates(base_answer)
    if not cands:
        return Decision("keep", base_answer, {})
    if len(cands) == 1:
        only = next(iter(cands))
        if single == "map":
            return Decision("map", only, cands)
        return Decision("keep", base_answer, cands)
    return Decision("choose", None, cands)


def decide_shrunk(base_answer: str, bank: MemoryBank, alpha: float, labels: Collection[str]) -> Decision:
    q = shrunk_conditional(base_answer, bank.candidates(base_answer), alpha, labels)
    if not q:
        return Decision("keep", base_answer, {})
    counts = {y: bank.counts.get(base_answer, {}).get(y, 0) for y in sorted(q, key=lambda y: (-q[y], y))}
    top = max(q, key=lambda y: (q[y], y == base_answer))
    if q[top] > 0.5 or len(q) == 1:
        return Decision("keep" if top == base_answer else "map", top, counts)
    return Decision("choose", None, counts)


def soft_marginalize(base_probs: dict[str, float], bank: MemoryBank,
                     conditional: Callable[[str], dict[str, float]] | None = None) -> dict[str, float]:
    """``conditional``: p(y'|ŷ) (default: the bank's counts)."""
    conditional = conditional or bank.conditional
    out: dict[str, float] = {}
    for y_hat, p in base_probs.items():
        if p <= 0:
            continue
        cond = conditional(y_hat) or {y_hat: 1.0}
        for y, q in cond.items():
            out[y] = out.get(y, 0.0) + p * q
    total = sum(out.values())
    return {k: v / total for k, v in out.items()} if total else {}
