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
from .em import fit_em
from .errors import CMError
from .marginalize import decide, decide_shrunk, soft_marginalize
from .methods import Method, Prediction
from .shrink import choose_alpha, shrunk_conditional

# The CM variants, by the suffix a method name carries: suffix -> (form, single-candidate rule, shrink, how
# p(y'|ŷ) is learned). "+cm": the paper's formula (a single candidate is mapped to); "+cm_paper": the official code
# (it is kept); "+cm_soft": the soft form over p(ŷ|x); "+cm_shrunk" / "+cm_soft_shrunk": the bank pulled toward
# keeping ŷ (cm_core.shrink); "+cm_em": the soft form with p(y'|ŷ) fitted by EM on the base's whole p(ŷ|x_i)
# (cm_core.em) instead of counted from one sampled answer. A new variant is one entry here (and its rule in
# marginalize.py).
VARIANTS: dict[str, tuple[str, str, bool, str]] = {
    "+cm": ("hard", "map", False, "count"), "+cm_paper": ("hard", "keep", False, "count"),
    "+cm_soft": ("soft", "map", False, "count"), "+cm_shrunk": ("hard", "map", True, "count"),
    "+cm_soft_shrunk": ("soft", "map", True, "count"), "+cm_em": ("soft", "map", False, "em")}


def variant_suffix(form: str, single: str, shrink: bool = False, estimate: str = "count") -> str:
    if form == "soft":
        single = "map"  # the soft form has no single-candidate rule
    suffix = next((s for s, v in VARIANTS.items() if v == (form, single, shrink, estimate)), None)
    if suffix is None:
        raise ValueError(f"no CM variant is {form}, single={single}, shrink={shrink}, estimate={estimate}")
    return suffix


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
    bank = MemoryBank.from_pairs(pairs, meta)
    # the shrunk forms' prior strength depends on the bank and the labels alone: stored with the bank, so a saved
    # bank says how far the shrunk forms trust it (the same choice a shrunk CM makes when fitted on it)
    bank.meta["shrinkage"] = choose_alpha(bank.counts, base.labels)
    return bank


class CM(Method):
    """``base``: the method whose answers are marginalized. ``chooser``: who picks among a bank entry's several
    candidates (default: the base itself). ``bank``: a given bank is used as it is instead of being estimated.
    ``prefit``: the base is already fitted on the same samples (fit only estimates the bank). ``shrink``: pull
    p(y'|ŷ) toward keeping ŷ with a strength chosen on the samples (``shrinkage_``; see :mod:`cm_core.shrink`).
    ``estimate="em"`` (soft form only): p(y'|ŷ) is fitted by EM on the base's p(ŷ|x) for each sample (``em_``; see
    :mod:`cm_core.em`); the counted bank is still kept in ``bank_`` (what the samples' drawn answers were)."""

    def __init__(self, base: Method, chooser: Method | None = None, *, form: str = "hard", single: str = "map",
                 temperature: float = 0.7, seed: int = 0, bank: MemoryBank | None = None, prefit: bool = False,
                 shrink: bool = False, estimate: str = "count"):
        if form not in ("hard", "soft"):
            raise ValueError("form must be 'hard' or 'soft'")
        if single not in ("map", "keep"):
            raise ValueError("single must be 'map' or 'keep'")
        if estimate not in ("count", "em") or (estimate == "em" and form != "soft"):
            raise ValueError("estimate must be 'count' or 'em' (the latter for the soft form)")
        self.base, self.chooser = base, chooser
        self.form, self.single, self.temperature, self.seed = form, single, temperature, seed
        self.bank, self.prefit, self.shrink, self.estimate = bank, prefit, shrink, estimate
        self.labels = base.labels
        self.name = base.name + variant_suffix(form, single, shrink, estimate)

    @property
    def needs_llm(self) -> bool:  # type: ignore[override]
        return self.base.needs_llm

    @property
    def needs_samples(self) -> bool:  # type: ignore[override]
        """Samples are needed to estimate the bank, or by a base that learns from them."""
        return self.bank is None or self.estimate == "em" or (self.base.needs_samples and not self.prefit)

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
        if self.shrink:
            self.shrinkage_ = choose_alpha(self.bank_.counts, self.labels)
        if self.estimate == "em":
            preds = self.base.predict_samples(samples, self.seed)
            # no distribution: the answer alone, with certainty (as _soft reads it); no answer: no evidence
            usable = [(p.probs or {p.label: 1.0}, s.label) for p, s in zip(preds, samples) if p.probs or p.label]
            if not usable:
                raise CMError(f"{self.name}: the base answered none of its {len(samples)} samples, so there is "
                              "nothing to fit p(y'|ŷ) on")
            self.em_ = fit_em([p for p, _ in usable], [y for _, y in usable], self.labels, seed=self.seed)
        self._prepare_choices()

    def _prepare_choices(self) -> None:
        """The hard form's second call chooses among one bank entry's candidates: let the chooser precompute what
        depends on those sets alone (per-user adaptation work, not per-query work)."""
        if self.form != "hard":
            return
        sets = []
        for response in self.bank_.counts:
            d = self._decide(response)
            if d.action == "choose":
                sets.append(list(d.candidates))
        (self.chooser or self.base).prepare(sets)

    def _decide(self, base_answer: str):
        if self.shrink:
            return decide_shrunk(base_answer, self.bank_, self.shrinkage_["alpha"], self.labels)
        return decide(base_answer, self.bank_, self.single)

    def _conditional(self, response: str) -> dict[str, float]:
        if self.estimate == "em":
            return self.em_["conditional"].get(response, {})  # an answer no sample could give: keep it
        if self.shrink:
            return shrunk_conditional(response, self.bank_.candidates(response), self.shrinkage_["alpha"], self.labels)
        return self.bank_.conditional(response)

    def predict(self, texts, candidates=None) -> list[Prediction]:
        self._check_fitted()
        base_preds = self.base.predict(texts, candidates)
        if self.form == "soft":
            return [self._soft(p) for p in base_preds]
        return self._hard(texts, base_preds)

    def _soft(self, base: Prediction) -> Prediction:
        dist = soft_marginalize(base.probs or {base.label: 1.0}, self.bank_, self._conditional)  # no distribution:
        # only the base answer, with certainty
        label = max(dist, key=lambda k: (dist[k], k == base.label)) if dist else base.label
        return Prediction(label, dist, {"base": base.label, "action": "soft"})

    def _hard(self, texts, base_preds) -> list[Prediction]:
        out: list[Prediction | None] = []
        todo: list[int] = []
        for i, p in enumerate(base_preds):
            d = self._decide(p.label)
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
