"""Methods on fake backends (calibration, the generation fallback, answer cleaning, the metrics), then end to end
on the embedded SmolLM2-135M-Instruct (CPU): fast trie scoring equals naive scoring, and CM moves a zero-shot model
onto a user's own wording of the labels.

The embedded-model tests are kept tiny on purpose (one prompt; 6 labels, 30 preference samples, 20 test queries):
scoring costs a few ms per candidate token on an idle CPU core, far more on a busy one.
"""
from __future__ import annotations

import numpy as np
import pytest

from cm_core import prompts
from cm_core.backends.base import LLM, CandidateScore, ScoreRequest
from cm_core.bank import MemoryBank
from cm_core.cm import CM
from cm_core.data import Dataset, Example, load_dataset
from cm_core.evaluate import accuracy, bootstrap_ci, macro_f1, mcnemar_p, run_evaluation
from cm_core.methods import Decoding, FewShot, FewShotFixed, ZeroShot, clean_answer, match_label

# the user's own names for six clearly distinct massive_scenario labels
SLANG = {"alarm": "wake-up buzz", "weather": "sky report", "music": "tunes", "cooking": "grub",
         "transport": "ride", "news": "headlines"}


# --------------------------------------------------------------------------- methods on fake backends

class BiasedScorer(LLM):
    """Log-probabilities with a strong prior for "tunes": on a real query the right label scores -1 and the
    others -3, but "tunes" always gets +2.5 (so it wins uncalibrated); the content-free input reveals the prior."""

    kind, supports_scores = "fake", True

    def __init__(self, gold: dict[str, str]):
        super().__init__("biased")
        self.gold = gold
        self.requests: list[ScoreRequest] = []

    def generate(self, requests):
        raise AssertionError("score mode must not generate")

    def score(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            query = r.messages[-1][1].removeprefix("Query: ").removesuffix("\nLabel:")
            right = self.gold.get(query)
            out.append([CandidateScore((-1.0 if c == right else -3.0) + (2.5 if c == "tunes" else 0.0), 1)
                        for c in r.candidates])
        return out


class Voter(LLM):
    """No log-probabilities: answers by generation, 3 of 5 samples the right label, 2 something else."""

    kind, supports_scores = "fake", False

    def __init__(self, gold: dict[str, str]):
        super().__init__("voter")
        self.gold, self.ns = gold, []

    def generate(self, requests):
        out = []
        for r in requests:
            self.ns.append(r.n)
            query = r.messages[-1][1].removeprefix("Query: ").removesuffix("\nLabel:")
            out.append(([f"Label: {self.gold[query]}."] * 3 + ["tunes", "I think it is nothing"])[: r.n])
        return out


GOLD = {"will it rain": "sky report", "wake me at six": "wake-up buzz", "play jazz": "tunes"}
LABELS = ["sky report", "tunes", "wake-up buzz"]


def test_calibration_removes_the_label_prior():
    llm = BiasedScorer(GOLD)
    raw = ZeroShot(llm, LABELS, Decoding(calibrate=False, list_labels=False)).predict(list(GOLD))
    assert [p.label for p in raw] == ["tunes"] * 3
    cal = ZeroShot(llm, LABELS, Decoding(calibrate=True, list_labels=False)).predict(list(GOLD))
    assert [p.label for p in cal] == [GOLD[q] for q in GOLD]
    assert {r.messages[-1][1] for r in llm.requests} >= {f"Query: {prompts.CONTENT_FREE}\nLabel:"}
    for p in cal:
        assert sum(p.probs.values()) == pytest.approx(1.0) and max(p.probs, key=p.probs.get) == p.label
    # restricted candidates (CM's second call) are scored among themselves only
    sub = ZeroShot(llm, LABELS, Decoding(list_labels=False)).predict(["will it rain"], [["tunes", "wake-up buzz"]])
    assert set(sub[0].probs) == {"tunes", "wake-up buzz"}


class CopyingScorer(BiasedScorer):
    """A model that copies its demonstrations: every label shown as an example's label gets +2, content-free input
    or not; on a real query the right label scores -1 and the others -3."""

    def score(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            text = r.messages[-1][1]
            right = self.gold.get(text.rsplit("Query: ", 1)[-1].removesuffix("\nLabel:"))
            out.append([CandidateScore((-1.0 if c == right else -3.0) + (2.0 if f"Label: {c}\n" in text else 0.0), 1)
                        for c in r.candidates])
        return out


def test_retrieved_demonstrations_are_not_calibrated_away():
    """Calibrating with the demonstrations retrieved for a query scores their labels as the prior and cancels the
    retrieval; few-shot calibrates on the content-free input without them (the fixed-demonstration variant keeps
    its demonstrations, which are the same for every query)."""
    gold = {"will it rain": "sky report", "wake me at six": "wake-up buzz", "play jazz": "tunes"}
    samples = [Example("rain tomorrow?", "sky report"), Example("buzz me at 7", "wake-up buzz"),
               Example("some jazz please", "tunes")]

    class Near:  # each query retrieves the one sample with its own label, then a wrong one
        def encode(self, texts):
            key = {"rain": 0, "buzz": 1, "wake": 1, "jazz": 2}
            return np.array([[1.0 if any(w in t and key[w] == j for w in key) else 0.0 for j in range(3)]
                             for t in texts])

    llm = CopyingScorer(gold)
    method = FewShot(llm, LABELS, Decoding(list_labels=False), k=2, embedder=Near()).fit(samples)
    preds = method.predict(list(gold))
    assert [p.label for p in preds] == [gold[q] for q in gold]
    calib = [r for r in llm.requests if prompts.CONTENT_FREE in r.messages[-1][1]]
    assert calib and all("Examples:" not in r.messages[-1][1] for r in calib)
    assert {r.messages[-1][1] for r in calib} == {f"Query: {prompts.CONTENT_FREE}\nLabel:"}  # zero-shot's own
    fixed = FewShotFixed(CopyingScorer(gold), LABELS, Decoding(list_labels=False), k=2).fit(samples)
    fixed.predict(["play jazz"])
    assert all("Examples:" in r.messages[-1][1] for r in fixed.llm.requests)


def test_content_free_input_is_scored_once_per_candidate_set():
    """Calibration must not double the cost of an uncached backend: one content-free request per distinct
    (prompt, candidate set), across batches and predict calls, with the same answers as a fresh method."""
    llm = BiasedScorer(GOLD)
    method = ZeroShot(llm, LABELS, Decoding(calibrate=True, list_labels=False, batch_size=2))
    first = method.predict(list(GOLD))
    again = method.predict(list(GOLD)[:1], [["tunes", "wake-up buzz"]])
    again += method.predict(list(GOLD), [["tunes", "wake-up buzz"], LABELS, LABELS])
    content_free = [r for r in llm.requests if prompts.CONTENT_FREE in r.messages[-1][1]]
    assert sorted(r.candidates for r in content_free) == sorted([("tunes", "wake-up buzz"), tuple(LABELS)])
    assert len(llm.requests) == len(content_free) + 3 + 1 + 3
    fresh = ZeroShot(BiasedScorer(GOLD), LABELS, Decoding(calibrate=True, list_labels=False))
    assert [p.probs for p in first] == [p.probs for p in fresh.predict(list(GOLD))]
    assert again[0].probs == again[1].probs and again[2].label == GOLD["wake me at six"]


def test_cm_prepares_its_choices_at_fit_time():
    """The hard form's second call costs one scoring request per query: the content-free scores of every bank
    entry with several candidates are computed when the bank is fitted (adaptation), not per query."""
    llm = BiasedScorer(GOLD)
    base = ZeroShot(llm, LABELS, Decoding(list_labels=False))
    chooser = ZeroShot(llm, LABELS, Decoding(list_labels=True))
    bank = MemoryBank.from_pairs([("sky report", "sky report"), ("sky report", "wake-up buzz"), ("tunes", "tunes")])
    cm = CM(base, chooser, bank=bank, prefit=True).fit([])
    assert [r.candidates for r in llm.requests] == [("sky report", "wake-up buzz")]  # the one choice, content-free
    assert prompts.CONTENT_FREE in llm.requests[0].messages[-1][1]
    llm.requests.clear()
    preds = cm.predict(["will it rain", "play jazz"])
    assert [p.info["action"] for p in preds] == ["choose", "map"]
    content_free = [r for r in llm.requests if prompts.CONTENT_FREE in r.messages[-1][1]]
    assert [r.candidates for r in content_free] == [tuple(LABELS)]  # the base's own calibration only
    assert len(llm.requests) == 2 + 1 + 1  # two base queries, base calibration, ONE second call
    direct = ZeroShot(BiasedScorer(GOLD), LABELS, Decoding(list_labels=True)).predict(
        ["will it rain"], [["sky report", "wake-up buzz"]])[0]
    assert (preds[0].label, preds[0].probs) == (direct.label, direct.probs)
    soft = CM(ZeroShot(BiasedScorer(GOLD), LABELS), form="soft", bank=bank, prefit=True).fit([])
    assert soft.base.llm.requests == []  # no second call in the soft form, so nothing to prepare


def test_score_mode_without_logprobs_votes_by_generation():
    llm = Voter(GOLD)
    method = ZeroShot(llm, LABELS, Decoding(mode="score", n_votes=5, list_labels=False))
    preds = method.predict(list(GOLD))
    assert llm.ns == [5, 5, 5]
    for q, p in zip(GOLD, preds):
        assert p.label == GOLD[q]
        expected = {lab: 0.0 for lab in LABELS}
        expected[GOLD[q]] += 0.6
        expected["tunes"] += 0.2  # the unmatched fifth sample counts in the denominator only
        assert p.probs == pytest.approx(expected)


def test_answer_cleaning_and_matching():
    assert clean_answer('Label: "Sky Report".\nbecause it rains') == "sky report"
    assert clean_answer("  [Wake-up   Buzz] ") == "wake-up buzz"
    assert clean_answer("") == ""
    assert match_label("Answer: TUNES", LABELS) == ("tunes", True)
    assert match_label("this is a sky report for sure", LABELS) == ("sky report", True)
    assert match_label("this is a sky report for sure", LABELS, strict=True) == ("this is a sky report for sure",
                                                                                  False)
    assert match_label("weather", LABELS) == ("weather", False)  # kept as said, counts as wrong


def test_metrics_by_hand():
    gold = ["a", "a", "b", "b", "b", "a"]
    assert accuracy(gold, ["a", "b", "b", "b", "a", "a"]) == pytest.approx(4 / 6)
    # a prediction outside the gold labels is an error, not a class of its own
    assert macro_f1(["a", "a", "b"], ["a", "c", "b"]) == pytest.approx((2 / 3 + 1.0) / 2)
    # McNemar: 6 discordant pairs, all in favour of the new predictions -> two-sided p = 2 * 0.5**6
    base = ["x"] * 6
    assert mcnemar_p(gold, base, gold) == pytest.approx(2 * 0.5 ** 6)
    assert mcnemar_p(gold, gold, gold) == 1.0
    preds = ["a", "b", "b", "b", "a", "a"] * 5
    lo, hi = bootstrap_ci(gold * 5, preds, seed=1)
    assert lo <= accuracy(gold * 5, preds) <= hi and hi - lo > 0.05
    assert bootstrap_ci(gold * 5, preds, seed=1) == [lo, hi]  # seeded
    assert bootstrap_ci(gold, gold) == [1.0, 1.0]


# --------------------------------------------------------------------------- the embedded model

@pytest.mark.slow
def test_trie_scoring_equals_naive_scoring(embedded_raw):
    # shared prefixes ("play", "play music", "play radio"; "alarm", "alarm clock") exercise the trie
    labels = ["play", "play music", "play radio", "alarm", "alarm clock", "weather", "email", "calendar",
              "cooking", "iot"]
    req = ScoreRequest.of(prompts.zero_shot("wake me up at seven tomorrow", labels), labels)
    fast = embedded_raw.score([req])[0]
    slow = embedded_raw.naive_score(req)
    assert len(fast) == len(slow) == len(labels)
    for lab, f, s in zip(labels, fast, slow):
        assert f.n_tokens == s.n_tokens, lab
        assert f.logprob == pytest.approx(s.logprob, abs=1e-3), lab
        assert f.logprob < 0
    # the candidates are not all alike: the comparison above is not between constants
    assert max(s.logprob for s in slow) - min(s.logprob for s in slow) > 0.5


@pytest.mark.slow
def test_batched_scoring_equals_one_query_at_a_time(embedded_raw):
    # prompts of different lengths (left padding) and tries of different sizes (right padding) in one pass
    reqs = [
        ScoreRequest.of(prompts.zero_shot("hi", ["greeting", "goodbye"]), ["greeting", "goodbye"]),
        ScoreRequest.of(prompts.zero_shot("my card was charged twice for the same coffee, please refund it",
                                          ["card payment", "card payment fee charged", "refund", "top up"]),
                        ["card payment", "card payment fee charged", "refund", "top up"]),
        ScoreRequest.of(prompts.zero_shot("what's the weather", ["weather"]), ["weather"]),
    ]
    old = embedded_raw.score_batch_size
    try:
        embedded_raw.score_batch_size = 3
        batched = embedded_raw.score(reqs)
        embedded_raw.score_batch_size = 1
        single = embedded_raw.score(reqs)
    finally:
        embedded_raw.score_batch_size = old
    for req, bs, ss in zip(reqs, batched, single):
        naive = embedded_raw.naive_score(req)
        for b, s, n in zip(bs, ss, naive):
            assert b.n_tokens == s.n_tokens == n.n_tokens
            assert b.logprob == pytest.approx(s.logprob, abs=1e-3)
            assert b.logprob == pytest.approx(n.logprob, abs=1e-3)
        assert len({round(n.logprob, 2) for n in naive}) == len(naive)  # distinct values, not constants


@pytest.mark.slow
def test_shared_prompt_prefix_is_encoded_once_and_changes_nothing(embedded_raw):
    """CM's second calls for one bank entry (and their content-free calibration) share the system message with
    its listed labels: that prefix's KV cache is computed once and reused, with the scores of a full pass."""
    cands = ["card payment", "refund", "top up"]
    reqs = [ScoreRequest.of(prompts.zero_shot(q, cands), cands)
            for q in ("my card was charged twice", prompts.CONTENT_FREE, "how do I add money")]
    reqs.append(ScoreRequest.of(prompts.zero_shot("add money", cands[:2]), cands[:2]))  # another prefix
    old = (embedded_raw.prefix_caching, embedded_raw.score_batch_size)
    try:
        embedded_raw.prefix_caching, embedded_raw.score_batch_size = False, 1
        full = embedded_raw.score(reqs)
        embedded_raw.prefix_caching = True
        embedded_raw._prefixes.clear()
        hits = embedded_raw.stats.extra.get("prefix_hits", 0)
        cached = embedded_raw.score(reqs)
        assert embedded_raw.stats.extra["prefix_hits"] - hits == 2  # requests 2 and 3 reuse request 1's prefix
        assert len(embedded_raw._prefixes) == 2
        embedded_raw.score_batch_size = 4  # one pass: only the part common to all four prompts is shared
        batched = embedded_raw.score(reqs)
    finally:
        embedded_raw.prefix_caching, embedded_raw.score_batch_size = old
    for f, c, b in zip(full, cached, batched):
        for x, y, z in zip(f, c, b):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-3) and x.logprob == pytest.approx(z.logprob, abs=1e-3)
    assert len({round(x.logprob, 2) for x in full[0]}) == 3


@pytest.mark.slow
def test_batched_generation_equals_one_request_at_a_time(embedded_raw):
    """Each sampled reply draws from its own seeded generator, and a batch shares the prefix its prompts have in
    common: a reply is the same whichever requests share its batch, greedy and sampled, with several draws."""
    from cm_core.backends.base import GenRequest
    msgs = [prompts.zero_shot(q, ["card payment", "refund", "top up"])
            for q in ("my card was charged twice", "how do I add money to my account please", "refund")]
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.9)):
        reqs = [GenRequest.of(m, n=2 if i == 1 else 1, max_tokens=12, seed=10 + i, **kw) for i, m in enumerate(msgs)]
        together = embedded_raw.generate(reqs)
        alone = [embedded_raw.generate([r])[0] for r in reqs]
        assert together == alone
        assert [len(t) for t in together] == [1, 2, 1] and all(x.strip() for t in together for x in t)
    other_seed = embedded_raw.generate([GenRequest.of(msgs[1], n=2, max_tokens=12, seed=99, temperature=0.9,
                                                      top_p=0.9)])[0]
    assert other_seed != together[1]  # the seed matters: replies are draws, not one fixed text


