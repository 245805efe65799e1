"""The ``paper`` protocol: pure building blocks that reproduce the official CM code's behaviour.

Why this module exists: the rest of ``cm_core`` is a clean re-design of Consistent Marginalization. To compare
with the published numbers we also need the *exact* protocol of the authors' code (github
``858006908cc/Consistent-Marginalization``): the same seeded splits, byte-identical prompts, the same decoding
settings, the same answer cleaning and the same (quirky) inference rule. Everything here is a pure function (no
LLM, no I/O except reading a jsonl file), written from a reading of the official files, never copied:

* MTC  = ``meta_train_CM.py``              (Llama-3-8B-Instruct test runs)
* MBE  = ``meta_memory_bank_estimation.py`` (Llama memory-bank estimation)
* GPT  = ``chatgpt_train.py``               (GPT-3.5-turbo / GPT-4o-mini test runs)

Line numbers in the docstrings are approximate. Every knowing departure from the official code is listed in
``DEPARTURES`` (and returned in ``paper_split``'s ``info``).
"""
from __future__ import annotations

import ast
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

import numpy as np

from .data import Example

__all__ = [
    "OFFICIAL_SEED", "GPT_TEST_SEED", "UNKNOWN", "EMPTY_FALLBACK", "DEPARTURES", "TEST_SIZES",
    "official_test_indices", "official_pref_indices", "gpt_test_indices",
    "read_raw_lines", "paper_split", "candidate_labels", "numpy_labels",
    "OFFICIAL_FORMATS", "BANK_FORMATS", "official_formats", "bank_format",
    "Reference", "load_demonstrations", "reference_block",
    "zero_shot_messages", "few_shot_messages", "cot_messages", "bank_messages", "choose_messages",
    "gpt_few_shot_choose_messages", "judge_messages", "revise_messages", "feedback_line", "refine_needed",
    "PaperDecoding", "PAPER_DECODING",
    "clean_official", "clean_test_official", "clean_score_text", "clean_vote_official", "clean_refined",
    "strict_label", "official_answer", "is_correct",
    "self_consistency_vote", "cm_paper_rule", "cm_formula_rule", "official_bank", "load_official_bank",
]

OFFICIAL_SEED = 40  # MTC ~2968 and MBE ~565: random.seed(40) before every split draw
GPT_TEST_SEED = 10  # GPT ~2443: random.seed(10), and the GPT runs test on ALL of small (a shuffled copy)
UNKNOWN = "Unknown"  # MTC ~1918-1929 normalize_intents: capital U; it never equals a (lower-cased) prediction
EMPTY_FALLBACK = "superuser.com.txt"  # MTC ~2374/2561 ensure_nonempty: an empty cleaned prediction becomes this
TEST_SIZES = MappingProxyType({"banking77": 1540, "clinc": 2250, "massive_scenario": 1487, "mtop_intent": 2193,
                               "stackexchange": 2078})

DEPARTURES = MappingProxyType({
    "no_large_split": "stackexchange's large.jsonl is not published (the official repository's blob is absent), so "
                      "preference rows are drawn from small's non-test rows: random.seed(seed); "
                      "random.sample(sorted(non-test indices), int(fraction * len(small))); candidate labels are "
                      "np.unique of small's labels. The official code drew int(fraction * len(large)) rows of large.",
    "bank_value_order": "official_bank keeps the true labels of one key in first-seen order; the official code used "
                        "list(set(...)) (MBE ~852), whose order depends on PYTHONHASHSEED and is not reproducible. "
                        "The order only shows in the re-ask prompt's candidate list.",
    "set_answer_order": "clean_test_official: an answer like {'a', 'b'} (a multi-element set literal) keeps its first "
                        "element in textual order; the official list(set) order is hash-random.",
    "unicode_escape_error": "clean_official: when the official unicode_escape step would raise (e.g. a trailing "
                            "backslash), the official script crashed; we keep the undecoded text.",
    "similarity": "few-shot/CoT demonstrations are chosen in the official code by cosine of averaged word2vec vectors "
                  "(per-dataset models that are not published); a substitute embedding picks different neighbours "
                  "and prints a different 'Similarity:' number in the prompt.",
    "sampling_rng": "the official Llama runs sample without any torch seed; answers are not reproducible run to run.",
})


# --------------------------------------------------------------------------- splits

