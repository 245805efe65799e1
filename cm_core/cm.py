"""Consistent Marginalization as an estimator over a base method: ``fit(preference_samples)``, ``predict(queries)``.
Build one by name with :func:`cm_core.registry.build` (``"zero_shot+cm"``), which picks the chooser and variant.

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

# The CM variants, by the suffix a method name carries: suffix -> (form, single-candidate rule).
# "+cm": the paper's formula (a single candidate is mapped to); "+cm_paper": the official code (it is kept);
# "+cm_soft": the soft form over p(ŷ|x). A new variant is one entry here (and its rule in marginalize.py).
VARIANTS: dict[str, tuple[str, str]] = {"+cm": ("hard", "map"), "+cm_paper": ("hard", "keep"),
                                        "+cm_soft": ("soft", "map")}


def variant_suffix(form: str, single: str) -> str:
    if form == "soft":
        return "+cm_soft"
    return next(s for s, (f, r) in VARIANTS.items() if (f, r) == (form, single))


def estimate_bank(base: Method, samples: Sequence[Example], temperature: float = 0.7, seed: int = 0) -> MemoryBank:
    """The memory bank: the fitted base method's answer to each preference sample, counted against the user's
    label. The metadata records how it was made (method, model, temperature, seed, sample count)."""
    samples = list(samples)
    answers = base.answer_samples(samples, temperature, seed)
    meta = {"base_method": base.name, "temperature": temperature, "seed": seed, "n_samples": len(samples)}
    llm = getattr(base, "llm", None)
    if llm is not None:
        meta["model"] = llm.identity()
    pairs = [(a, s.label) for a, s in zip(answers, samples) if a]  # "": a failed query is no evidence
    return MemoryBank.from_pairs(pairs, meta)


class CM(Method):
    """``base``: the method whose answers are marginalized. ``chooser``: who picks among a bank entry's several
    candidates (default: the base itself). ``bank``: a given bank is used as it is instead of being estimated.
    ``prefit``: the base is already fitted on the same samples (fit only estimates the bank)."""

    def __init__(self, base: Method, chooser: Method | None = None, *, form: str = "hard", single: str = "map",
                 temperature: float = 0.7, seed: int = 0, bank: MemoryBank | None = None, prefit: bool = False):
        if form not in ("hard", "soft"):
            raise ValueError("form must be 'hard' or 'soft'")
        if single not in ("map", "keep"):
            raise ValueError("single must be 'map' or 'keep'")
        self.base, self.chooser = base, chooser
        self.form, self.single, self.temperature, self.seed = form, single, temperature, seed
        self.bank, self.prefit = bank, prefit
        self.labels = base.labels
        self.name = base.name + variant_suffix(form, single)

    @property
    def needs_llm(self) -> bool:  # type: ignore[override]
        return self.base.needs_llm

    @property
    def needs_samples(self) -> bool:  # type: ignore[override]
        """Samples are needed to estimate the bank, or by a base that learns from them."""
        return self.bank is None or (self.base.needs_samples and not self.prefit)

    @property
    def gives_probs(self) -> bool:
        return self.form == "soft" or self.base.gives_probs

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "bank_")

    def _fit(self, samples: list[Example]) -> None:
        if not self.prefit:
            self.base.fit(samples)
        self.bank_ = self.bank if self.bank is not None else estimate_bank(self.base, samples, self.temperature,
                                                                            self.seed)
        self._prepare_choices()

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
        self._check_fitted()
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
