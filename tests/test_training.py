"""The per-user training baselines (cm_core.training) on the embedded model: tiny, real runs (TRL, peft, sklearn),
no stubs. A 3-label toy task whose labels are made-up words, so the base model has no prior for them and whatever
the trained copy learns shows in its scores."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from cm_core import registry
from cm_core.backends import make_backend
from cm_core.backends.base import LLM, ScoreRequest
from cm_core.data import Example
from cm_core.errors import CMError
from cm_core.methods import Decoding, ZeroShot
from cm_core.training import DPO, AdaptedLLM, LoRASFT, _messages

LABELS = ["zorblat", "quennic", "vashtor"]
TEXTS = {"zorblat": ["wake me up at seven tomorrow", "set an alarm for noon", "alarm at 6 am please",
                     "turn off my morning alarm"],
         "quennic": ["play some jazz music", "put on my workout playlist", "skip this song", "play the latest album"],
         "vashtor": ["will it rain tomorrow", "how hot is it outside", "weather forecast for paris",
                     "is it sunny today"]}
SAMPLES = [Example(t, lab) for lab, ts in TEXTS.items() for t in ts]  # 12 samples, 4 per label
SMALL = [SAMPLES[i] for i in (0, 1, 4, 5, 8, 9)]  # 2 per label


def _weights_digest(llm) -> str:
    h = hashlib.sha256()
    for k, v in llm.inner.model_obj.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _label_logprob(llm: LLM, samples) -> np.ndarray:
    """Mean token log-probability of each sample's own label as the reply to its zero-shot prompt (uncalibrated)."""
    reqs = [ScoreRequest.of(_messages(s.text), [s.label]) for s in samples]
    return np.array([r[0].mean for r in llm.score(reqs)])


# --------------------------------------------------------------------------- fast: names, refusals

class RemoteLLM(LLM):
    """Stands for a served model: it answers, but its weights are not here."""

    kind = "openai"

    def generate(self, requests):
        return [["zorblat"] * r.n for r in requests]


EPOCHS = {"lora_sft": 1, "lora_sft_e2": 2, "lora_sft_e4": 4, "dpo": 1, "dpo_e2": 2, "dpo_e4": 4, "frozen_head": None}


@pytest.mark.parametrize("name", list(EPOCHS))
def test_registered_by_name_with_their_facts(name):
    cls = registry.METHODS[name]
    assert registry.needs_llm(name) and registry.needs_samples(name)
    assert name in registry.LLM_METHODS
    assert getattr(cls, "epochs", None) == EPOCHS[name]
    with pytest.raises(CMError, match="trains on the model's weights.*local transformers model"):
        registry.build(name, labels=LABELS, llm=RemoteLLM("gpt-4o-mini"))
    with pytest.raises(CMError, match="needs an LLM backend"):
        registry.build(name, labels=LABELS)


