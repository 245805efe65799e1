"""Method names, as the CLI, notebooks and demo spell them, mapped to objects."""
from __future__ import annotations

from typing import Sequence

from .backends.base import LLM
from .baselines import KNN, LabelSimilarity, LogReg
from .errors import CMError
from .methods import ChainOfThought, Decoding, FewShot, Method, SelfConsistency, ZeroShot

LLM_METHODS = ("zero_shot", "few_shot", "few_shot_fixed", "cot", "self_consistency", "zero_shot_knn", "few_shot_knn")
SHORTLIST_K = 10  # *_knn methods: candidates = labels of the 10 most similar preference samples
BASELINES = ("label_similarity", "knn", "logreg")
ALL_METHODS = LLM_METHODS + BASELINES
# suffix -> (form, single-candidate rule). "+cm": the paper's formula; "+cm_paper": its code; "+cm_soft": soft form.
CM_VARIANTS = {"+cm": ("hard", "map"), "+cm_paper": ("hard", "keep"), "+cm_soft": ("soft", "map")}


def split_method_name(name: str) -> tuple[str, str | None]:
    name = name.strip()
    for suffix in sorted(CM_VARIANTS, key=len, reverse=True):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            break
    else:
        base, suffix = name, None
    if base not in ALL_METHODS:
        raise CMError(f"unknown method {name!r}; methods: {', '.join(ALL_METHODS)}, each optionally with "
                      f"{', '.join(CM_VARIANTS)}")
    return base, suffix


def build_method(name: str, llm: LLM | None, labels: Sequence[str], decoding: Decoding | None = None) -> Method:
    if name in BASELINES:
        return {"label_similarity": LabelSimilarity, "knn": KNN, "logreg": LogReg}[name](labels)
    if llm is None:
        raise CMError(f"method {name!r} needs an LLM backend")
    if name == "zero_shot":
        return ZeroShot(llm, labels, decoding)
    if name == "few_shot":
        return FewShot(llm, labels, decoding, retrieval=True)
    if name == "few_shot_fixed":
        return FewShot(llm, labels, decoding, retrieval=False)
    if name == "zero_shot_knn":
        m = ZeroShot(llm, labels, decoding, shortlist=SHORTLIST_K)
        m.name = name
        return m
    if name == "few_shot_knn":
        m = FewShot(llm, labels, decoding, shortlist=SHORTLIST_K)
        m.name = name
        return m
    if name == "cot":
        return ChainOfThought(llm, labels, decoding)
    if name == "self_consistency":
        if decoding is not None and decoding.mode == "generate":
            # k sampled zero-shot answers, majority vote
            return _sampled_vote(llm, labels, decoding)
        return SelfConsistency([ZeroShot(llm, labels, decoding), FewShot(llm, labels, decoding),
                                ChainOfThought(llm, labels, decoding)])
    raise CMError(f"unknown method {name!r}")


def _sampled_vote(llm, labels, decoding) -> Method:
    """Self-consistency by sampling: k zero-shot generations at the decoding temperature, majority vote."""
    m = ZeroShot(llm, labels, decoding)
    m.name = "self_consistency"
    m.chooser.force_votes = True
    return m


def build_chooser(base_name: str, fitted_base: Method, llm: LLM | None, labels, decoding) -> Method:
    """Who picks among several candidates: the paper re-asks zero-shot; a non-LLM base restricts itself."""
    if base_name in BASELINES or llm is None:
        return fitted_base
    # The re-ask always shows the bank's candidates in the prompt (they are few): without them a candidate's
    # score would not depend on which others are offered, and the base answer would simply win again.
    dec = Decoding(**{**(decoding or Decoding()).__dict__, "list_labels": True})
    return ZeroShot(llm, labels, dec)
