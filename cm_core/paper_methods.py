"""The ``paper`` protocol's methods: the official experiment's base methods, bank estimator and CM re-ask, as
:class:`~cm_core.methods.Method` objects, so the registry and the evaluation treat them like ours.

Each method asks the official prompt (:mod:`cm_core.paper`) at the official decoding and scores the reply
strictly: the official test cleaning, and an answer that is not exactly a label becomes ``paper.UNKNOWN``. The
official code reads one reply twice: the test scorer gives the method's own answer, the vote cleaning gives the
answer that self-consistency votes with and CM looks up in the bank (the two can differ); a prediction carries
both (``label`` and ``info["vote"]``) and the raw reply (``info["raw"]``). The prompt shape follows the backend:
the GPT runs' (one user message, 10 tokens, no top_p) on ``openai`` backends, the Llama runs' otherwise.

These methods generate text and give no p(y|x): CM's soft form does not apply (the official code has none).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from . import paper
from .backends.base import LLM, GenRequest
from .bank import MemoryBank
from .data import Example
from .errors import BankError, CMError
from .methods import Method, Prediction, Retriever

COT_TEMPLATE = "The intent of this input is related to '{}'."  # the official selected_data 'expressed' text
SOFT_REASON = "the paper protocol's methods generate text and give no p(y|x); the official code has no soft form"
SELF_REFINE_LLAMA = ("self_refine runs on openai backends only, as in the GPT runs: the official Llama runs discard "
                     "the revision (MTC ~930-1000), so their self-refine answer is always the zero-shot answer; "
                     "run zero_shot instead")


def scored(raw: str, labels: Sequence[str]) -> Prediction:
    """One reply as the official code reads it: ``label`` by the test scorer (strict), ``info["vote"]`` by the
    vote/bank cleaning (not yet lower-cased, as the official vote compares it)."""
    return Prediction(paper.strict_label(paper.clean_test_official(raw), labels), None,
                      {"raw": raw, "vote": paper.clean_vote_official(raw)})


def prompt_seed(messages: list[dict], seed: int) -> int:
    """A request's sampling seed, from the run's seed and the prompt: reruns reproduce, yet different queries do not
    share one stream of random draws (the official runs draw from one unseeded stream)."""
    return (zlib.crc32(messages[-1]["content"].encode("utf-8")) + 1_000_003 * seed) % 2**31


def generate(llm: LLM, messages: list[list[dict]], dec: paper.PaperDecoding, seed: int, desc: str = "") -> list[str]:
    """One sampled reply per prompt at an official decoding (``top_p=None``: the API default, i.e. 1.0)."""
    reqs = [GenRequest.of(m, n=1, temperature=dec.temperature, top_p=1.0 if dec.top_p is None else dec.top_p,
                          max_tokens=dec.max_new_tokens, seed=prompt_seed(m, seed)) for m in messages]
    out: list[str] = []
    # a local model computes a chunk at a time (a progress bar on long runs); an openai backend gets them all at
    # once and keeps its --concurrency in flight, with no barrier between chunks
    step = max(1, len(reqs)) if llm.kind == "openai" else 64
    quiet = len(reqs) <= step or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")
    for start in tqdm(range(0, len(reqs), step), desc=desc, disable=quiet, leave=False):
        out.extend(r[0] if r else "" for r in llm.generate(reqs[start:start + step]))
    return out


class PaperMethod(Method):
    """Shared plumbing: one official prompt per query, generated once per query text and kept, so CM and
    self-consistency read the very answers the base method was scored on (the official code reuses them too)."""

    needs_llm = True
    decoding_key = "base"  # PAPER_DECODING["llama_<key>"] or ["gpt_<key>"]

    def __init__(self, llm: LLM, labels: Sequence[str], *, dataset: str | None = None, seed: int = 0,
                 embedder=None):
        self.llm, self.labels, self.dataset, self.seed = llm, list(labels), dataset, seed
        self.gpt = llm.kind == "openai"  # the GPT runs' prompt shape; the Llama runs' otherwise
        self.embedder = embedder
        self._raw: dict[str, str] = {}

    @property
    def gives_probs(self) -> bool:
        return False

    @property
    def decoding(self) -> paper.PaperDecoding:
        return paper.PAPER_DECODING[("gpt_" if self.gpt else "llama_") + self.decoding_key]

    def _messages(self, text: str) -> list[dict]:
        raise NotImplementedError

    def raw_answers(self, texts: Sequence[str]) -> list[str]:
        todo = [t for t in dict.fromkeys(texts) if t not in self._raw]
        if todo:
            self._raw.update(zip(todo, generate(self.llm, [self._messages(t) for t in todo], self.decoding,
                                                self.seed, self.name)))
        return [self._raw[t] for t in texts]

    def predict(self, texts, candidates=None) -> list[Prediction]:
        if candidates is not None:
            raise CMError(f"{self.name} (paper protocol) answers over the full label set; CM's re-ask is PaperChooser")
        self._check_fitted()
        return [scored(raw, self.labels) for raw in self.raw_answers(list(texts))]


class PaperZeroShot(PaperMethod):
    """The query and the whole label set (MTC agent_cot_0 / GPT ~451)."""

    name = "zero_shot"

    def _messages(self, text):
        return paper.zero_shot_messages(text, self.labels, dataset=self.dataset, as_user_message=self.gpt)


class _Retrieving(PaperMethod):
    """Demonstrations: the most similar PREFERENCE samples by MiniLM cosine, each shown with the official template
    chain of thought and that cosine as 'Similarity' (the official pool, output/selected_data_<dataset>.json
    ranked by word2vec cosine, is not shipped here: a recorded departure). Like the official code, the query
    itself is not excluded."""

    needs_samples = True

    def _fit(self, samples):
        from .embeddings import get_embedder
        self.retriever_ = Retriever(self.embedder or get_embedder(), samples)

    def references(self, text: str, k: int) -> list[paper.Reference]:
        r = self.retriever_
        sims = (r.embedder.encode([text]) @ r.matrix.T)[0]
        top = np.argsort(-sims, kind="stable")[:k]  # most similar first; ties keep sample order (as sorted())
        return [paper.Reference(r.samples[j].text, r.samples[j].label, COT_TEMPLATE.format(r.samples[j].label),
                                float(sims[j])) for j in top]


class PaperFewShot(_Retrieving):
    """Five demonstrations (four in the GPT runs), each with its chain of thought (the effective agent_fot)."""

    name = "few_shot"

    @property
    def n_refs(self) -> int:
        return 4 if self.gpt else 5

    def _messages(self, text):
        return paper.few_shot_messages(text, self.labels, self.references(text, self.n_refs), dataset=self.dataset,
                                       as_user_message=self.gpt)


class PaperCoT(_Retrieving):
    """The single most similar demonstration with its chain of thought (agent_cot)."""

    name = "cot"

    def _messages(self, text):
        return paper.cot_messages(text, self.labels, self.references(text, 1)[0], dataset=self.dataset,
                                  as_user_message=self.gpt)


class PaperSelfRefine(PaperMethod):
    """The GPT runs' self-refine: start from the zero-shot answer (vote-cleaned), then two rounds of 'judge it,
    revise it unless the verdict contains Correct' (GPT ~859-930). OpenAI backends only (see SELF_REFINE_LLAMA)."""

    name = "self_refine"
    decoding_key = "refine"

    def __init__(self, llm, labels, **kw):
        super().__init__(llm, labels, **kw)
        if not self.gpt:
            raise CMError(SELF_REFINE_LLAMA)
        self.zero_shot = PaperZeroShot(llm, labels, **kw)

    def raw_answers(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self._raw]
        answers = [p.info["vote"] for p in self.zero_shot.predict(todo)]
        for _ in range(2):
            verdicts = [paper.feedback_line(v) for v in generate(self.llm, [
                paper.judge_messages(t, a, self.labels, as_user_message=True) for t, a in zip(todo, answers)],
                self.decoding, self.seed, "judge")]
            redo = [i for i, v in enumerate(verdicts) if paper.refine_needed(v)]
            revised = generate(self.llm, [paper.revise_messages(todo[i], answers[i], verdicts[i], self.labels,
                                                                as_user_message=True) for i in redo],
                               self.decoding, self.seed, "revise")
            for i, text in zip(redo, revised):
                answers[i] = paper.clean_refined(text)
        self._raw.update(zip(todo, answers))
        return [self._raw[t] for t in texts]