def official_test_indices(n_small: int, seed: int = OFFICIAL_SEED) -> list[int]:
    """Indices of small.jsonl's raw lines that form the test set (MTC ~2968-2977).

    The official code runs ``random.seed(40); random.sample(set(range(n)), int(0.5 * n))`` on Python 3.9, where
    ``sample`` turns a set into ``tuple(set)``. A set of the ints 0..n-1 iterates in ascending order in CPython
    (hash(i) == i, table larger than n), so that tuple equals ``range(n)`` and the draw is identical; Python 3.11
    refuses sets, hence the range. ``sample``'s algorithm and ``seed(int)`` are unchanged from 3.9 to 3.13.
    """
    rng = random.Random()
    rng.seed(seed)
    return rng.sample(range(n_small), int(0.5 * n_small))


def official_pref_indices(n_large: int, fraction: float, seed: int = OFFICIAL_SEED) -> list[int]:
    """Indices of large.jsonl's raw lines used as preference samples (MBE ~565-590), in draw order.

    Same draw as the official ``random.seed(40); random.sample(set(range(n)), int(fraction * n))``; the bank is
    built in this order. The official banks use fraction 0.01 and 0.05.
    """
    rng = random.Random()
    rng.seed(seed)
    return rng.sample(range(n_large), int(fraction * n_large))


def gpt_test_indices(n_small: int, seed: int = GPT_TEST_SEED) -> list[int]:
    """The GPT runs' test order (GPT ~2442-2454): ``random.seed(10)``, a permutation of ALL of small.

    The GPT runs therefore test on every row of small (no held-out half), unlike the Llama runs.
    """
    rng = random.Random()
    rng.seed(seed)
    return rng.sample(range(n_small), n_small)


