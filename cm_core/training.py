"""Per-user TRAINING baselines on exactly CM's preference samples: what a user could do instead of a memory bank
when the model's weights are at hand. Each is a :class:`~cm_core.methods.Method` the registry builds by name.

- ``lora_sft`` (``_e2``, ``_e4``: 2 and 4 epochs): LoRA (peft, r=8 on q_proj/v_proj) supervised fine-tuning with
  TRL's ``SFTTrainer`` on (our zero-shot prompt -> the user's label + end of turn), loss on the reply only.
- ``dpo`` (``_e2``, ``_e4``): TRL's ``DPOTrainer`` with LoRA adapters on the bank's discrepancy pairs: prompt = the
  zero-shot prompt, chosen = the user's label, rejected = the base model's own zero-shot answer.
- ``frozen_head``: in the spirit of Latent DPO, a logistic-regression head (scikit-learn) on the frozen model's
  hidden states of the zero-shot prompt; no gradient reaches the model.

Every fit leaves the shared backend's model untouched: the trainers load their own copy of the weights (the embedded
checkpoint :func:`~cm_core.backends.hf.materialize_embedded` made, or a ``TransformersLLM``'s id/path) and the head
only reads hidden states under ``inference_mode``. An adapted model answers through its own uncached
``TransformersLLM`` whose identity names a fingerprint of its adapter, so it never reads or writes the base model's
cache entries. Training needs the weights: a remote backend (OpenAI-compatible server) is refused with a CMError.

What each fit records: ``adapt_seconds_`` (the whole fit: loading the copy, building the data, training, merging),
``train_seconds_`` (the trainer alone), ``storage_bytes_`` (what one user costs to keep: the saved LoRA adapter
files, or the head's JSON), ``fingerprint_``. CM variants (``lora_sft+cm``) are not offered: the model is the
user's own, and a bank of its answers on its own training samples would be an identity (``supports_cm = False``,
which the registry reads).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import prompts
from .backends.base import LLM
from .backends.hf import EmbeddedLLM, TransformersLLM, materialize_embedded
from .data import Example
from .errors import CMError
from .methods import Decoding, Method, Prediction, ZeroShot, softmax

log = logging.getLogger(__name__)

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def local_model(llm: LLM | None, method: str) -> TransformersLLM:
    """The local transformers model under ``llm`` (through the response cache), or a CMError saying why not."""
    inner = llm
    while inner is not None and not isinstance(inner, TransformersLLM) and hasattr(inner, "inner"):
        inner = inner.inner
    if not isinstance(inner, TransformersLLM):
        what = llm.label if llm is not None else "no backend"
        raise CMError(f"{method} trains on the model's weights, so it needs a local transformers model "
                      f"(--model embedded or hf:ID_OR_PATH); {what} is not one")
    return inner


def weights_source(inner: TransformersLLM) -> tuple[str, str | None]:
    """Where a fresh copy of ``inner``'s weights loads from: (path or hub id, revision)."""
    if isinstance(inner, EmbeddedLLM):
        loaded = str(getattr(inner.model_obj, "name_or_path", "") or "")
        return (loaded if Path(loaded, "config.json").is_file() else str(materialize_embedded())), None
    return inner.model, inner.revision


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class AdaptedLLM(TransformersLLM):
    """A user's adapted copy of the model. Its identity names the base model and the adapter's fingerprint, so a
    response cache around it could never serve (or store) the base model's answers."""

    kind = "hf-adapted"

    def __init__(self, base: TransformersLLM, model, tokenizer, adapter: str, fingerprint: str):
        super().__init__(f"{base.model}+{adapter}:{fingerprint}", model=model, tokenizer=tokenizer,
                         device=base.device, dtype=base.dtype_name, score_batch_size=base.score_batch_size)
        self.base_identity, self.adapter, self.fingerprint = base.identity(), adapter, fingerprint

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "base": self.base_identity, "adapter": self.adapter,
                "fingerprint": self.fingerprint}


def _messages(text: str) -> list[dict]:
    """The zero-shot prompt as the predictions see it (labels not listed: they are scored as replies)."""
    return prompts.zero_shot(text, None)