class PaperSelfConsistency(PaperMethod):
    """Majority vote of the zero-shot, few-shot and CoT answers (vote-cleaned, case-sensitive), ties to zero-shot
    (MTC ~2128); on openai backends self-refine votes too, second in line (GPT ~1597)."""

    name = "self_consistency"
    needs_samples = True

    def __init__(self, llm, labels, **kw):
        super().__init__(llm, labels, **kw)
        self.voters = [cls(llm, labels, **kw) for cls in (PaperZeroShot, PaperFewShot, PaperCoT)]
        if self.gpt:
            self.voters.append(PaperSelfRefine(llm, labels, **kw))

    def _fit(self, samples):
        for v in self.voters:
            v.fit(samples)

    def raw_answers(self, texts):
        votes = [[p.info["vote"] for p in v.predict(texts)] for v in self.voters]
        return [paper.self_consistency_vote(*row[:3], refine=row[3] if len(row) > 3 else None)
                for row in zip(*votes)]


class PaperBank(PaperMethod):
    """The memory bank's answers (MBE): its own prompt, one query per call, 30 tokens at T=0.7 / top_p 0.9 (also
    for the GPT runs, which read a bank made this way), keys cleaned by ``clean_official``. ONE bank, made once on
    the preference rows, serves every base method (MTC ~174, 2158)."""

    name = "zero_shot_bank"

    def _messages(self, text):
        return paper.bank_messages(text, self.labels, dataset=self.dataset)

    @property
    def decoding(self):
        return paper.PAPER_DECODING["llama_bank"]

    def answer_samples(self, samples: Sequence[Example], temperature: float = 0.7, seed: int = 0) -> list[str]:
        dec = paper.PaperDecoding(temperature, self.decoding.top_p, self.decoding.max_new_tokens)
        raws = generate(self.llm, [self._messages(s.text) for s in samples], dec, seed, "bank")
        return [paper.clean_official(r) for r in raws]