def read_raw_lines(path: str | os.PathLike) -> list[dict]:
    """The records of a ClusterLLM jsonl file exactly as the official ``extract_inputs_and_labels`` sees them.

    One ``json.loads`` per line, nothing else: no de-duplication, no stripping, no lower-casing (MTC ~116-124,
    MBE ~553-561). Line order is kept because the seeded indices point into it.
    """
    rows = []
    with open(path, "r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
                record["input"], record["label"]  # noqa: B018 - the official code indexes both keys
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a ClusterLLM record ({e})") from None
            rows.append(record)
    return rows


def _examples(rows: Sequence[dict], indices: Iterable[int]) -> list[Example]:
    return [Example(text=rows[i]["input"], label=rows[i]["label"]) for i in indices]


def candidate_labels(rows: Sequence) -> list[str]:
    """The label set the prompts show: ``np.unique`` of the large split's labels, i.e. sorted by code point.

    Accepts raw records (dicts), ``Example`` objects or plain label strings. Used with large's rows, as the
    official code does (MTC ~174-180, MBE ~525-540); stackexchange has only small (see ``DEPARTURES``).
    """
    labels = []
    for r in rows:
        labels.append(r["label"] if isinstance(r, dict) else getattr(r, "label", r))
    return [str(x) for x in np.unique(np.asarray(labels, dtype=str))]


def numpy_labels(labels: Sequence[str]) -> str:
    """The label set exactly as the official f-strings print it: ``str(np.unique(labels))``.

    numpy's default print options (line width 75, threshold 1000) wrap the array over several lines, each
    continuation line starting with one space; pinned here so a caller's ``np.set_printoptions`` cannot change
    the prompt.
    """
    arr = np.unique(np.asarray(list(labels), dtype=str))
    with np.printoptions(linewidth=75, threshold=1000, edgeitems=3, legacy=False, formatter=None):
        return str(arr)


def paper_split(small_path: str | os.PathLike, large_path: str | os.PathLike | None, fraction: float,
                seed: int = OFFICIAL_SEED) -> tuple[list[Example], list[Example], dict]:
    """The official preference and test rows for one dataset.

    test: the raw lines of small at ``official_test_indices``; pref: the raw lines of large at
    ``official_pref_indices`` (the official code does not remove the few inputs that also occur in test; we do
    not either, and count them in ``info['pref_test_overlap']``). Without a large file (stackexchange) the
    preference rows come from small's non-test rows (a recorded departure).
    """
    small = read_raw_lines(small_path)
    test_idx = official_test_indices(len(small), seed)
    test = _examples(small, test_idx)
    departures: list[str] = []
    if large_path is not None and os.path.isfile(large_path):
        large = read_raw_lines(large_path)
        pref_idx = official_pref_indices(len(large), fraction, seed)
        pref = _examples(large, pref_idx)
        labels = candidate_labels(large)
        source, n_large = "large", len(large)
    else:
        pool = sorted(set(range(len(small))) - set(test_idx))
        rng = random.Random()
        rng.seed(seed)
        pref_idx = rng.sample(pool, int(fraction * len(small)))
        pref = _examples(small, pref_idx)
        labels = candidate_labels(small)
        source, n_large = "small-non-test", None
        departures.append(DEPARTURES["no_large_split"])
    test_inputs = {e.text for e in test}
    info = {
        "seed": seed, "fraction": fraction, "n_small": len(small), "n_large": n_large,
        "n_test": len(test), "n_pref": len(pref), "pref_source": source,
        "test_indices": test_idx, "pref_indices": pref_idx,
        "pref_test_overlap": sum(e.text in test_inputs for e in pref),
        "labels": labels, "departures": departures,
    }
    return pref, test, info


# --------------------------------------------------------------------------- prompts

def _fmt(label: str) -> str:
    """A format hint as the official code prints its one-element Python sets, e.g. ``{'weather'}``."""
    return repr({label})


# The four format hints per dataset that MTC and GPT print (MTC ~196-290, GPT ~160-260). clinc's are banking77
# labels in the official code; kept as they are, since they are part of the prompt text.
OFFICIAL_FORMATS = MappingProxyType({
    "banking77": ("Refund not showing up", "declined card payment", "card not working", "visa or mastercard"),
    "clinc": ("pending transfer", "transfer timing", "verify top up", "card payment wrong exchange rate"),
    "massive_scenario": ("weather", "alarm", "customer service", "currency exchange"),
    "mtop_intent": ("delete playlist music", "update reminder todo", "update reminder location",
                    "get track info music"),
    "stackexchange": ("engineering.stackexchange.com.txt", "writers.stackexchange.com.txt",
                      "wordpress.stackexchange.com.txt", "law.stackexchange.com.txt"),
})
# The bank prompt prints only the first hint, and MBE's differ for clinc ({'caring'}) (MBE ~273-300).
BANK_FORMATS = MappingProxyType({"banking77": "Refund not showing up", "clinc": "caring",
                                 "massive_scenario": "weather", "mtop_intent": "delete playlist music",
                                 "stackexchange": "engineering.stackexchange.com.txt"})


def official_formats(dataset: str | None, labels: Sequence[str] = ()) -> tuple[str, str, str, str]:
    """The dataset's four official format-hint labels; for a dataset the paper did not use, the first four labels
    of the sorted label set (cycled) stand in (a departure only for non-paper data)."""
    if dataset in OFFICIAL_FORMATS:
        return OFFICIAL_FORMATS[dataset]
    pool = sorted(labels) or [""]
    return tuple(pool[i % len(pool)] for i in range(4))  # type: ignore[return-value]


def bank_format(dataset: str | None, labels: Sequence[str] = ()) -> str:
    """The one format-hint label of the bank prompt (MBE ~273-300)."""
    return BANK_FORMATS[dataset] if dataset in BANK_FORMATS else official_formats(dataset, labels)[0]


def _resolve(dataset, formats, labels):
    return tuple(formats) if formats is not None else official_formats(dataset, labels)


def _msg(content: str, as_user_message: bool) -> list[dict]:
    """Llama runs pass the whole prompt as ONE system message through the chat template (MTC ~517); the GPT runs
    as ONE user message (GPT ~478)."""
    return [{"role": "user" if as_user_message else "system", "content": content}]


_PAD12 = " " * 12  # the official prompt blocks are indented f'''...''' strings (12 spaces in MTC and GPT)
_PAD4 = " " * 4  # ... and 4 in MBE


def _tail(*sentences: str) -> str:
    """The closing instructions: each sentence is appended after a blank line and one space."""
    return "".join("\n\n " + s for s in sentences)


_SAY_SET = "Please strictly identified the SINGLE most likely intention from the set {} and do not add any " \
           "additional information !!! ."
_SAY_SET_BARE = "Please strictly identified the SINGLE most likely intention from the set and do not add any " \
                "additional information !!! ."
_SAY_FROM = "Please strictly identified the SINGLE most likely intention from the {} and do not add any " \
            "additional information !!! ."
_SAY_ONLY = "Please strictly only provide identified intents and do not add any additional information !!! ."
_SAY_SHOW = "Please ensure that only show the intents and do not add any words or additional response please."
_SAY_CONCAT = "Concatenate reponse together in a single array."
_SAY_NOTHING = "Please do not show anything except responses."
_SAY_TOTAL = "Please ensure there are a total of 1 responses."


@dataclass(frozen=True)
class Reference:
    """One demonstration of ``output/selected_data_<dataset>.json``: its sentence (the JSON key), its intent, its
    ``chain_of_thoughts.expressed`` text, and the similarity to the query that the prompt prints."""

    text: str
    intent: str
    expressed: str
    similarity: float = 0.0


def load_demonstrations(path: str | os.PathLike) -> list[Reference]:
    """The CoT/few-shot demonstration pool, in file order (MTC ~205, GPT ~170).

    The official repository publishes it as ``output/selected_data_<dataset>.json``: a 5 % draw of large (500 /
    750 / 575 / 781 / 2500 sentences; not the preference draw) with a templated 'expressed' chain of thought
    (``The intent of this input is related to '<label>'.``). Similarities are left at 0 for the caller to fill.
    """
    with open(path, "r", encoding="utf-8") as fh:
        data = json.load(fh)
    return [Reference(text=k, intent=v["intent"], expressed=v["chain_of_thoughts"]["expressed"])
            for k, v in data.items()]


def reference_block(query: str, refs: Sequence[Reference]) -> str:
    """The demonstrations as the prompt prints them (MTC ~401-476 get_intent_chain_of_thought1/2): per
    reference, the query again, the example, its intent, the similarity to 4 decimals and the expressed CoT."""
    return "".join(f'\n\nThe sentence: "{query}"\nExample: "{r.text}"\nIntent: {r.intent}\n'
                   f"Similarity: {r.similarity:.4f}\nChain of thoughts (expressed) of example: {r.expressed}"
                   for r in refs)


def zero_shot_messages(query: str, labels: Sequence[str], *, dataset: str | None = None,
                       formats: Sequence[str] | None = None, as_user_message: bool = False) -> list[dict]:
    """The zero-shot prompt for one query (Llama: MTC ~480-505 agent_cot_0; GPT: GPT ~451-476).

    ``as_user_message=True`` gives the GPT runs' prompt: one user message AND its own wording (no "Identify the
    SINGLE ..." block and no "ensure that only show" line, one "total" line instead of two).
    """
    f = _resolve(dataset, formats, labels)
    shown = numpy_labels(labels)
    hint = f"{_fmt(f[0])},{_fmt(f[1])}"
    if as_user_message:
        block = f'\n{_PAD12}Query 1: "{query}"\n\n\n{_PAD12}Strictly follow the required format like {hint}.\n{_PAD12}'
        tail = _tail(_SAY_SET.format(shown), _SAY_ONLY, _SAY_CONCAT, _SAY_NOTHING, _SAY_TOTAL)
    else:
        block = (f'\n{_PAD12}Query 1: "{query}"\n\n{_PAD12}Identify the SINGLE most likely intention from this set:\n'
                 f"{_PAD12}{shown}\n\n{_PAD12}Strictly follow the required format like {hint}.\n{_PAD12}")
        tail = _tail(_SAY_SET.format(shown), _SAY_ONLY, _SAY_SHOW, _SAY_CONCAT, _SAY_NOTHING, _SAY_TOTAL, _SAY_TOTAL)
    return _msg(block + tail, as_user_message)


def _with_references(query, labels_text, refs, hint, as_user_message, with_total):
    """CoT and few-shot share one layout; they differ in the number of references and the closing lines."""
    head = (f'\n{_PAD12}Query 1: "{query}"\n{_PAD12}Reference (semantically similar example):\n'
            + reference_block(query, refs))
    if as_user_message:
        gap = "\n\n\n\n" if with_total else "\n"  # GPT CoT keeps three blank lines, GPT few-shot none
        block = f"{head}{gap}{_PAD12}Strictly follow the required format like {hint}.\n{_PAD12}"
        first = _SAY_FROM.format(labels_text)
    else:
        block = (f"{head}\n\n{_PAD12}Identify the SINGLE most likely intention from this set:\n"
                 f"{_PAD12}{labels_text}\n\n{_PAD12}Strictly follow the required format like {hint}.\n{_PAD12}")
        first = _SAY_SET_BARE
    sentences = [first, _SAY_ONLY, _SAY_SHOW, _SAY_CONCAT, _SAY_NOTHING] + ([_SAY_TOTAL] if with_total else [])
    return block + _tail(*sentences)


def cot_messages(query: str, labels: Sequence[str], reference: Reference, *, dataset: str | None = None,
                 formats: Sequence[str] | None = None, as_user_message: bool = False) -> list[dict]:
    """Chain-of-thought: the single most similar demonstration with its intent and expressed CoT (MTC ~547-575
    agent_cot; GPT ~486-514). The format hint is the first official one only."""
    f = _resolve(dataset, formats, labels)
    text = _with_references(query, numpy_labels(labels), [reference], _fmt(f[0]), as_user_message, True)
    return _msg(text, as_user_message)


def few_shot_messages(query: str, labels: Sequence[str], examples: Sequence[Reference], *,
                      dataset: str | None = None, formats: Sequence[str] | None = None,
                      as_user_message: bool = False) -> list[dict]:
    """Few-shot: the most similar demonstrations of the selected_data pool, each WITH its expressed CoT (the
    second, effective ``agent_fot`` definition: MTC ~678-705 with 5 references, GPT ~599-621 with 4). Pass the
    references already chosen (5 for Llama, 4 for GPT); no "total responses" line."""
    f = _resolve(dataset, formats, labels)
    text = _with_references(query, numpy_labels(labels), list(examples), _fmt(f[0]), as_user_message, False)
    return _msg(text, as_user_message)


def bank_messages(query: str, labels: Sequence[str], *, dataset: str | None = None,
                  format_label: str | None = None) -> list[dict]:
    """The memory-bank estimation prompt (MBE ~154-184, the second, effective ``prompting1``), one system
    message; the Llama bank is asked one query per call."""
    fmt = _fmt(format_label if format_label is not None else bank_format(dataset, labels))
    shown = numpy_labels(labels)
    p = _PAD4
    text = (f'\n{p}Query 1: "{query}"\n\n{p}Identify the SINGLE most likely intent from the following set:\n{p}{shown}'
            f"\n\n{p}Strictly follow the required format: {fmt}\n{p}"
            f"\n\n{p}IMPORTANT INSTRUCTIONS:\n\n"
            f"{p}- Only return the identified single intent from the provided set {shown}.\n"
            f"{p}- Do NOT provide any explanation, reasoning, or extra text.\n"
            f"{p}- Only respond with the intent string \u2014 nothing else.\n"
            f"{p}- Concatenate all responses into a single array.\n"
            f"{p}- Do not include any headings, comments, or formatting outside the array.\n{p}")
    return _msg(text, False)


def choose_messages(query: str, candidates: Sequence[str], *, dataset: str | None = None,
                    formats: Sequence[str] | None = None, as_user_message: bool = False) -> list[dict]:
    """CM's second call: pick one label among ONLY the bank's candidates (MTC ~1347-1412 agent11_batch; GPT
    ~968-1010). The candidates print as a Python list (the bank's JSON list), not as a numpy array; the same
    wording serves Llama (system) and GPT (user)."""
    f = _resolve(dataset, formats, candidates)
    text = (f' Considering the following query "{query}", must identifing the most likely single intention only '
            f"from the intention set \n{list(candidates)!r}. Ensure each response strictly adheres to the prescribed "
            f"format.\n\nProvide each response in the specified format: {_fmt(f[0])},{_fmt(f[1])},{_fmt(f[2])}. "
            "Do not include multiple outputs and input or explanatory text.\n\n Please ensure there are a total of "
            "one responses.")
    return _msg(text, as_user_message)


def gpt_few_shot_choose_messages(query: str, candidates: Sequence[str], examples: Sequence[Reference], *,
                                 dataset: str | None = None, formats: Sequence[str] | None = None) -> list[dict]:
    """The GPT runs re-ask few-shot+CM with the few-shot prompt itself, the candidate list in place of the label
    set (GPT ~568-596 agent_fot_unlearning, called from reprocess_single_intents_fot ~1097)."""
    f = _resolve(dataset, formats, candidates)
    text = _with_references(query, repr(list(candidates)), list(examples), _fmt(f[0]), True, False)
    return _msg(text, True)


def judge_messages(query: str, answer: str, labels: Sequence[str], *, as_user_message: bool = False) -> list[dict]:
    """Self-refine, step 1: is the answer right? (MTC ~842-876 / GPT ~665-692 generate_batch_feedback).

    Llama and GPT differ in one line ("   Intent:" vs "  Identified Intent:"). In the Llama runs the helper
    (MTC ~786 call_openai) sends it as a system message to Llama (T=0.7, top_p 0.9, 60 tokens).
    """
    pair = f"  Identified Intent: {answer}" if as_user_message else f"   Intent: {answer}"
    text = (f"Evaluate whether each identified intent from {numpy_labels(labels)} correctly matches its sentence.\n"
            "Respond ONLY with:\n- 'Correct' if it matches\n- 'Incorrect' if it doesn't\n\n"
            f"Evaluation pairs:\n1. Sentence: {query}\n{pair}")
    return _msg(text, as_user_message)


def feedback_line(judge_text: str | None) -> str:
    """The judge's verdict as the code keeps it: the first non-blank line, stripped; 'Unknown' when empty."""
    lines = [ln.strip() for ln in (judge_text or "").split("\n") if ln.strip()]
    return lines[0] if lines else UNKNOWN


def refine_needed(feedback: str) -> bool:
    """A revision is asked only when the verdict does not contain 'Correct' (case-sensitive, so 'Incorrect'
    does not count as correct) (MTC ~946 / GPT ~765)."""
    return "Correct" not in feedback


def revise_messages(query: str, answer: str, feedback: str, labels: Sequence[str], *,
                    as_user_message: bool = False) -> list[dict]:
    """Self-refine, step 2: revise given the verdict (the second, effective ``batch_self_refine``: MTC ~930-1000,
    GPT ~748-798). Two rounds of judge + revise in all.

    Official behaviour to know: in the Llama runs (MTC) the revision text is DISCARDED (the code keeps it only
    if it is a list, and it is a string), so Llama's self-refine answer is always its zero-shot answer; the GPT
    runs do use the revision.
    """
    shown = numpy_labels(labels)
    text = (f"Refine the current intents {[answer]!r} for the following 1 queries based on feedback {[feedback]!r}.\n"
            f"Select the final Single intent **only** from: [{shown}].\n"
            "Only modify an intent if the feedback suggests it is incorrect; otherwise, retain the original.\n\n"
            f"1. Query: {query}\n   Feedback: {feedback}\n   Current Intent: {answer}"
            "\n\nReturn exactly 1 outputs.\nFormat requirements:\n"
            "1. One single intent per query in the format: intent, intent1, intent2\n"
            "2. One intent per line, in order\n"
            f"3. Select single intent only from: [{shown}]\n"
            "4. No explanations or extra text")
    return _msg(text, as_user_message)


# --------------------------------------------------------------------------- decoding

@dataclass(frozen=True)
class PaperDecoding:
    """One call's sampling settings. ``top_p=None``: the API default (the GPT runs pass none). ``max_new_tokens``
    is Hugging Face's ``max_new_tokens`` for Llama and the API's ``max_tokens`` for GPT."""

    temperature: float
    top_p: float | None
    max_new_tokens: int
    do_sample: bool = True


PAPER_DECODING = MappingProxyType({
    # Llama-3-8B-Instruct, bf16, eos = [eos_token_id, <|eot_id|>] (MTC ~522-535)
    "llama_base": PaperDecoding(0.7, 0.9, 60),  # zero-shot / few-shot / CoT, main run
    "llama_base_t01": PaperDecoding(0.1, 0.9, 60),  # the second run (MTC ~2989 temperatures=[0.7, 0.1])
    "llama_choose": PaperDecoding(0.7, 0.9, 60),  # CM re-ask: T hard-coded to 0.7 even in the T=0.1 run (~1709)
    "llama_refine": PaperDecoding(0.7, 0.9, 60),  # judge and revise (MTC ~814 call_openai)
    "llama_bank": PaperDecoding(0.7, 0.9, 30),  # MBE ~212: 0.7 even for the files named _0.1 / _0.5
    # GPT-3.5-turbo / GPT-4o-mini (GPT ~478, ~1002, ~644)
    "gpt_base": PaperDecoding(0.7, None, 10),
    "gpt_choose": PaperDecoding(0.7, None, 20),
    "gpt_few_shot_choose": PaperDecoding(0.7, None, 10),
    "gpt_refine": PaperDecoding(0.7, None, 20),
})


# --------------------------------------------------------------------------- cleaning and scoring

_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"")
_BRACKETS = re.compile(r"[\[\]{}]")
_BRACED = re.compile(r"{(.+?)}")
_WORD_RUN = re.compile(r"[{'\"]?([\w\s.\-]+)[}'\"]?")


