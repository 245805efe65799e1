"""Marginalizing a base answer through the memory bank. Pure functions over plain data.

Hard form, per query: the bank's candidates for the base answer ŷ decide what happens:
  none    -> keep ŷ;
  one     -> ``single="map"``: the paper's formula maps ŷ to it; ``single="keep"``: the official code keeps ŷ;
  several -> the LLM (or the base predictor) chooses among those candidates only, for this query.
Soft form: p(y'|x) = Σ_ŷ p(y'|ŷ) p(ŷ|x), with p(y'|ŷ) = δ(y'=ŷ) for a ŷ the bank never saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .bank import MemoryBank

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


def soft_marginalize(base_probs: dict[str, float], bank: MemoryBank) -> dict[str, float]:
    out: dict[str, float] = {}
    for y_hat, p in base_probs.items():
        if p <= 0:
            continue
        cond = bank.conditional(y_hat) or {y_hat: 1.0}
        for y, q in cond.items():
            out[y] = out.get(y, 0.0) + p * q
    total = sum(out.values())
    return {k: v / total for k, v in out.items()} if total else {}
