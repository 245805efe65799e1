"""Marginalization through the bank: every branch of the hard form, the soft form's arithmetic, and CM's
fit/predict plumbing, on a deterministic table-driven method (no LLM)."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm_core.bank import MemoryBank
from cm_core.cm import CM
from cm_core.data import Example
from cm_core.marginalize import Decision, decide, soft_marginalize

LABELS = ["sky report", "outside", "wake-up buzz", "tunes", "radio", "grub"]


def _bank() -> MemoryBank:
    return MemoryBank.from_pairs([("weather", "sky report"), ("weather", "sky report"), ("weather", "outside"),
                                  ("alarm", "wake-up buzz"), ("alarm", "wake-up buzz"),
                                  ("music", "tunes"), ("music", "radio"), ("music", "radio")])


# --------------------------------------------------------------------------- decide()

def test_decide_no_entry_keeps_base_answer():
    for single in ("map", "keep"):
        assert decide("cooking", _bank(), single) == Decision("keep", "cooking", {})


def test_decide_single_candidate_maps_or_keeps():
    assert decide("alarm", _bank(), "map") == Decision("map", "wake-up buzz", {"wake-up buzz": 2})
    assert decide("alarm", _bank(), "keep") == Decision("keep", "alarm", {"wake-up buzz": 2})


def test_decide_several_candidates_leaves_the_choice_open():
    d = decide("weather", _bank(), "map")
    assert d.action == "choose" and d.label is None
    assert list(d.candidates.items()) == [("sky report", 2), ("outside", 1)]
    assert decide("music", _bank(), "keep").action == "choose"  # "keep" only concerns single candidates


# --------------------------------------------------------------------------- CM hard form

QUERIES = {  # text -> what the base method answers
    "will it rain": "weather", "is it sunny": "weather", "wake me at six": "alarm", "bake bread": "cooking",
    "play jazz": "music", "put on the radio": "music",
}
CHOICES = {"will it rain": "outside", "is it sunny": "sky report", "play jazz": "tunes", "put on the radio": "radio"}


def _cm(table_method, single="map", chooser=True):
    base = table_method(LABELS, QUERIES)
    ch = table_method(LABELS, {}, CHOICES) if chooser else None
    cm = CM(base, ch, single=single, bank=_bank(), prefit=True).fit([])
    return cm, base, ch


def test_hard_every_branch(table_method):
    cm, base, chooser = _cm(table_method)
    texts = list(QUERIES)
    preds = cm.predict(texts)
    got = {t: (p.label, p.info["action"], p.info["base"]) for t, p in zip(texts, preds)}
    assert got == {
        "will it rain": ("outside", "choose", "weather"),
        "is it sunny": ("sky report", "choose", "weather"),
        "wake me at six": ("wake-up buzz", "map", "alarm"),
        "bake bread": ("cooking", "keep", "cooking"),  # the bank never saw "cooking"
        "play jazz": ("tunes", "choose", "music"),
        "put on the radio": ("radio", "choose", "music"),
    }
    # the base method is asked once, over all queries, with its own label set
    assert base.calls == [(texts, None)]
    # the chooser is asked once, for exactly the several-candidate queries, with exactly their candidates
    assert chooser.calls == [(["will it rain", "is it sunny", "play jazz", "put on the radio"],
                              [["sky report", "outside"], ["sky report", "outside"], ["radio", "tunes"],
                               ["radio", "tunes"]])]
    assert preds[0].info["candidates"] == {"sky report": 2, "outside": 1}
    assert preds[0].info["choice_scores"] == {"sky report": 0.5, "outside": 0.5}


def test_hard_single_keep_is_the_official_code(table_method):
    cm, _, chooser = _cm(table_method, single="keep")
    assert cm.name == "table+cm_paper"
    p = cm.predict(["wake me at six", "bake bread"])
    assert [(x.label, x.info["action"]) for x in p] == [("alarm", "keep"), ("cooking", "keep")]
    assert chooser.calls == []  # nothing to choose: no second call at all


def test_hard_without_chooser_reuses_the_base(table_method):
    cm, base, _ = _cm(table_method, chooser=False)
    base.choices = {"will it rain": "outside"}
    p = cm.predict(["will it rain", "wake me at six"])
    assert [x.label for x in p] == ["outside", "wake-up buzz"]
    assert base.calls == [(["will it rain", "wake me at six"], None), (["will it rain"], [["sky report", "outside"]])]


def test_hard_passes_candidates_through_to_the_base(table_method):
    cm, base, _ = _cm(table_method)
    cm.predict(["bake bread"], candidates=[["grub", "cooking"]])
    assert base.calls == [(["bake bread"], [["grub", "cooking"]])]


def test_predict_before_fit_is_an_error(table_method):
    cm = CM(table_method(LABELS, QUERIES))
    with pytest.raises(RuntimeError, match="fit"):
        cm.predict(["play jazz"])


@pytest.mark.parametrize("kw", [dict(form="medium"), dict(single="maybe")])
def test_bad_options(table_method, kw):
    with pytest.raises(ValueError):
        CM(table_method(LABELS, QUERIES), **kw)


def test_variant_names(table_method):
    base = table_method(LABELS, QUERIES)
    assert CM(base).name == "table+cm"
    assert CM(base, single="keep").name == "table+cm_paper"
    assert CM(base, form="soft").name == "table+cm_soft"


# --------------------------------------------------------------------------- CM.fit builds the bank

def test_fit_counts_base_answers_against_user_labels(table_method):
    base = table_method(LABELS, QUERIES)
    samples = [Example("will it rain", "outside"), Example("is it sunny", "sky report"),
               Example("wake me at six", "wake-up buzz"), Example("play jazz", "tunes"),
               Example("put on the radio", "radio"), Example("bake bread", "grub")]
    cm = CM(base, temperature=0.0, seed=3).fit(samples)
    assert base.fitted_on == samples  # an unfitted base is shown the samples
    assert cm.bank_.counts == {"weather": {"outside": 1, "sky report": 1}, "alarm": {"wake-up buzz": 1},
                               "music": {"tunes": 1, "radio": 1}, "cooking": {"grub": 1}}
    meta = dict(cm.bank_.meta)
    assert meta.pop("shrinkage")["alpha"] == 0.0  # the user's words are never the model's: nothing to keep
    assert meta == {"base_method": "table", "temperature": 0.0, "seed": 3, "n_samples": 6}
    assert cm.predict(["bake bread"])[0].label == "grub"


def test_fit_with_given_bank_uses_it_as_is(table_method):
    base = table_method(LABELS, QUERIES)
    bank = _bank()
    cm = CM(base, bank=bank).fit([Example("bake bread", "grub")])
    assert cm.bank_ is bank and "cooking" not in cm.bank_
    assert base.calls == []  # no sampling happened


# --------------------------------------------------------------------------- soft form

def test_soft_marginalize_by_hand():
    bank = MemoryBank.from_pairs([("a", "X"), ("a", "X"), ("a", "X"), ("a", "Y"), ("b", "Y"), ("b", "Y")])
    out = soft_marginalize({"a": 0.5, "b": 0.3, "c": 0.2}, bank)
    # X: 0.5*3/4 ; Y: 0.5*1/4 + 0.3*1 ; c unseen -> itself: 0.2
    assert out == pytest.approx({"X": 0.375, "Y": 0.425, "c": 0.2})
    # zero-probability answers contribute nothing; an unnormalized input is renormalized
    assert soft_marginalize({"a": 1.0, "b": 0.0}, bank) == pytest.approx({"X": 0.75, "Y": 0.25})
    assert soft_marginalize({"a": 2.0, "c": 2.0}, bank) == pytest.approx({"X": 0.375, "Y": 0.125, "c": 0.5})
    assert soft_marginalize({}, bank) == {} and soft_marginalize({"a": 0.0}, bank) == {}


@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.floats(0, 1), min_size=1),
       st.lists(st.tuples(st.sampled_from(["a", "b", "e"]), st.sampled_from(["X", "Y", "Z", "a"])), max_size=12))
@settings(max_examples=100, deadline=None)
def test_soft_marginalize_is_a_distribution(base_probs, pairs):
    bank = MemoryBank.from_pairs(pairs)
    out = soft_marginalize(base_probs, bank)
    if sum(p for p in base_probs.values() if p > 0) == 0:
        assert out == {}
        return
    assert math.isclose(sum(out.values()), 1.0, rel_tol=1e-9)
    assert all(v >= 0 for v in out.values())
    # mass only moves to labels the bank maps to, or stays on an answer the bank never saw
    allowed = {y for y_hat in base_probs if y_hat in bank for y in bank.counts[y_hat]} | \
              {y_hat for y_hat in base_probs if y_hat not in bank}
    assert set(out) <= allowed


def test_cm_soft_predict(table_method):
    bank = MemoryBank.from_pairs([("weather", "sky report"), ("weather", "sky report"), ("weather", "outside"),
                                  ("music", "tunes")])
    probs = {"will it rain": {"weather": 0.75, "music": 0.25}, "play jazz": {"weather": 0.3, "music": 0.7},
             "fry eggs": {"cooking": 0.5, "music": 0.5}}
    base = table_method(LABELS, {"will it rain": "weather", "play jazz": "music", "bake bread": "cooking",
                                 "fry eggs": "cooking"}, probs=probs)
    cm = CM(base, form="soft", bank=bank, prefit=True).fit([])
    rain, jazz, bread, eggs = cm.predict(["will it rain", "play jazz", "bake bread", "fry eggs"])
    assert rain.probs == pytest.approx({"sky report": 0.5, "outside": 0.25, "tunes": 0.25})
    assert rain.label == "sky report"
    assert jazz.probs == pytest.approx({"sky report": 0.2, "outside": 0.1, "tunes": 0.7})
    assert jazz.label == "tunes" and jazz.info == {"base": "music", "action": "soft"}
    # no distribution from the base: its answer with certainty; unseen by the bank -> kept
    assert bread.label == "cooking" and bread.probs == {"cooking": 1.0}
    # a tie goes to the base answer
    assert eggs.probs == pytest.approx({"cooking": 0.5, "tunes": 0.5}) and eggs.label == "cooking"


# --------------------------------------------------------------------------- Method.sample

def test_sample_argmax_at_zero_and_seeded_draws(table_method):
    texts = [f"q{i}" for i in range(3000)]
    base = table_method(["a", "b"], {t: "a" for t in texts}, probs={t: {"a": 0.7, "b": 0.3} for t in texts})
    assert base.sample(texts[:50], temperature=0) == ["a"] * 50
    draws = base.sample(texts, temperature=1.0, seed=5)
    assert draws == base.sample(texts, temperature=1.0, seed=5)  # reproducible
    assert draws != base.sample(texts, temperature=1.0, seed=6)
    assert abs(draws.count("b") / len(draws) - 0.3) < 0.04
    # a lower temperature sharpens p(y|x): p(b) = .3^2 / (.7^2 + .3^2) ~ 0.155 at T=0.5
    sharp = base.sample(texts, temperature=0.5, seed=5)
    assert abs(sharp.count("b") / len(sharp) - 0.09 / 0.58) < 0.04
    no_probs = table_method(["a", "b"], {"x": "b"})
    assert no_probs.sample(["x"], temperature=1.0) == ["b"]

