"""The one builder: every method name builds through ``registry.build``, its facts come from the method classes,
one fitted check with one message, and no face assembles CM by hand."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cm_core import prompts, registry
from cm_core.backends.base import LLM, CandidateScore
from cm_core.bank import MemoryBank
from cm_core.cm import CM
from cm_core.data import Dataset, Example
from cm_core.errors import CMError
from cm_core.evaluate import run_evaluation
from cm_core.methods import ChainOfThought, Decoding, FewShot, NotFittedError, ZeroShot
from cm_core.training import TRAINING_METHODS

REPO = Path(__file__).resolve().parents[1]
LABELS = ["alarm", "music", "weather"]
SAMPLES = [Example("wake me at six alarm", "alarm"), Example("play some jazz music", "music"),
           Example("rain tomorrow weather", "weather"), Example("set an alarm for noon", "alarm"),
           Example("music from the sixties", "music"), Example("sunny weather today", "weather")]


class WordLLM(LLM):
    """Scores a candidate -1 when its word is in the query's last message, -3 otherwise; generation writes the
    first candidate word it finds in the last message (or "none"). Records every request."""

    kind = "fake"

    def __init__(self, supports_scores: bool = True):
        super().__init__("words")
        self.supports_scores = supports_scores
        self.score_requests, self.gen_requests = [], []

    def score(self, requests):
        self.score_requests.extend(requests)
        return [[CandidateScore(-1.0 if c in r.messages[-1][1] else -3.0, 1) for c in r.candidates]
                for r in requests]

    def generate(self, requests):
        self.gen_requests.extend(requests)
        out = []
        for r in requests:
            text = r.messages[-1][1]
            out.append([next((w for w in LABELS if w in text), "none")] * r.n)
        return out


TRAINED = {cls.name for cls in TRAINING_METHODS}  # they need a local model's weights: tests/test_training.py


@pytest.mark.parametrize("name", [n for n in registry.ALL_METHODS if n not in TRAINED])
def test_every_base_name_builds_with_facts_from_its_class(name):
    llm = WordLLM()
    own = {"responses": LABELS} if name == "own_words" else {}  # the model's words: here the same three
    m = registry.build(name, labels=LABELS, llm=llm, **own)
    assert m.name == name and type(m) is registry.METHODS[name]
    assert registry.needs_llm(name) == type(m).needs_llm == (name not in registry.BASELINES)
    assert registry.needs_samples(name) == type(m).needs_samples
    m.fit(SAMPLES)
    assert m.is_fitted and m.n_samples_ == len(SAMPLES)
    assert [p.label for p in m.predict(["an alarm please"])][0] in LABELS


def test_facts_of_the_methods():
    assert not registry.needs_samples("zero_shot") and not registry.needs_samples("label_similarity")
    assert all(registry.needs_samples(n) for n in ("few_shot", "few_shot_fixed", "cot", "self_consistency",
                                                   "zero_shot_knn", "few_shot_knn", "knn", "logreg"))
    assert registry.needs_samples("zero_shot+cm") and not registry.needs_samples("zero_shot+cm", bank_given=True)
    assert registry.needs_samples("knn+cm", bank_given=True)  # kNN still learns from the samples
    assert registry.is_soft("knn+cm_soft") and not registry.is_soft("knn+cm_paper")
    with pytest.raises(CMError, match="unknown method 'zero_shoot'"):
        registry.needs_llm("zero_shoot")


@pytest.mark.parametrize("variant", list(registry.CM_VARIANTS))
@pytest.mark.parametrize("base", ["zero_shot", "few_shot", "logreg"])
def test_cm_variants_build_by_name(base, variant):
    llm = WordLLM()
    cm = registry.build(base + variant, labels=LABELS, llm=llm)
    assert isinstance(cm, CM) and cm.name == base + variant
    assert (cm.form, cm.single, cm.shrink, cm.estimate) == registry.CM_VARIANTS[variant]
    if registry.needs_llm(base):  # the re-ask lists the bank entry's candidates
        assert isinstance(cm.chooser, ZeroShot) and cm.chooser.dec.list_labels is True
    else:
        assert cm.chooser is None  # a non-LLM base restricts itself to the candidates
    cm.fit(SAMPLES)
    assert isinstance(cm.bank_, MemoryBank) and cm.bank_.meta["base_method"] == base


def test_given_bank_and_prefit_base():
    llm = WordLLM()
    bank = MemoryBank.from_pairs([("alarm", "music"), ("alarm", "weather")])
    cm = registry.build("zero_shot+cm", labels=LABELS, llm=llm, bank=bank).fit([])  # zero-shot needs no samples
    assert cm.bank_ is bank
    pred = cm.predict(["an alarm please"])[0]
    assert pred.info["action"] == "choose" and pred.label in ("music", "weather")
    with pytest.raises(NotFittedError, match=r"knn\+cm needs preference samples"):
        registry.build("knn+cm", labels=LABELS, bank=bank).fit([])
    base = registry.build("knn", labels=LABELS).fit(SAMPLES)
    cm = registry.build("knn+cm_soft", labels=LABELS, bank=bank, base=base).fit(SAMPLES)
    assert cm.base is base and cm.bank_ is bank
    with pytest.raises(CMError, match="given a fitted 'knn'"):
        registry.build("logreg+cm", labels=LABELS, base=base)
    with pytest.raises(CMError, match="not a CM variant"):
        registry.build("zero_shot", labels=LABELS, llm=llm, bank=bank)
    with pytest.raises(CMError, match="needs an LLM backend"):
        registry.build("few_shot+cm", labels=LABELS)


@pytest.mark.parametrize("name", ["few_shot", "cot", "self_consistency", "zero_shot_knn", "knn", "logreg",
                                  "zero_shot+cm", "knn+cm_soft"])
def test_one_fitted_check_with_one_message(name):
    m = registry.build(name, labels=LABELS, llm=WordLLM())
    with pytest.raises(NotFittedError, match=rf"^{re.escape(name)}: call fit\(preference_samples\) first$"):
        m.predict(["an alarm"])


@pytest.mark.parametrize("cls", [FewShot, ChainOfThought])
def test_prompted_methods_calibrate_on_the_content_free_input(cls):
    """Few-shot and CoT build their prompts through the same hook as zero-shot, so calibration scores the same
    prompt (with the same demonstrations) on the content-free input."""
    llm = WordLLM()
    m = cls(llm, LABELS, Decoding(calibrate=True)).fit(SAMPLES)
    m.predict(["an alarm please"])
    last = [r.messages[-1][1] for r in llm.score_requests]
    first_user = [next(c for role, c in r.messages if role == "user") for r in llm.score_requests]
    assert any("an alarm please" in u for u in first_user)
    assert any(f"Query: {prompts.CONTENT_FREE}" in u for u in first_user)  # the content-free twin was scored
    assert len(last) == 2


def test_one_default_decoding():
    d = Decoding()
    assert d.mode == "score" and d.calibrate and d.list_labels is None
    scorer, generator = WordLLM(), WordLLM(supports_scores=False)
    assert ZeroShot(scorer, LABELS).chooser.lists_labels is False  # scoring ranks labels without listing them
    assert ZeroShot(scorer, LABELS, Decoding(mode="generate")).chooser.lists_labels is True
    assert ZeroShot(generator, LABELS).chooser.lists_labels is True  # vote by generation: it must see them
    with pytest.raises(ValueError, match="mode must be 'score' or 'generate'"):
        Decoding(mode="sample")


def test_evaluation_uses_one_given_bank_for_every_base_and_skips_soft_without_probs():
    ds = Dataset("toy", SAMPLES * 3 + [Example(f"alarm number {i}", "alarm") for i in range(6)])
    bank = MemoryBank.from_pairs([("alarm", "alarm"), ("music", "music")])
    llm = WordLLM()
    res = run_evaluation(ds, llm, ["zero_shot+cm_soft", "label_similarity+cm"], pref_count=4, n_test=6, seed=1,
                         bank=bank, decoding=Decoding(mode="generate"), n_boot=50)
    assert res["config"]["bank_given"] is True
    assert {b: v["bank"]["counts"] for b, v in res["banks"].items()} == {
        "zero_shot": bank.counts, "label_similarity": bank.counts}
    assert res["results"]["zero_shot+cm_soft"] == {"skipped": "the base method gives no p(y|x) on this backend"}
    assert "accuracy" in res["results"]["label_similarity+cm"]
    assert list(res["results"]) == ["zero_shot", "zero_shot+cm_soft", "label_similarity", "label_similarity+cm"]


def test_no_face_assembles_cm_by_hand():
    """registry.build is the only place that constructs CM (tests aside)."""
    offenders = []
    for path in [*REPO.glob("cm_core/**/*.py"), *REPO.glob("demo/**/*.py"), *REPO.glob("benchmarks/**/*.py"),
                 *REPO.glob("notebooks/**/*.ipynb")]:
        if path.name == "registry.py" and path.parent.name == "cm_core":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"(?<![\w.])CM\(", line) and "class CM(" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
            if re.search(r"\.bank_\s*=", line) and "self.bank_" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []


SLANG = {"alarm": "wake-up buzz", "music": "tunes", "weather": "sky report"}


@pytest.mark.parametrize("variant", ["+cm", "+cm_soft"])
def test_own_words_reach_the_users_labels_only_through_the_bank(variant):
    """The model answers in its own words (alarm, music, weather); the user's labels are slang it never says.
    Alone it is never right; CM's bank, estimated on the user's samples, maps its words onto the user's."""
    user = [Example(e.text, SLANG[e.label]) for e in SAMPLES]
    llm = WordLLM()
    alone = registry.build("own_words", labels=sorted(SLANG.values()), llm=llm, responses=LABELS)
    assert [p.label for p in alone.predict(["set an alarm"])] == ["alarm"]  # its own word, not the user's
    cm = registry.build("own_words" + variant, labels=sorted(SLANG.values()), llm=llm, responses=LABELS).fit(user)
    assert cm.bank_.counts == {w: {SLANG[w]: 2} for w in LABELS}
    assert [p.label for p in cm.predict(["set an alarm", "jazz music now", "weather in rome"])] == [
        "wake-up buzz", "tunes", "sky report"]


def test_own_words_free_text_needs_generation_and_responses_only_apply_to_it():
    with pytest.raises(ValueError, match="pass responses="):
        registry.build("own_words", labels=LABELS, llm=WordLLM())
    free = registry.build("own_words", labels=LABELS, llm=WordLLM(), decoding=Decoding(mode="generate"))
    assert free.predict(["an alarm please"])[0].label == "alarm"  # the cleaned free-text reply
    with pytest.raises(CMError, match="responses= applies to own_words"):
        registry.build("zero_shot", labels=LABELS, llm=WordLLM(), responses=LABELS)