def _first_quoted(text: str) -> str | None:
    m = _QUOTED.search(text)
    return None if m is None else (m.group(1) or m.group(2))


def clean_official(text: str) -> str:
    """A raw bank answer as the memory bank keys it (MBE ~620-650: ``strip("{''}")`` then
    ``normalize_one_to_one``).

    Steps, in order: strip the characters ``{ ' }`` (not whitespace) from both ends; strip whitespace; decode
    backslash escapes (``unicode_escape``, which also turns non-ASCII letters into mojibake, as the official code
    does); take the first single- or double-quoted value, stripped, else delete every bracket and brace and
    strip; lower-case. Lines are not split: a multi-line answer stays one (multi-line) key.
    """
    if not isinstance(text, str):
        return "unknown"
    item = text.strip("{'}").strip()
    try:
        item = item.encode("utf-8").decode("unicode_escape")
    except UnicodeDecodeError:
        pass  # the official script would stop here (DEPARTURES["unicode_escape_error"])
    quoted = _first_quoted(item)
    cleaned = quoted.strip() if quoted is not None else _BRACKETS.sub("", item).strip()
    return cleaned.lower()


def clean_score_text(text) -> str:
    """One answer string as the scorer reads it (MTC ~2278-2316 to_single_nested_list): strip; the first quoted
    value if any, else the whole text; lower-cased and stripped; 'Unknown' when nothing is left."""
    if not isinstance(text, str):
        return UNKNOWN
    item = text.strip()
    quoted = _first_quoted(item)
    candidate = quoted.lower().strip() if quoted is not None else item.lower().strip()
    return candidate or UNKNOWN