def _slang_dataset() -> Dataset:
    """massive_scenario rows of the six labels, gold renamed to the user's slang. The candidate label set the
    model is shown stays the original names (what a small model understands): the user's wording is exactly
    what zero-shot cannot produce and what CM's memory bank has to learn from the preference samples."""
    ds = load_dataset("massive_scenario")
    rows = [Example(e.text, SLANG[e.label]) for e in ds.examples if e.label in SLANG]
    return Dataset("massive_scenario:slang", rows, labels=sorted(SLANG))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~70 scoring calls: well under a minute on an idle CPU, many minutes on a busy one
def test_cm_learns_the_users_wording(embedded_llm, data_dir):
    ds = _slang_dataset()
    assert not set(ds.labels) & set(SLANG.values())
    res = run_evaluation(ds, embedded_llm, ["zero_shot+cm"], pref_count=30, n_test=20, seed=40, stratified=True,
                         decoding=Decoding(seed=40, list_labels=False), n_boot=500)

    cfg = res["config"]
    assert cfg["seed"] == 40 and cfg["dataset"] == "massive_scenario:slang"
    assert cfg["model"] == embedded_llm.identity() and cfg["model"]["kind"] == "embedded"
    assert cfg["n_test"] == 20 and cfg["pref_count"] == 30 and cfg["scoring"] == "score"
    for name in ("zero_shot", "zero_shot+cm"):
        r = res["results"][name]
        assert r["n"] == 20
        assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
        assert 0 <= r["macro_f1"] <= 1
        assert r["accuracy"] == pytest.approx(accuracy(res["gold"], res["predictions"][name]))
    cm = res["results"]["zero_shot+cm"]
    assert 0 <= cm["p_value"] <= 1 and cm["base"] == "zero_shot"
    assert sum(cm["actions"].values()) == 20

    gold, base, final = res["gold"], res["predictions"]["zero_shot"], res["predictions"]["zero_shot+cm"]
    assert set(gold) <= set(SLANG.values()) and set(base) <= set(SLANG)  # the model answers in its own words
    assert res["results"]["zero_shot"]["accuracy"] == 0.0

    # every CM answer follows the memory bank estimated from the model's own answers on the preference samples
    bank = res["banks"]["zero_shot"]["bank"]["counts"]
    assert res["banks"]["zero_shot"]["stats"]["samples"] == 30
    assert {lab for row in bank.values() for lab in row} <= set(SLANG.values())
    for b, f in zip(base, final):
        cands = bank.get(b, {})
        if not cands:
            assert f == b
        elif len(cands) == 1:
            assert f == next(iter(cands))
        else:
            assert f in cands

    # and it pays off: CM beats zero-shot, and beats always answering the most frequent test label
    majority = max(gold.count(g) for g in set(gold)) / len(gold)
    assert cm["accuracy"] > res["results"]["zero_shot"]["accuracy"]
    assert cm["accuracy"] > majority, (cm["accuracy"], majority, list(zip(gold, base, final)))


def test_self_consistency_draws_the_same_bank_answer_in_every_process():
    """Its p(ŷ|x) is built over the union of its voters' labels; draw() samples by position, so that union must
    have a fixed order. A set's order of strings changes with the process's hash seed: run two seeds."""
    import subprocess
    import sys
    code = ("from cm_core.methods import SelfConsistency, Prediction, draw\n"
            "class V:\n"
            "    def __init__(self, probs): self.probs = probs\n"
            "    def fit(self, s): pass\n"
            "    def predict(self, texts, candidates=None): return [Prediction(max(self.probs, key=self.probs.get), "
            "dict(self.probs)) for _ in texts]\n"
            "labels = [f'label {i}' for i in range(12)]\n"
            "voters = [V({l: (i + 1.0) for i, l in enumerate(labels)}), V({l: 1.0 for l in labels[::-1]})]\n"
            "from cm_core.data import Example\nsc = SelfConsistency(None, labels, voters=voters).fit([Example('x', labels[0])])\n"
            "preds = sc.predict([f'q{i}' for i in range(30)])\n"
            "print(list(preds[0].probs) == sorted(preds[0].probs), draw([f'q{i}' for i in range(30)], preds, 0.7, 0))\n")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and next(iter(outs)).startswith("True")