def test_openai_backend_is_refused_with_one_clear_error():
    llm = make_backend("openai:gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key="sk-test", use_cache=False)
    try:
        for name in ("lora_sft", "dpo", "frozen_head"):
            with pytest.raises(CMError, match=r"openai:gpt-4o-mini is not one"):
                registry.build(name, labels=LABELS, llm=llm)
    finally:
        llm.close()


def test_cm_variants_of_training_methods_are_refused_and_not_planned():
    for name in ("lora_sft+cm", "dpo_e2+cm_soft", "frozen_head+cm_paper"):
        with pytest.raises(CMError, match="CM variants of it are not offered"):
            registry.split_method_name(name)
    # the evaluation's habit of adding +cm to a base named alone skips them
    assert registry.plan(["frozen_head", "zero_shot", "dpo"]) == {"frozen_head": [], "zero_shot": ["+cm"], "dpo": []}


def test_epochs_must_be_positive(embedded_llm):
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        LoRASFT(embedded_llm, LABELS, epochs=0)


# --------------------------------------------------------------------------- real runs on the embedded model

@pytest.mark.slow
def test_frozen_head_fits_its_samples_from_a_json_head(embedded_llm):
    before = _weights_digest(embedded_llm)
    m = registry.build("frozen_head", labels=LABELS, llm=embedded_llm).fit(SAMPLES)
    preds = m.predict([s.text for s in SAMPLES])
    acc = np.mean([p.label == s.label for p, s in zip(preds, SAMPLES)])
    assert acc >= 0.9, acc  # chance is 1/3
    assert all(abs(sum(p.probs.values()) - 1) < 1e-6 and set(p.probs) == set(LABELS) for p in preds)
    # the head is plain JSON and is what predicts: its size is the stored size
    import json
    head = json.loads(json.dumps(m.head_))
    assert head["classes"] == sorted(LABELS) and np.array(head["coef"]).shape == (3, len(head["mean"]))
    assert m.storage_bytes_ == len(json.dumps(m.head_, separators=(",", ":")).encode())
    # candidates restrict the answer
    sub = m.predict([SAMPLES[0].text], candidates=[["quennic", "vashtor"]])[0]
    assert sub.label in ("quennic", "vashtor") and set(sub.probs) == {"quennic", "vashtor"}
    assert _weights_digest(embedded_llm) == before  # features only read the shared model


@pytest.mark.slow
def test_lora_sft_moves_scores_toward_the_users_labels_on_its_own_copy(embedded_llm):
    before = _weights_digest(embedded_llm)
    base_lp = _label_logprob(embedded_llm.inner, SMALL)
    m = LoRASFT(embedded_llm, LABELS, epochs=1, batch_size=1).fit(SMALL)  # 6 steps
    assert isinstance(m.adapted_llm_, AdaptedLLM) and m.predictor_.llm is m.adapted_llm_  # uncached
    ident = m.adapted_llm_.identity()
    assert ident["fingerprint"] == m.fingerprint_ and ident != embedded_llm.identity()
    tuned_lp = _label_logprob(m.adapted_llm_, SMALL)
    assert (tuned_lp > base_lp).all(), (base_lp, tuned_lp)  # every trained label got likelier
    assert tuned_lp.mean() - base_lp.mean() > 1.0, (base_lp, tuned_lp)  # by more than a nat per token on average
    assert 1_000_000 < m.storage_bytes_ < 4_000_000  # r=8 on q/v of 30 layers: ~1.8 MB of fp32 adapter
    assert m.adapt_seconds_ >= m.train_seconds_ > 0
    cached_before = len(embedded_llm.cache)
    preds = m.predict([s.text for s in SMALL])
    assert all(p.label in LABELS for p in preds)
    assert len(embedded_llm.cache) == cached_before  # the adapted model never writes the base model's cache
    assert _weights_digest(embedded_llm) == before  # the shared model was not touched


@pytest.mark.slow
def test_dpo_pairs_are_the_banks_discrepancies_and_training_leaves_the_shared_model(embedded_llm):
    before = _weights_digest(embedded_llm)
    m = DPO(embedded_llm, LABELS, Decoding(seed=3), epochs=1, batch_size=2)
    answers = ZeroShot(embedded_llm, LABELS, Decoding(seed=3)).answer_samples(SMALL, 0.7, 3)  # what a bank counts
    pairs = m.preference_pairs(SMALL)
    expected = [{"text": s.text, "chosen": s.label, "rejected": a} for s, a in zip(SMALL, answers) if a != s.label]
    assert pairs == expected and pairs, answers
    assert all(p["rejected"] in LABELS and p["rejected"] != p["chosen"] for p in pairs)
    m.fit(SMALL)
    assert m.n_pairs_ == len(pairs) and m.pairs_ == pairs
    assert isinstance(m.adapted_llm_, AdaptedLLM) and m.storage_bytes_ > 1_000_000 and m.train_loss_ is not None
    assert m.adapt_seconds_ >= m.answer_seconds_ + m.train_seconds_
    assert all(p.label in LABELS for p in m.predict([s.text for s in SMALL]))
    assert _weights_digest(embedded_llm) == before


@pytest.mark.slow
def test_dpo_without_pairs_answers_as_the_base_model(embedded_llm, caplog):
    """Samples labelled with the model's own greedy answers leave no discrepancy pair: nothing is trained."""
    zs = ZeroShot(embedded_llm, LABELS)
    own = [Example(s.text, p.label) for s, p in zip(SMALL, zs.predict([s.text for s in SMALL]))]
    m = DPO(embedded_llm, LABELS, answer_temperature=0.0).fit(own)
    assert m.n_pairs_ == 0 and m.storage_bytes_ == 0 and m.fingerprint_ is None
    assert "no pair to train on" in caplog.text
    assert m.adapted_llm_ is embedded_llm
    assert [p.label for p in m.predict([s.text for s in own])] == [s.label for s in own]


def test_adapted_identity_never_equals_the_base_identity(embedded_llm):
    """The cache key of an adapted model names its adapter; the base model's entries cannot be hit."""
    from cm_core.backends.cache import request_key
    inner = embedded_llm.inner
    a = AdaptedLLM(inner, inner.model_obj, inner.tok, "lora_sft-lora", "0123456789abcdef")
    b = AdaptedLLM(inner, inner.model_obj, inner.tok, "lora_sft-lora", "fedcba9876543210")
    req = ScoreRequest.of(_messages("hi"), LABELS).key()
    keys = {request_key(x.identity(), req) for x in (embedded_llm, a, b)}
    assert len(keys) == 3
    assert torch.is_tensor(next(a.model_obj.parameters()))