def _braced_values(line: str) -> list | None:
    """The elements of the first ``{...}`` literal of a line (a set's elements, a dict's keys), or None when the
    line has none or it does not parse (MTC ~1797-1834 normalize_response)."""
    found = _BRACED.findall(line)
    if not found:
        return None
    inner = found[0]
    try:
        value = ast.literal_eval("{" + inner + "}")
    except Exception:  # noqa: BLE001 - literal_eval raises many kinds; the official code catches all
        return None
    if isinstance(value, set) and len(value) > 1:  # hash order officially; textual order here (DEPARTURES)
        return sorted(value, key=lambda v: (inner.find(v) if isinstance(v, str) else -1, repr(v)))
    return list(value)


def clean_test_official(text: str) -> str:
    """A base method's raw answer as the official test scorer reads it (MTC ~2247-2345 normalize_response then
    to_single_nested_list; only the first element is scored, MTC ~2571-2583 ensure_triple_nested).

    The text is stripped and split into lines; the FIRST line counts. A line holding a ``{...}`` literal that
    parses gives that literal's first element ({'alarm'} -> alarm; {'intent': 'alarm'} -> 'intent', a dict's
    key); otherwise the line itself. That string is then cleaned by ``clean_score_text``. An empty literal
    leaves nothing, which the official code replaces with 'superuser.com.txt'.
    """
    first = text.strip().split("\n")[0]
    values = _braced_values(first)
    if values is None:
        return clean_score_text(first.strip())
    if not values:
        # '{ }' on the first line: the official list for this line is empty; later lines would follow it
        rest = text.strip().split("\n")[1:]
        return clean_test_official("\n".join(rest)) if rest else EMPTY_FALLBACK
    return clean_score_text(values[0]) if isinstance(values[0], str) else UNKNOWN


