"""The shrunk bank: the conditional by hand, the leave-one-out choice of its strength, and the hard and soft forms."""
from __future__ import annotations

import math

import pytest

from cm_core import registry
from cm_core.bank import MemoryBank
from cm_core.cm import CM
from cm_core.data import Example
from cm_core.marginalize import decide_shrunk, soft_marginalize
from cm_core.shrink import FLOOR, choose_alpha, loo_loglik, shrunk_conditional

LABELS = {"music", "radio", "news", "weather"}


def test_shrunk_conditional_by_hand():
    assert shrunk_conditional("music", {"radio": 1}, 1.0, LABELS) == pytest.approx({"radio": 0.5, "music": 0.5})
    assert shrunk_conditional("music", {"radio": 1, "music": 1}, 2.0, LABELS) == pytest.approx(
        {"radio": 0.25, "music": 0.75})
    # the model's own word is not a user label: nothing to keep, the counts alone
    assert shrunk_conditional("songs", {"radio": 1, "music": 3}, 8.0, LABELS) == pytest.approx(
        {"radio": 0.25, "music": 0.75})
    assert shrunk_conditional("songs", {}, 8.0, LABELS) == {}
    assert shrunk_conditional("music", {}, 0.0, LABELS) == {}


def test_leave_one_out_likelihood_by_hand():
    counts = {"music": {"music": 2, "radio": 1}}
    k = len(LABELS)
    # alpha 0: leaving out a "music" sample leaves {music: 1, radio: 1} -> 1/2; leaving out "radio" -> 0
    want = (2 * math.log((1 - FLOOR) * 0.5 + FLOOR / k) + math.log(FLOOR / k)) / 3
    assert loo_loglik(counts, 0.0, LABELS) == pytest.approx(want)
    # alpha 1: music held out -> (1 + 1) / (2 + 1); radio held out -> 0 / 3
    want = (2 * math.log((1 - FLOOR) * 2 / 3 + FLOOR / k) + math.log(FLOOR / k)) / 3
    assert loo_loglik(counts, 1.0, LABELS) == pytest.approx(want)


def test_the_data_decide_how_much_to_shrink():
    # the model is usually right, with a few lone deviations: keep ŷ unless the evidence is strong
    mostly_right = {"music": {"music": 5, "radio": 1}, "news": {"news": 4, "weather": 1}, "weather": {"weather": 6},
                    "radio": {"music": 1}}
    assert choose_alpha(mostly_right, LABELS)["alpha"] > 0
    # the model's words are never the user's: nothing to keep, so no shrinkage at all
    own_words = {"songs": {"music": 3, "radio": 1}, "headlines": {"news": 4}, "forecast": {"weather": 2}}
    chosen = choose_alpha(own_words, LABELS)
    assert chosen["alpha"] == 0.0 and len(chosen["loo_loglik"]) > 1
    # a consistent renaming (the user always says radio for music): keeping would be wrong
    renamed = {"music": {"radio": 6}, "radio": {"music": 5}}
    assert choose_alpha(renamed, LABELS)["alpha"] == 0.0


def test_standard_error_rule_needs_clear_evidence_to_trust_the_bank():
    """One repeated deviation among lone ones is the best fit by a hair: the rule keeps ŷ (the largest alpha within
    two standard errors); the same kind of deviation repeated in many rows is clear, and alpha stays 0."""
    lone = {f"a{i}": {f"b{i}": 1, f"c{i}": 1} for i in range(20)}  # rows that say nothing about alpha
    thin = {**lone, "music": {"radio": 2, "news": 1}}
    labels = LABELS | set(thin) | {y for row in thin.values() for y in row}
    chosen = choose_alpha(thin, labels)
    assert chosen["best_alpha"] == 0.0 and chosen["alpha"] == 64.0 and chosen["rule"].startswith("largest within 2 ")
    clear = {**lone, **{f"m{i}": {f"r{i}": 3} for i in range(10)}}
    labels = LABELS | set(clear) | {y for row in clear.values() for y in row}
    assert choose_alpha(clear, labels)["alpha"] == 0.0


