"""The EM-fitted soft form (+cm_em): the transition by hand on a case EM must solve, the prior's choice, and the
variant end to end through the registry and the evaluation."""
from __future__ import annotations

import numpy as np
import pytest

from cm_core import registry
from cm_core.bank import MemoryBank
from cm_core.cm import CM, estimate_bank
from cm_core.data import Dataset, Example
from cm_core.em import fit_em, fit_transition
from cm_core.errors import CMError
from cm_core.evaluate import run_evaluation
from cm_core.methods import Method, Prediction

WORDS = ["songs", "headlines", "forecast", "alarm clock"]  # the model's own vocabulary
USER = {"songs": "K-1", "headlines": "K-2", "forecast": "K-3", "alarm clock": "K-4"}  # the user's names


def _weak_model(n: int, top: float, seed: int = 0):
    """A model whose right answer gets only ``top`` of its mass (the rest on one wrong answer, different per
    sample), so its top answer is often wrong but its distributions are informative."""
    rng = np.random.default_rng(seed)
    probs, labels = [], []
    for i in range(n):
        right = WORDS[i % len(WORDS)]
        wrong = rng.choice([w for w in WORDS if w != right])
        mass = rng.uniform(top - 0.1, top + 0.1)
        probs.append({right: mass, wrong: 1 - mass})
        labels.append(USER[right])
    return probs, labels


def test_em_recovers_a_renaming_that_one_drawn_answer_per_sample_blurs():
    probs, labels = _weak_model(40, top=0.45)
    fit = fit_em(probs, labels, sorted(USER.values()))
    assert fit["alpha"] == 0.0 and list(fit["cv_loglik"]) == ["0.0"]  # no answer is a user label: nothing to keep
    for word, name in USER.items():
        row = fit["conditional"][word]
        assert max(row, key=row.get) == name and row[name] > 0.9
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-5)
    # the counted bank of argmax answers: wrong in about half its rows' mass
    counted: dict[str, dict[str, int]] = {}
    for p, y in zip(probs, labels):
        top = max(p, key=p.get)
        counted.setdefault(top, {}).setdefault(y, 0)
        counted[top][y] += 1
    assert min(max(r.values()) / sum(r.values()) for r in counted.values()) < 0.8


def test_em_transition_is_a_fixed_point_of_its_own_update():
    probs, labels = _weak_model(24, top=0.6, seed=1)
    P = np.array([[p.get(w, 0.0) for w in WORDS] for p in probs])
    names = sorted(USER.values())
    Y = np.array([names.index(y) for y in labels])
    keep = np.full(len(WORDS), -1)
    M = fit_transition(P, Y, keep, len(names), 0.0)
    joint = P * M[:, Y].T
    counts = np.full_like(M, 0.01)
    np.add.at(counts.T, Y, joint / joint.sum(1, keepdims=True))
    assert np.allclose(M, counts / counts.sum(1, keepdims=True), atol=1e-4)


def test_a_model_that_is_already_right_keeps_its_answers():
    """Aligned labels and a model right on most samples with lone confusions: the cross-validated prior keeps ŷ
    (large alpha), and the marginalized answer is the base answer."""
    labels = ["music", "news", "weather", "alarm"]
    rng = np.random.default_rng(2)
    probs, ys = [], []
    for i in range(60):
        y = labels[i % 4]
        other = rng.choice([w for w in labels if w != y])
        probs.append({y: 0.7, other: 0.3})
        ys.append(y)
    fit = fit_em(probs, ys, labels)
    assert fit["alpha"] > 0 and len(fit["cv_loglik"]) > 1
    for y in labels:
        row = fit["conditional"][y]
        assert max(row, key=row.get) == y


def test_too_few_samples_to_cross_validate_trust_the_answer_most():
    fit = fit_em([{"music": 1.0}, {"news": 0.6, "music": 0.4}], ["news", "news"], ["music", "news"])
    assert fit["cv_loglik"] == {} and fit["alpha"] == fit["best_alpha"] == 64.0
    with pytest.raises(ValueError, match="at least one"):
        fit_em([], [], ["music"])