def clean_vote_official(text: str) -> str:
    """A raw answer as the vote and the bank lookup see it (MTC ~1985-2060: two successive ``clean_intents``).

    First strip whitespace, then the characters ``{}``, then ``[]``, then ``'``, then ``"`` from both ends; then
    keep the first run of word characters, whitespace, dots and hyphens (so "reverted card payment?" loses its
    '?', and "Intent: alarm" becomes "Intent"); an empty answer or a bare '{}' gives 'Unknown'. Not lower-cased
    yet: ``strict_label`` does that.
    """
    item = text.strip().strip("{}").strip("[]").strip("'").strip('"')
    if not item or item.strip() == "{}":
        return UNKNOWN
    runs = _WORD_RUN.findall(item)
    return runs[0].strip() if runs else UNKNOWN


def clean_refined(text) -> str:
    """A self-refine answer as kept between rounds (MTC ~1023-1030 clean_intents: strip whitespace, then ``{}``,
    ``[]``, ``'``, ``"`` from both ends); an empty result becomes 'Unknown' (GPT ~918)."""
    if isinstance(text, list):
        text = text[0] if text else ""
    item = str(text).strip().strip("{}").strip("[]").strip("'").strip('"')
    return item or UNKNOWN


def strict_label(text: str, labels: Iterable[str]) -> str:
    """The answer if, stripped and lower-cased, it IS a label (exact, case-sensitive comparison with the labels
    as the data spell them), else 'Unknown' (MTC ~1918-1929 normalize_intents).

    Because the answer is lower-cased and the labels are not, a label with a capital letter (banking77's
    'Refund not showing up') can never be returned: official behaviour, kept.
    """
    cleaned = text.strip().lower()
    return cleaned if cleaned in set(labels) else UNKNOWN


