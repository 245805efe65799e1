"""The one place that turns a method name into an estimator, for every face (CLI, evaluation, notebooks, demo,
benchmarks).

A name is a base method, optionally with a CM variant suffix: ``zero_shot``, ``knn+cm_soft``. What a method
needs (an LLM, preference samples) is a class attribute of its class, so callers ask :func:`needs_llm` /
:func:`needs_samples` before building anything (e.g. before loading a model)::

    method = build("zero_shot+cm", llm=llm, labels=ds.labels)      # unfitted
    method.fit(preference_samples).predict(queries)

To add a base method: write its class (methods.py or baselines.py) and list it in :data:`METHODS`. To add a CM
variant: one entry in :data:`cm_core.cm.VARIANTS`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from .backends.base import LLM
from .bank import MemoryBank
from .baselines import KNN, LabelSimilarity, LogReg
from .cm import CM, VARIANTS
from .errors import CMError
from .methods import (ChainOfThought, Decoding, FewShot, FewShotFixed, FewShotKNN, Method, SelfConsistency, ZeroShot,
                      ZeroShotKNN)

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    ZeroShot, FewShot, FewShotFixed, ChainOfThought, SelfConsistency, ZeroShotKNN, FewShotKNN,
    LabelSimilarity, KNN, LogReg)}
LLM_METHODS = tuple(n for n, c in METHODS.items() if c.needs_llm)
BASELINES = tuple(n for n, c in METHODS.items() if not c.needs_llm)
ALL_METHODS = tuple(METHODS)
CM_VARIANTS = VARIANTS  # suffix -> (form, single-candidate rule)


def split_method_name(name: str) -> tuple[str, str | None]:
    """``"knn+cm_soft"`` -> ``("knn", "+cm_soft")``; ``"zero_shot"`` -> ``("zero_shot", None)``. Unknown names
    raise one error listing what exists."""
    name = name.strip()
    base, suffix = name, None
    for s in sorted(VARIANTS, key=len, reverse=True):
        if name.endswith(s):
            base, suffix = name[: -len(s)], s
            break
    if base not in METHODS:
        raise CMError(f"unknown method {name!r}; methods: {', '.join(METHODS)}, each optionally with "
                      f"{', '.join(VARIANTS)}")
    return base, suffix


def method_class(name: str) -> type[Method]:
    return METHODS[split_method_name(name)[0]]


def needs_llm(name: str) -> bool:
    return method_class(name).needs_llm


def needs_samples(name: str, *, bank_given: bool = False) -> bool:
    """A base method that learns from samples needs them; a CM variant needs them to estimate its bank."""
    base, variant = split_method_name(name)
    return METHODS[base].needs_samples or (variant is not None and not bank_given)


def is_soft(name: str) -> bool:
    variant = split_method_name(name)[1]
    return variant is not None and VARIANTS[variant][0] == "soft"


def plan(names: Sequence[str], default_variant: str | None = "+cm") -> dict[str, list[str]]:
    """Group method names by base method: ``{base: [variants]}``, in the order given. A base named alone also
    gets ``default_variant`` (the evaluation's habit: every base is shown with CM)."""
    out: dict[str, list[str]] = {}
    for name in names:
        base, variant = split_method_name(name)
        out.setdefault(base, [])
        if variant and variant not in out[base]:
            out[base].append(variant)
    if default_variant:
        for variants in out.values():
            if not variants:
                variants.append(default_variant)
    return out


def build(name: str, *, labels: Sequence[str], llm: LLM | None = None, decoding: Decoding | None = None,
          bank: MemoryBank | None = None, base: Method | None = None, bank_temperature: float = 0.7,
          seed: int = 0) -> Method:
    """The estimator called ``name``, unfitted (call ``fit(samples)``).

    For a CM variant: ``bank`` is used as it is instead of being estimated; ``base`` is an already fitted base
    method to wrap (the evaluation fits each base once for all its variants); ``bank_temperature`` and ``seed``
    are how the bank samples the base answers. The hard form's second call re-asks the LLM zero-shot with the
    bank entry's candidates listed in the prompt (without them a candidate's score would not depend on which
    others are offered, and the base answer would simply win again); a method without an LLM restricts itself.
    """
    base_name, variant = split_method_name(name)
    cls = METHODS[base_name]
    if cls.needs_llm and llm is None:
        raise CMError(f"method {name!r} needs an LLM backend")
    if variant is None:
        if bank is not None or base is not None:
            raise CMError(f"{name!r} is not a CM variant: a bank or base applies to '{base_name}+cm' and the like")
        return cls(llm, labels, decoding) if cls.needs_llm else cls(labels)
    if base is not None and base.name != base_name:
        raise CMError(f"{name!r} was given a fitted {base.name!r} as its base")
    prefit = base is not None
    base = base or build(base_name, labels=labels, llm=llm, decoding=decoding)
    chooser = None
    if cls.needs_llm:
        listed = dataclasses.replace(decoding or Decoding(), list_labels=True)
        chooser = ZeroShot(llm, labels, listed)
    form, single = VARIANTS[variant]
    return CM(base, chooser, form=form, single=single, temperature=bank_temperature, seed=seed, bank=bank,
              prefit=prefit)
