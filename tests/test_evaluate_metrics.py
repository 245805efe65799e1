import numpy as np

from cm_core.evaluate import _macro_f1_vectorized, bootstrap_ci, macro_f1


def test_vectorized_macro_f1_equals_sklearn_on_resamples():
    rng = np.random.default_rng(0)
    gold = rng.choice(list("abcdef"), 150)
    pred = np.where(rng.random(150) < 0.6, gold, rng.choice(list("abcdefxy"), 150))
    stat = _macro_f1_vectorized(gold, pred)
    idx = rng.integers(0, 150, (20, 150))
    got = stat(idx)
    want = [macro_f1(list(gold[i]), list(pred[i])) for i in idx]
    assert np.allclose(got, want, atol=1e-12)


def test_macro_f1_ci_brackets_the_point_estimate():
    rng = np.random.default_rng(1)
    gold = list(rng.choice(list("abcd"), 120))
    pred = [g if rng.random() < 0.7 else "a" for g in gold]
    lo, hi = bootstrap_ci(gold, pred, macro_f1, 300, seed=0)
    assert lo <= macro_f1(gold, pred) <= hi and hi - lo > 0.01