def official_answer(raw: str, labels: Iterable[str]) -> str:
    """The label (or 'Unknown') that the vote and the bank lookup use for a raw base answer."""
    return strict_label(clean_vote_official(raw), labels)


def is_correct(prediction: str, gold: str) -> bool:
    """Official score: the cleaned prediction equals the gold label exactly (MTC ~2797 compare_sets)."""
    return prediction == gold


# --------------------------------------------------------------------------- self-consistency and CM

def self_consistency_vote(zero_shot: str, few_shot: str, cot: str, refine: str | None = None) -> str:
    """Majority vote over the cleaned answers (MTC ~2128-2137; GPT ~1597-1606 adds self-refine as 2nd voter).

    Voter order is zero-shot, [self-refine,] few-shot, CoT. A tie goes to the answer that appears first in that
    order (``Counter.most_common(1)`` returns the first maximal entry); with three voters a tie means three
    different answers, so zero-shot wins; with four, any 2-2 tie includes zero-shot's answer. Answers are
    compared as strings before lower-casing ('Alarm' and 'alarm' are different votes).
    """
    votes = [zero_shot] + ([refine] if refine is not None else []) + [few_shot, cot]
    counts = Counter(votes)
    best = max(counts.values())
    return next(v for v in votes if counts[v] == best)


