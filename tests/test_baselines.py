"""Classifier baselines fitted on the preference samples, and the bank CM estimates on top of them."""
from __future__ import annotations

import pytest

from cm_core.baselines import KNN, LabelSimilarity, LogReg
from cm_core.cm import CM
from cm_core.data import load_dataset, split_dataset
from cm_core.evaluate import accuracy


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset("massive_scenario"), pref_count=120, n_test=60, seed=40)


@pytest.mark.parametrize("make", [lambda labels: KNN(labels, k=1), lambda labels: LogReg(labels)])
def test_answers_on_own_training_rows_are_out_of_fold(split, make):
    labels = split.preference.labels
    m = make(labels).fit(split.preference.examples)
    texts, gold = split.preference.texts, split.preference.targets
    in_sample = accuracy(gold, [p.label for p in m.predict(texts)])
    oof = accuracy(gold, m.answer_samples(split.preference.examples, temperature=0.0, seed=0))
    assert in_sample >= 0.97  # a classifier (1-NN exactly) answering its own training rows
    assert oof < in_sample - 0.1  # what CM's bank must see instead: answers on unseen rows
    assert oof > 0.3  # still a real classifier, not noise
    # queries that are not training rows are answered by the model fitted on everything
    assert m.sample(split.test.texts[:5], 0.0) == [p.label for p in m.predict(split.test.texts[:5])]


def test_cm_bank_on_knn_is_not_an_identity(split):
    labels = sorted({e.label for e in split.preference.examples} | {e.label for e in split.test.examples})
    cm = CM(KNN(labels, k=1), temperature=0.0, seed=0).fit(split.preference.examples)
    stats = cm.bank_.stats()
    assert stats["agreement"] < 0.97  # off-diagonal entries exist: the bank has something to correct
    assert cm.bank_.meta["n_samples"] == 120


def test_label_similarity_needs_no_samples(split):
    labels = sorted({e.label for e in split.test.examples})
    preds = LabelSimilarity(labels).predict(split.test.texts)
    assert all(p.label in labels and abs(sum(p.probs.values()) - 1) < 1e-6 for p in preds)
    assert accuracy(split.test.targets, [p.label for p in preds]) > 1.5 / len(labels)  # above chance


@pytest.mark.parametrize("make", [KNN, LogReg])
def test_classifiers_on_few_samples_per_label_fit_quietly(make):
    """1-5 % of a dataset gives about one sample per label: sklearn's "more classes than half the samples"
    warning would flood every run (once per fold), and is not a problem here."""
    import warnings
    ds = load_dataset("banking77")
    first: dict = {}
    for e in ds.examples:
        first.setdefault(e.label, []).append(e)
    few = [e for rows in list(first.values())[:30] for e in rows[:2]]  # 60 samples, 30 labels: 2 per label
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = make(ds.labels).fit(few)
        m.sample([e.text for e in few], temperature=0.0)  # out-of-fold: folds of 48 rows over 30 labels


@pytest.mark.slow
def test_setfit_learns_from_the_samples_and_leaves_the_shared_encoder_alone(split):
    from cm_core.baselines import SetFit
    from cm_core.embeddings import get_embedder
    shared = get_embedder()
    before = shared.model.encode(["set an alarm for six"])
    labels = split.preference.labels
    m = SetFit(labels, num_iterations=2, seed=0).fit(split.preference.examples)
    acc = accuracy(split.test.targets, [p.label for p in m.predict(split.test.texts)])
    assert acc > 0.4  # 18 labels: chance is under 0.1
    assert m.model_.model_body is not shared.model
    assert (shared.model.encode(["set an alarm for six"]) == before).all()
    assert m.gives_probs and abs(sum(m.predict(split.test.texts[:1])[0].probs.values()) - 1) < 1e-6