def test_hard_shrunk_rule_every_branch():
    bank = MemoryBank.from_pairs([("music", "radio"), ("news", "weather"), ("news", "weather"), ("news", "weather"),
                                  ("weather", "news"), ("weather", "radio")])
    assert decide_shrunk("qa", bank, 2.0, LABELS).action == "keep"  # never seen: keep
    one = decide_shrunk("music", bank, 2.0, LABELS)  # one sample against a prior of 2: keep music
    assert (one.action, one.label) == ("keep", "music") and one.candidates == {"music": 0, "radio": 1}
    strong = decide_shrunk("news", bank, 2.0, LABELS)  # 3 samples say weather: 3/5 > 1/2
    assert (strong.action, strong.label) == ("map", "weather")
    split = decide_shrunk("weather", bank, 1.0, LABELS)  # 1/3 each: ask among all three
    assert split.action == "choose" and set(split.candidates) == {"weather", "news", "radio"}
    assert decide_shrunk("music", bank, 0.0, LABELS).label == "radio"  # alpha 0: the plain map


def test_soft_shrunk_by_hand_and_equal_to_plain_at_alpha_zero():
    bank = MemoryBank.from_pairs([("music", "radio"), ("music", "music")])
    cond = lambda r: shrunk_conditional(r, bank.candidates(r), 2.0, LABELS)  # noqa: E731
    out = soft_marginalize({"music": 0.8, "news": 0.2}, bank, cond)
    assert out == pytest.approx({"music": 0.8 * 3 / 4, "radio": 0.8 / 4, "news": 0.2})
    plain = lambda r: shrunk_conditional(r, bank.candidates(r), 0.0, LABELS)  # noqa: E731
    assert soft_marginalize({"music": 0.8, "news": 0.2}, bank, plain) == pytest.approx(
        soft_marginalize({"music": 0.8, "news": 0.2}, bank))


def test_shrunk_variants_build_by_name_and_record_their_strength(table_method):
    labels = sorted(LABELS)
    answers = {"play jazz": "music", "play the radio": "music", "rain today": "weather", "top stories": "news",
               "more jazz": "music", "sunny": "weather"}
    samples = [Example("play jazz", "music"), Example("play the radio", "radio"), Example("rain today", "weather"),
               Example("top stories", "news"), Example("more jazz", "music"), Example("sunny", "weather")]
    for suffix, form in (("+cm_shrunk", "hard"), ("+cm_soft_shrunk", "soft")):
        base = table_method(labels, answers, choices={"play the radio": "radio"})
        cm = CM(base, form=form, shrink=True, temperature=0.0)
        assert cm.name == "table" + suffix
        cm.fit(samples)
        assert cm.shrinkage_["alpha"] > 0  # music -> radio once in three: shrink toward keeping
        assert cm.predict(["more jazz"])[0].label == "music"  # the lone deviation no longer moves every "music"
    assert registry.split_method_name("knn+cm_soft_shrunk") == ("knn", "+cm_soft_shrunk")
    assert registry.is_soft("knn+cm_soft_shrunk") and not registry.is_soft("knn+cm_shrunk")


def test_the_evaluation_records_the_chosen_strength():
    from cm_core.data import Dataset
    from cm_core.evaluate import run_evaluation
    rows = [Example(f"song number {i}", "music") for i in range(12)] + [
        Example(f"weather report {i}", "weather") for i in range(12)]
    res = run_evaluation(Dataset("toy", rows), None, ["label_similarity+cm_shrunk", "label_similarity+cm_soft_shrunk"],
                         pref_count=8, n_test=8, seed=3, n_boot=20)
    for name in ("label_similarity+cm_shrunk", "label_similarity+cm_soft_shrunk"):
        assert set(res["results"][name]["shrinkage"]) == {"alpha", "best_alpha", "rule", "loo_loglik"}
        # the same choice is stored with the bank the variants share
        assert res["banks"]["label_similarity"]["bank"]["meta"]["shrinkage"] == res["results"][name]["shrinkage"]