def _candidates(answer: str, bank: Mapping[str, Sequence[str]]) -> list[str] | None:
    value = bank.get(answer)
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def cm_paper_rule(base_answer: str, bank: Mapping[str, Sequence[str]]) -> tuple[str | None, list[str] | None]:
    """CM at inference as coded (MTC ~1316-1341 batch_map_intents, ~2152-2230, ~1687-1717 reprocess).

    ``base_answer`` is the label or 'Unknown' from ``official_answer``. Its bank entry is looked up: with more
    than one candidate the answer is ``None`` and the candidates are returned (re-ask with ``choose_messages``,
    whose raw answer is scored by ``clean_test_official`` and NOT checked against the candidates); otherwise
    (no entry, or one candidate) the base answer is kept, even when the single candidate differs from it.
    """
    cands = _candidates(base_answer, bank)
    if cands is not None and len(cands) > 1:
        return None, cands
    return base_answer, cands


def cm_formula_rule(base_answer: str, bank: Mapping[str, Sequence[str]]) -> tuple[str | None, list[str] | None]:
    """The paper's marginalization p(y'|x) = sum_y p(y'|y,x) p(y|x): like ``cm_paper_rule`` except that a
    single-candidate entry maps the answer TO that candidate (the official code keeps the base answer)."""
    cands = _candidates(base_answer, bank)
    if cands is not None and len(cands) == 1:
        return cands[0], cands
    if cands is not None and len(cands) > 1:
        return None, cands
    return base_answer, cands


def official_bank(pairs: Iterable[tuple[str, str]], *, clean: bool = True) -> dict[str, list[str]]:
    """The memory bank ``{cleaned answer: [distinct true labels seen with it]}`` (MBE ~836-852).

    ``pairs`` are (raw model answer, true label) in preference-draw order; ``clean=False`` takes answers already
    cleaned. Keys keep first-seen order, like the official dict; labels keep first-seen order (the official
    ``list(set(...))`` order is hash-random, see DEPARTURES). Keys need not be labels, and a key's list need not
    contain the key.
    """
    bank: dict[str, list[str]] = {}
    for answer, label in pairs:
        key = clean_official(answer) if clean else answer
        seen = bank.setdefault(key, [])
        if label not in seen:
            seen.append(label)
    return bank


def load_official_bank(path: str | os.PathLike) -> dict[str, list[str]]:
    """A published bank (``meta_memorisation_estimated/Memory_Masking_<dataset>_<fraction>_0.7_1.json``)."""
    with open(path, "r", encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: not a bank (a JSON object of lists)")
    return {str(k): [str(x) for x in v] for k, v in data.items()}