class _Fixed(Method):
    """A base method that answers from a table of distributions (no LLM)."""

    def __init__(self, labels, table, responses=None):
        self.labels, self.table, self.name = labels, table, "fixed"

    def predict(self, texts, candidates=None):
        out = []
        for t in texts:
            p = dict(self.table[t])
            if candidates is not None:
                p = {k: v for k, v in p.items() if k in candidates[0]} or {candidates[0][0]: 1.0}
            out.append(Prediction(max(p, key=p.get), p))
        return out


def test_cm_em_maps_the_models_words_as_well_as_the_true_renaming_would():
    """Fitted on samples whose drawn answers are often wrong, +cm_em answers every query as the model's top answer
    mapped by the true renaming would (the best any p(y'|ŷ) can do here); its rows hold more of the true label's
    mass than the counted bank's."""
    probs, labels = _weak_model(40, top=0.55, seed=3)
    texts = [f"q{i}" for i in range(40)]
    samples = [Example(t, y) for t, y in zip(texts, labels)]
    test_probs, _ = _weak_model(40, top=0.55, seed=4)
    tests = [f"t{i}" for i in range(40)]
    table = {**dict(zip(texts, probs)), **dict(zip(tests, test_probs))}
    user_labels = sorted(USER.values())
    em = CM(_Fixed(user_labels, table), form="soft", estimate="em", seed=0).fit(samples)
    assert em.name == "fixed+cm_em" and em.estimate == "em" and em.bank_.n_samples == 40
    oracle = [USER[max(table[t], key=table[t].get)] for t in tests]
    assert [p.label for p in em.predict(tests)] == oracle
    bank = estimate_bank(_Fixed(user_labels, table), samples, temperature=1.0, seed=0)
    held = {w: em.em_["conditional"][w].get(USER[w], 0.0) for w in WORDS}
    counted = {w: bank.conditional(w).get(USER[w], 0.0) for w in WORDS}
    assert min(held.values()) > 0.9 and sum(held.values()) > sum(counted.values())
    with pytest.raises(ValueError, match="soft form"):
        CM(_Fixed(user_labels, table), form="hard", estimate="em")


def test_cm_em_in_the_registry_and_the_results():
    assert registry.split_method_name("knn+cm_em") == ("knn", "+cm_em")
    assert registry.is_soft("knn+cm_em")
    assert registry.needs_samples("zero_shot+cm_em", bank_given=True)  # no bank file holds p(ŷ|x_i)
    assert not registry.needs_samples("zero_shot+cm_soft", bank_given=True)
    with pytest.raises(CMError, match="not in the paper protocol"):  # soft: the paper's methods give no p(y|x)
        registry.build("zero_shot+cm_em", labels=["music"], llm=object(), bank=MemoryBank(), protocol="paper")
    rows = [Example(f"please play {w} number {i}", "music") for i, w in enumerate(["jazz", "rock", "pop"] * 8)]
    rows += [Example(f"what is the weather in city {i}", "weather") for i in range(24)]
    rows += [Example(f"read me the news about topic {i}", "news") for i in range(24)]
    ds = Dataset("tiny", rows, ["music", "news", "weather"])
    res = run_evaluation(ds, None, ["knn+cm_em"], pref_count=36, n_test=30, seed=40, n_boot=50)
    em = res["results"]["knn+cm_em"]
    assert set(em["em"]) >= {"alpha", "best_alpha", "rule", "cv_loglik"} and "conditional" not in em["em"]
    assert em["accuracy"] >= res["results"]["knn"]["accuracy"] - 0.1


class _NoProbs(_Fixed):
    """Free text: an answer, no distribution (or no answer at all for a failed query)."""

    def predict(self, texts, candidates=None):
        return [Prediction(self.table.get(t, ""), None) for t in texts]


def test_cm_em_reads_an_answer_without_a_distribution_as_certain():
    samples = [Example(f"q{i}", "K-1" if i % 3 else "K-2") for i in range(12)]
    table = {f"q{i}": "songs" if i % 3 else "forecast" for i in range(12)}
    table["t"] = "songs"
    em = CM(_NoProbs(["K-1", "K-2"], table), form="soft", estimate="em").fit(samples)
    assert em.predict(["t"])[0].label == "K-1" and em.em_["conditional"]["forecast"]["K-2"] > 0.9
    with pytest.raises(CMError, match="answered none of its 2 samples"):
        CM(_NoProbs(["K-1"], {}), form="soft", estimate="em").fit([Example("a", "K-1"), Example("b", "K-1")])
