"""Consistent Marginalization as an estimator: ``CM(base).fit(preference_samples).predict(queries)``.

``fit`` runs the base method on the preference samples (one answer each, sampled at ``temperature``) and
counts (base answer -> user's label) in ``bank_``. ``predict`` marginalizes the base method's answers through the
bank (see :mod:`cm_core.marginalize`). No weights are trained; the learned state is the bank, plain JSON.
"""
from __future__ import annotations

from typing import Sequence

from .bank import MemoryBank
from .data import Example
from .marginalize import decide, soft_marginalize
from .methods import Method, Prediction


class CM(Method):
    def __init__(self, base: Method, chooser: Method | None = None, *, form: str = "hard", single: str = "map",
                 temperature: float = 0.7, seed: int = 0, bank: MemoryBank | None = None):
        if form not in ("hard", "soft"):
            raise ValueError("form must be 'hard' or 'soft'")
        if single not in ("map", "keep"):
            raise ValueError("single must be 'map' or 'keep'")
        self.base, self.chooser = base, chooser
        self.form, self.single, self.temperature, self.seed = form, single, temperature, seed
        self.labels = base.labels
        self.bank = bank
        suffix = {("hard", "map"): "+cm", ("hard", "keep"): "+cm_paper", ("soft", "map"): "+cm_soft",
                  ("soft", "keep"): "+cm_soft"}[(form, single)]
        self.name = getattr(base, "name", "base") + suffix

    def fit(self, samples: Sequence[Example], fit_base: bool = True) -> "CM":
        samples = list(samples)
        if fit_base:
            self.base.fit(samples)
        if self.bank is not None:  # a given (e.g. uploaded) bank is used as it is
            self.bank_ = self.bank
            self._prepare_choices()
            return self
        answers = self.base.sample([s.text for s in samples], self.temperature, self.seed)
        meta = {"base_method": getattr(self.base, "name", "base"), "temperature": self.temperature,
                "seed": self.seed, "n_samples": len(samples)}
        llm = getattr(self.base, "llm", None)
        if llm is not None:
            meta["model"] = llm.identity()
        self.bank_ = MemoryBank.from_pairs(zip(answers, (s.label for s in samples)), meta)
        self._prepare_choices()
        return self

    def _prepare_choices(self) -> None:
        """The hard form's second call chooses among one bank entry's candidates: let the chooser precompute what
        depends on those sets alone (per-user adaptation work, not per-query work)."""
        if self.form != "hard":
            return
        sets = []
        for response in self.bank_.counts:
            d = decide(response, self.bank_, self.single)
            if d.action == "choose":
                sets.append(list(d.candidates))
        (self.chooser or self.base).prepare(sets)

    def predict(self, texts, candidates=None) -> list[Prediction]:
        if not hasattr(self, "bank_"):
            raise RuntimeError("CM: call fit(preference_samples) first")
        base_preds = self.base.predict(texts, candidates)
        if self.form == "soft":
            return [self._soft(p) for p in base_preds]
        return self._hard(texts, base_preds)

    def _soft(self, base: Prediction) -> Prediction:
        if not base.probs:  # no distribution: only the base answer, with certainty
            dist = soft_marginalize({base.label: 1.0}, self.bank_)
        else:
            dist = soft_marginalize(base.probs, self.bank_)
        label = max(dist, key=lambda k: (dist[k], k == base.label)) if dist else base.label
        return Prediction(label, dist, {"base": base.label, "action": "soft"})

    def _hard(self, texts, base_preds) -> list[Prediction]:
        out: list[Prediction | None] = []
        todo: list[int] = []
        for i, p in enumerate(base_preds):
            d = decide(p.label, self.bank_, self.single)
            info = {"base": p.label, "action": d.action, "candidates": d.candidates}
            out.append(Prediction(d.label, None, info) if d.label is not None else Prediction("", None, info))
            if d.action == "choose":
                todo.append(i)
        if todo:
            chooser = self.chooser or self.base
            chosen = chooser.predict([texts[i] for i in todo], [list(out[i].info["candidates"]) for i in todo])
            for i, c in zip(todo, chosen):
                out[i].label, out[i].probs = c.label, c.probs
                out[i].info["choice_scores"] = c.probs
        return out  # type: ignore[return-value]
