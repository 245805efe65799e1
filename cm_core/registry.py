"""The one place that turns a method name into an estimator, for every face (CLI, evaluation, notebooks, demo,
benchmarks).

A name is a base method, optionally with a CM variant suffix: ``zero_shot``, ``knn+cm_soft``. What a method
needs (an LLM, preference samples) is a class attribute of its class, so callers ask :func:`needs_llm` /
:func:`needs_samples` before building anything (e.g. before loading a model)::

    method = build("zero_shot+cm", llm=llm, labels=ds.labels)      # unfitted
    method.fit(preference_samples).predict(queries)

To add a base method: write its class (methods.py, baselines.py, or training.py for the per-user training
baselines) and list it in :data:`METHODS`. To add a CM variant: one entry in :data:`cm_core.cm.VARIANTS`.

Two protocols share these names. ``ours`` (the default): the classes above. ``paper``: the official experiment's
methods (:mod:`cm_core.paper_methods`: official prompts, decoding and strict scoring), with ``+cm_paper`` (the
rule as coded: a single-candidate entry keeps the base answer) and ``+cm`` (the paper's formula: it maps to it),
both over the ONE bank given to ``build``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from .backends.base import LLM
from .bank import MemoryBank
from .baselines import KNN, LabelSimilarity, LogReg, SetFit
from .cm import CM, VARIANTS
from .errors import CMError
from .methods import (ChainOfThought, Decoding, FewShot, FewShotFixed, FewShotKNN, Method, OwnWords, OwnWordsFree,
                      SelfConsistency, ZeroShot, ZeroShotKNN)
from .paper_methods import PAPER_METHODS, SOFT_REASON, BankLookup, PaperChooser, PaperFewShot
from .training import TRAINING_METHODS

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    ZeroShot, FewShot, FewShotFixed, ChainOfThought, SelfConsistency, ZeroShotKNN, FewShotKNN, OwnWords, OwnWordsFree,
    LabelSimilarity, KNN, LogReg, SetFit, *TRAINING_METHODS)}
LLM_METHODS = tuple(n for n, c in METHODS.items() if c.needs_llm)
BASELINES = tuple(n for n, c in METHODS.items() if not c.needs_llm)
ALL_METHODS = tuple(METHODS)
CM_VARIANTS = VARIANTS  # suffix -> (form, single-candidate rule, shrink, estimate)
PROTOCOLS = ("ours", "paper")
PAPER_VARIANTS = ("+cm_paper", "+cm", "+cm_shrunk")  # as coded, as the formula reads, and (this project's, not
# the official code's) the formula over the shrunk bank; +cm_soft needs p(y|x), which the paper's methods lack
PAPER_ADDITIONS = {"+cm_shrunk": "+cm_shrunk is this project's addition, not the official code's: the paper's formula "
                                 "(+cm) over the shared bank shrunk toward keeping each answer, the prior strength "
                                 "chosen on the preference rows alone (cm_core.shrink)"}


def _methods(protocol: str) -> dict[str, type[Method]]:
    if protocol not in PROTOCOLS:
        raise CMError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    return PAPER_METHODS if protocol == "paper" else METHODS  # type: ignore[return-value]


def split_method_name(name: str, protocol: str = "ours") -> tuple[str, str | None]:
    """``"knn+cm_soft"`` -> ``("knn", "+cm_soft")``; ``"zero_shot"`` -> ``("zero_shot", None)``. Unknown names
    raise one error listing what exists (in ``protocol``)."""
    name = name.strip()
    base, suffix = name, None
    for s in sorted(VARIANTS, key=len, reverse=True):
        if name.endswith(s):
            base, suffix = name[: -len(s)], s
            break
    methods = _methods(protocol)
    if base not in methods:
        if protocol == "paper":
            known = " (a method of our protocol)" if base in METHODS else ""
            raise CMError(f"method {name!r}{known} is not in the paper protocol; its methods: {', '.join(methods)}, "
                          "each optionally with +cm_paper (as coded), +cm (the formula) or +cm_shrunk (ours: the "
                          "formula over the shrunk bank)")
        raise CMError(f"unknown method {name!r}; methods: {', '.join(METHODS)}, each optionally with "
                      f"{', '.join(VARIANTS)}")
    if suffix is not None and not supports_cm(base, protocol):
        raise CMError(f"{name!r}: {base} is trained on the preference samples themselves, so CM variants of it are "
                      f"not offered (a bank of its answers on its own training samples would be an identity); use "
                      f"{base!r} alone")
    return base, suffix


def supports_cm(base: str, protocol: str = "ours") -> bool:
    """Whether a base method can be wrapped by CM (the per-user training baselines cannot)."""
    return getattr(_methods(protocol)[base], "supports_cm", True)


def method_class(name: str, protocol: str = "ours") -> type[Method]:
    return _methods(protocol)[split_method_name(name, protocol)[0]]


def needs_llm(name: str, protocol: str = "ours") -> bool:
    return method_class(name, protocol).needs_llm


def needs_samples(name: str, *, bank_given: bool = False, protocol: str = "ours") -> bool:
    """A base method that learns from samples needs them; a CM variant needs them to estimate its bank (+cm_em
    always: it fits p(y'|ŷ) on the base's p(ŷ|x) for each sample, which no bank file holds)."""
    base, variant = split_method_name(name, protocol)
    em = variant is not None and VARIANTS[variant][3] == "em"
    return _methods(protocol)[base].needs_samples or (variant is not None and (not bank_given or em))


def is_soft(name: str) -> bool:
    variant = split_method_name(name)[1]
    return variant is not None and VARIANTS[variant][0] == "soft"


def plan(names: Sequence[str], default_variant: str | None = "+cm", protocol: str = "ours") -> dict[str, list[str]]:
    """Group method names by base method: ``{base: [variants]}``, in the order given. A base named alone also
    gets ``default_variant`` (the evaluation's habit: every base is shown with CM)."""
    out: dict[str, list[str]] = {}
    for name in names:
        base, variant = split_method_name(name, protocol)
        out.setdefault(base, [])
        if variant and variant not in out[base]:
            out[base].append(variant)
    if default_variant:
        for base, variants in out.items():
            if not variants and supports_cm(base, protocol):  # the training baselines stand alone
                variants.append(default_variant)
    return out


def build(name: str, *, labels: Sequence[str], llm: LLM | None = None, decoding: Decoding | None = None,
          bank: MemoryBank | None = None, base: Method | None = None, bank_temperature: float = 0.7,
          seed: int = 0, protocol: str = "ours", dataset: str | None = None,
          responses: Sequence[str] | None = None) -> Method:
    """The estimator called ``name``, unfitted (call ``fit(samples)``).

    For a CM variant: ``bank`` is used as it is instead of being estimated; ``base`` is an already fitted base
    method to wrap (the evaluation fits each base once for all its variants); ``bank_temperature`` and ``seed``
    are how the bank samples the base answers. The hard form's second call re-asks the LLM zero-shot with the
    bank entry's candidates listed in the prompt (without them a candidate's score would not depend on which
    others are offered, and the base answer would simply win again); a method without an LLM restricts itself.

    ``responses``: the model's own vocabulary, for methods that answer in it (``own_words``: the user's labels are
    only reached through CM's bank).

    ``protocol="paper"``: the official methods (``dataset`` picks the official format hints, ``seed`` seeds the
    requests); a CM variant needs the ONE bank (estimated by the evaluation or the official file) as ``bank``.
    """
    if protocol == "paper":
        return _build_paper(name, labels=labels, llm=llm, bank=bank, base=base, seed=seed, dataset=dataset)
    base_name, variant = split_method_name(name, protocol)
    cls = METHODS[base_name]
    if cls.needs_llm and llm is None:
        raise CMError(f"method {name!r} needs an LLM backend")
    if variant is None:
        if bank is not None or base is not None:
            raise CMError(f"{name!r} is not a CM variant: a bank or base applies to '{base_name}+cm' and the like")
        if getattr(cls, "uses_responses", False):
            return cls(llm, labels, decoding, responses=responses)
        if responses is not None:
            raise CMError(f"{name!r} answers among the user's labels: responses= applies to own_words")
        return cls(llm, labels, decoding) if cls.needs_llm else cls(labels)
    if base is not None and base.name != base_name:
        raise CMError(f"{name!r} was given a fitted {base.name!r} as its base")
    prefit = base is not None
    base = base or build(base_name, labels=labels, llm=llm, decoding=decoding, responses=responses)
    chooser = None
    if cls.needs_llm:
        listed = dataclasses.replace(decoding or Decoding(), list_labels=True)
        chooser = ZeroShot(llm, labels, listed)
    form, single, shrink, estimate = VARIANTS[variant]
    return CM(base, chooser, form=form, single=single, temperature=bank_temperature, seed=seed, bank=bank,
              prefit=prefit, shrink=shrink, estimate=estimate)


def _build_paper(name: str, *, labels, llm, bank, base, seed, dataset) -> Method:
    base_name, variant = split_method_name(name, "paper")
    cls = PAPER_METHODS[base_name]
    if llm is None:
        raise CMError(f"method {name!r} needs an LLM backend")
    kw = {"dataset": dataset, "seed": seed}
    if variant is None:
        if bank is not None or base is not None:
            raise CMError(f"{name!r} is not a CM variant: a bank or base applies to '{base_name}+cm_paper' and "
                          "the like")
        return cls(llm, labels, **kw)
    if variant not in PAPER_VARIANTS:
        raise CMError(f"{name!r} is not in the paper protocol: {SOFT_REASON}")
    if bank is None:
        raise CMError(f"{name!r} (paper protocol) needs the one shared memory bank: the evaluation estimates it once "
                      "on the preference rows, or give the official bank file (--bank)")
    if base is not None and base.name != base_name:
        raise CMError(f"{name!r} was given a fitted {base.name!r} as its base")
    prefit = base is not None
    base = base or cls(llm, labels, **kw)
    few_shot = base if isinstance(base, PaperFewShot) and base.gpt else None  # the GPT runs re-ask with its prompt
    chooser = PaperChooser(llm, labels, few_shot=few_shot, **kw)
    _, single, shrink, _ = VARIANTS[variant]
    return CM(BankLookup(base), chooser, form="hard", single=single, bank=bank, prefit=prefit, shrink=shrink)