class TrainedLLMMethod(Method):
    """Shared plumbing of the methods that adapt their own copy of the model: check the backend at construction,
    load a fresh copy in ``_fit``, answer zero-shot with the adapted copy in ``predict``."""

    needs_llm = True
    needs_samples = True
    supports_cm = False
    epochs = 1
    adapter = "lora"
    default_lr = 1e-3

    def __init__(self, llm: LLM, labels: Sequence[str], decoding: Decoding | None = None, *,
                 epochs: int | None = None, learning_rate: float | None = None, batch_size: int = 4,
                 seed: int | None = None):
        self.llm, self.labels = llm, list(labels)
        self.dec = decoding or Decoding()
        self.base_ = local_model(llm, self.name)
        self.epochs = int(epochs if epochs is not None else type(self).epochs)
        if self.epochs < 1:
            raise ValueError(f"{self.name}: epochs must be at least 1, got {self.epochs}")
        self.learning_rate = learning_rate if learning_rate is not None else self.default_lr
        self.batch_size = batch_size
        self.seed = self.dec.seed if seed is None else seed

    def _load_copy(self):
        """A fresh copy of the backend's weights and tokenizer, on its device and in its dtype."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        src, revision = weights_source(self.base_)
        try:
            tok = AutoTokenizer.from_pretrained(src, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(src, revision=revision,
                                                         dtype=getattr(torch, self.base_.dtype_name))
        except Exception as e:  # e.g. a TransformersLLM built around an in-memory model: no weights to copy
            raise CMError(f"{self.name}: could not load a fresh copy of the weights from {src!r} "
                          f"({type(e).__name__}: {e}); training never touches the shared model, so it needs "
                          "them on disk or in the Hugging Face cache") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model.to(self.base_.device), tok

    def _trainer_args(self, cls, out_dir: str, **kw):
        """TRL config shared by both trainers: constant learning rate (so a shorter run is a prefix of a longer
        one), no activation checkpointing (TRL turns it on by default; short prompts need no memory saving and it
        recomputes every forward), no checkpoints, no logging integrations, quiet."""
        dev = self.base_.device
        return cls(output_dir=out_dir, num_train_epochs=self.epochs, learning_rate=self.learning_rate,
                   per_device_train_batch_size=self.batch_size, lr_scheduler_type="constant", warmup_steps=0,
                   weight_decay=0.0, seed=self.seed, data_seed=self.seed, save_strategy="no", logging_strategy="no",
                   report_to="none", disable_tqdm=True, use_cpu=not dev.startswith("cuda"),
                   bf16=self.base_.dtype_name == "bfloat16" and dev.startswith("cuda"), dataloader_pin_memory=False,
                   activation_checkpointing=False, **kw)

    def _train(self, model, tok, samples: list[Example], out_dir: str):
        """Train LoRA adapters on ``model``; return the trained PeftModel (or None when there is nothing to train)."""
        raise NotImplementedError

    def _fit(self, samples: list[Example]) -> None:
        from peft import PeftModel
        t0 = time.perf_counter()
        model, tok = self._load_copy()
        self.load_seconds_ = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix=f"cm-{self.name}-") as tmp:
            from transformers import set_seed
            set_seed(self.seed)  # the adapters' initialization too (peft draws it before the trainer seeds)
            t1 = time.perf_counter()
            peft_model = self._train(model, tok, samples, tmp)
            self.train_seconds_ = time.perf_counter() - t1
            if peft_model is None:  # nothing to train on: the base model answers
                self.adapted_llm_, self.storage_bytes_, self.fingerprint_ = self.llm, 0, None
                del model
            else:
                assert isinstance(peft_model, PeftModel)
                adapter_dir = Path(tmp) / "adapter"
                peft_model.save_pretrained(adapter_dir)
                files = [p for p in adapter_dir.iterdir() if p.is_file()]
                self.storage_bytes_ = sum(p.stat().st_size for p in files)  # weights (safetensors) + config
                self.fingerprint_ = _file_digest([f for f in files if f.suffix == ".safetensors"] or files)
                merged = peft_model.merge_and_unload()
                merged.eval()
                self.adapted_llm_ = AdaptedLLM(self.base_, merged, tok, f"{self.name}-{self.adapter}",
                                               self.fingerprint_)
        self.predictor_ = ZeroShot(self.adapted_llm_, self.labels, self.dec)
        self.adapt_seconds_ = time.perf_counter() - t0

    def predict(self, texts, candidates=None) -> list[Prediction]:
        self._check_fitted()
        return self.predictor_.predict(texts, candidates)

    def lora_config(self):
        from peft import LoraConfig
        return LoraConfig(task_type="CAUSAL_LM", **LORA)


class LoRASFT(TrainedLLMMethod):
    """LoRA supervised fine-tuning with TRL's ``SFTTrainer`` on prompt-completion pairs: prompt = our zero-shot
    prompt (chat-templated), completion = the user's label as the assistant's reply; the chat template closes the
    reply with its end-of-turn token, and the loss covers the reply only (``completion_only_loss``), so the model
    learns exactly what the scoring asks: the label's tokens and the end of turn after the prompt. AdamW at a
    constant learning rate of 1e-3, batches of 4 (bench_adaptation's hand-written loop used 1e-3 with batches of
    1; TRL 1.16 works with transformers 5.24 here, so no hand-written loop is kept)."""

    name = "lora_sft"

    def _train(self, model, tok, samples, out_dir):
        import datasets
        from trl import SFTConfig, SFTTrainer
        rows = [{"prompt": _messages(s.text), "completion": [{"role": "assistant", "content": s.label}]}
                for s in samples]
        args = self._trainer_args(SFTConfig, out_dir, completion_only_loss=True, max_length=None,
                                  dataset_num_proc=None, packing=False)
        with _quiet():
            trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok, peft_config=self.lora_config())
            _quiet_callbacks(trainer)
            trainer.train()
        self.train_loss_ = _final_loss(trainer)
        return trainer.model


class LoRASFT2(LoRASFT):
    name, epochs = "lora_sft_e2", 2


class LoRASFT4(LoRASFT):
    name, epochs = "lora_sft_e4", 4


class DPO(TrainedLLMMethod):
    """Direct preference optimization (TRL's ``DPOTrainer``, LoRA adapters through ``peft_config``; the reference is
    the same model with the adapters disabled, its log-probabilities computed once before training).

    Pairs are the bank's discrepancy pairs: for each preference sample the base model answers zero-shot exactly as
    CM's bank estimation does (the same scoring requests, one answer drawn at ``answer_temperature`` with the
    decoding's seed, so through a response cache CM and DPO share these answers); a sample whose answer already is
    the user's label gives no pair and is skipped (as is a failed answer). prompt = the zero-shot prompt, chosen =
    the user's label, rejected = the model's answer. ``pairs_`` keeps them, ``answer_seconds_`` the answering time.

    When no pair remains (the model already answers every sample with the user's label) there is nothing to
    prefer: no adapter is trained, a warning is logged, ``n_pairs_ == 0``, ``storage_bytes_ == 0`` and the method
    answers as zero-shot on the base model (through the given backend)."""

    name = "dpo"
    adapter = "dpo-lora"
    default_lr = 5e-4

    def __init__(self, llm, labels, decoding=None, *, beta: float = 0.1, answer_temperature: float = 0.7, **kw):
        super().__init__(llm, labels, decoding, **kw)
        self.beta, self.answer_temperature = beta, answer_temperature

    def preference_pairs(self, samples: Sequence[Example]) -> list[dict[str, str]]:
        """(text, chosen = user's label, rejected = the base model's zero-shot answer) where the two differ."""
        samples = list(samples)
        base = ZeroShot(self.llm, self.labels, self.dec)
        answers = base.answer_samples(samples, self.answer_temperature, self.seed)
        return [{"text": s.text, "chosen": s.label, "rejected": a} for s, a in zip(samples, answers)
                if a and a != s.label]

    def _fit(self, samples):
        t0 = time.perf_counter()
        self.pairs_ = self.preference_pairs(samples)
        self.n_pairs_ = len(self.pairs_)
        self.answer_seconds_ = time.perf_counter() - t0
        super()._fit(samples)
        self.adapt_seconds_ += self.answer_seconds_

    def _load_copy(self):
        if not self.pairs_:  # nothing to train: do not load a copy for nothing
            return None, None
        return super()._load_copy()

    def _train(self, model, tok, samples, out_dir):
        if not self.pairs_:
            log.warning("%s: the model already answers all %d samples with the user's label; no pair to train on, "
                        "answering as zero-shot on the base model", self.name, len(samples))
            return None
        import datasets
        from trl import DPOConfig, DPOTrainer
        rows = [{"prompt": _messages(p["text"]), "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in self.pairs_]
        args = self._trainer_args(DPOConfig, out_dir, beta=self.beta, max_length=None, precompute_ref_log_probs=True,
                                  dataset_num_proc=None)
        with _quiet():
            trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tok, peft_config=self.lora_config())
            _quiet_callbacks(trainer)
            trainer.train()
        self.train_loss_ = _final_loss(trainer)
        return trainer.model


class DPO2(DPO):
    name, epochs = "dpo_e2", 2


class DPO4(DPO):
    name, epochs = "dpo_e4", 4


@contextlib.contextmanager
def _quiet():
    """No progress bars from the datasets' preprocessing and no deprecation notice transformers 5 gives for the
    gradient-checkpointing name TRL/peft still read, during one fit; the settings are restored afterwards."""
    from datasets.utils import logging as ds_logging
    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
            yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def _quiet_callbacks(trainer) -> None:
    """The trainer's metrics go to ``train_loss_``, not to stdout (the CLI prints its own table)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)


def _final_loss(trainer) -> float | None:
    hist = [h for h in trainer.state.log_history if "train_loss" in h]
    return float(hist[-1]["train_loss"]) if hist else None


class FrozenHead(Method):
    """In the spirit of Latent DPO: the LLM stays frozen and a small head learns the user's labels on its hidden
    states. Features: the last layer's hidden state of the zero-shot prompt at its last token (``pooling="last"``,
    the position whose state the LM head reads to predict the reply) or averaged over the prompt's tokens
    (``"mean"``); on clinc, 225 samples (5 %), 60 test rows: last 41.7 %, mean 40.0 % (layer -8: 31.7 / 30.0 %).
    The head: scikit-learn's standardization and multinomial logistic regression. The fitted head is plain JSON
    (``head_``: classes, scaler, coefficients, as float32) and predictions are computed from that JSON, so
    ``storage_bytes_`` (its UTF-8 size) is what a user costs to keep. Features are read from the shared model under ``inference_mode``: nothing is copied or changed."""

    name = "frozen_head"
    needs_llm = True
    needs_samples = True
    supports_cm = False

    def __init__(self, llm: LLM, labels: Sequence[str], decoding: Decoding | None = None, *, pooling: str = "last",
                 layer: int = -1, C: float = 1.0, batch_size: int = 16):
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.llm, self.labels = llm, list(labels)
        self.base_ = local_model(llm, self.name)
        self.pooling, self.layer, self.C, self.batch_size = pooling, layer, C, batch_size

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text: the chosen layer's hidden state of its zero-shot prompt, pooled."""
        import torch
        m = self.base_
        rows = []
        with m._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                ids = [m._prompt_ids(tuple((d["role"], d["content"]) for d in _messages(t)))
                       for t in texts[i:i + self.batch_size]]
                L = max(map(len, ids))
                pad = m.tok.pad_token_id if m.tok.pad_token_id is not None else 0
                x = torch.tensor([[pad] * (L - len(r)) + r for r in ids], device=m._dev)  # left padding
                mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in ids], device=m._dev)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                out = m.model_obj(input_ids=x, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                                  use_cache=False, logits_to_keep=1)
                h = out.hidden_states[self.layer].float()
                if self.pooling == "last":
                    rows.append(h[:, -1].cpu().numpy())
                else:
                    keep = mask.unsqueeze(-1).bool()  # padding rows may hold NaN (they attend to nothing)
                    h = torch.where(keep, h, torch.zeros_like(h))
                    rows.append((h.sum(1) / keep.sum(1)).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0))

    def _fit(self, samples: list[Example]) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
        t0 = time.perf_counter()
        X = self.features([s.text for s in samples])
        y = [s.label for s in samples]
        f32 = lambda a: np.asarray(a, dtype=np.float32).tolist()  # noqa: E731
        if len(set(y)) < 2:  # logistic regression needs two classes: every query gets the one label seen
            head: dict[str, Any] = {"classes": [y[0]], "mean": None, "scale": None, "coef": None, "intercept": None}
        else:
            scaler = StandardScaler().fit(X)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
                clf = LogisticRegression(C=self.C, max_iter=3000).fit(scaler.transform(X), y)
            head = {"classes": [str(c) for c in clf.classes_], "mean": f32(scaler.mean_), "scale": f32(scaler.scale_),
                    "coef": f32(clf.coef_), "intercept": f32(clf.intercept_)}
        self.head_ = {"kind": "frozen_head", "version": 1, "model": self.base_.identity(), "pooling": self.pooling,
                      "layer": self.layer, **head}
        blob = json.dumps(self.head_, separators=(",", ":")).encode("utf-8")
        self.storage_bytes_ = len(blob)
        self.fingerprint_ = hashlib.sha256(blob).hexdigest()[:16]
        self.adapt_seconds_ = time.perf_counter() - t0

    def _dists(self, X: np.ndarray) -> list[dict[str, float]]:
        """p(label | x) from the JSON head alone."""
        h = self.head_
        classes = h["classes"]
        if h["coef"] is None:
            return [{classes[0]: 1.0} for _ in range(len(X))]
        Z = (X - np.asarray(h["mean"])) / np.asarray(h["scale"])
        W, b = np.asarray(h["coef"]), np.asarray(h["intercept"])
        logits = Z @ W.T + b
        if W.shape[0] == 1:  # binary: scikit-learn keeps one row, for the second class
            logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
        return [dict(zip(classes, softmax(row).tolist())) for row in logits]

    def predict(self, texts, candidates=None) -> list[Prediction]:
        self._check_fitted()
        texts = list(texts)
        dists = self._dists(self.features(texts)) if texts else []
        out = []
        for i, d in enumerate(dists):
            cands = list(candidates[i]) if candidates is not None else self.labels
            sub = {c: d.get(c, 0.0) for c in cands}
            total = sum(sub.values())
            sub = {k: (v / total if total > 0 else 1.0 / len(cands)) for k, v in sub.items()}
            out.append(Prediction(max(cands, key=lambda c: sub[c]), sub))
        return out


TRAINING_METHODS: tuple[type[Method], ...] = (LoRASFT, LoRASFT2, LoRASFT4, DPO, DPO2, DPO4, FrozenHead)