class BankLookup(Method):
    """A paper base method as the official CM sees it: its answer vote-cleaned and strict (label or 'Unknown',
    MTC ~2152 normalize_intents) is what the bank is looked up with and what a 'keep' returns."""

    needs_llm = True

    def __init__(self, base: PaperMethod):
        self.base, self.name, self.labels = base, base.name, base.labels

    @property
    def needs_samples(self) -> bool:  # type: ignore[override]
        return self.base.needs_samples

    @property
    def is_fitted(self) -> bool:
        return self.base.is_fitted

    @property
    def gives_probs(self) -> bool:
        return False

    def _fit(self, samples):
        self.base.fit(samples)

    def predict(self, texts, candidates=None):
        return [Prediction(paper.strict_label(p.info["vote"], self.labels), None, {**p.info, "scored": p.label})
                for p in self.base.predict(texts, candidates)]


class PaperChooser(Method):
    """CM's second call: ask again among the bank entry's candidates (choose_messages; T=0.7, top_p 0.9, 60
    tokens; GPT: 20 tokens) and score the reply like a base answer, WITHOUT checking it against the candidates
    (as coded, MTC ~1687-1717). The GPT runs re-ask few-shot+CM with the few-shot prompt itself (GPT ~1097):
    pass that few-shot method as ``few_shot``."""

    name = "paper_choose"
    needs_llm = True

    def __init__(self, llm: LLM, labels: Sequence[str], *, dataset: str | None = None, seed: int = 0,
                 few_shot: PaperFewShot | None = None):
        self.llm, self.labels, self.dataset, self.seed, self.few_shot = llm, list(labels), dataset, seed, few_shot
        self.gpt = llm.kind == "openai"

    @property
    def gives_probs(self) -> bool:
        return False

    def predict(self, texts, candidates=None):
        if candidates is None:
            raise CMError("PaperChooser re-asks among a bank entry's candidates: pass them")
        if self.few_shot is not None:
            msgs = [paper.gpt_few_shot_choose_messages(t, c, self.few_shot.references(t, self.few_shot.n_refs),
                                                       dataset=self.dataset) for t, c in zip(texts, candidates)]
            dec = paper.PAPER_DECODING["gpt_few_shot_choose"]
        else:
            msgs = [paper.choose_messages(t, c, dataset=self.dataset, as_user_message=self.gpt)
                    for t, c in zip(texts, candidates)]
            dec = paper.PAPER_DECODING["gpt_choose" if self.gpt else "llama_choose"]
        raws = generate(self.llm, msgs, dec, self.seed, "re-ask")
        return [Prediction(paper.strict_label(paper.clean_test_official(r), self.labels), None, {"raw": r})
                for r in raws]


PAPER_METHODS: dict[str, type[PaperMethod]] = {cls.name: cls for cls in (
    PaperZeroShot, PaperFewShot, PaperCoT, PaperSelfConsistency, PaperSelfRefine)}


def load_bank(path: str | os.PathLike) -> MemoryBank:
    """A bank for the paper protocol: the official JSON ``{answer: [labels]}`` (``meta_memorisation_estimated/``)
    or one written by ``estimate --protocol paper``, read by :meth:`MemoryBank.from_json`, which refuses with one
    line naming the problem: a missing file, a serialized Python object (never loaded), an empty bank, any other
    shape."""
    bank = MemoryBank.from_json(Path(path))
    if not bank.counts:
        raise BankError("empty bank: it has no entries", source=str(path))
    return bank
