"""cm-personalize: Consistent Marginalization, a training-free way to make an LLM answer in one user's labels.

    from cm_core import build, make_backend, load_dataset, split_dataset
    llm = make_backend("embedded")
    cm = build("zero_shot+cm", labels=ds.labels, llm=llm).fit(split.preference.examples)
    cm.predict(split.test.texts)
"""
from .backends import CachedLLM, make_backend
from .bank import MemoryBank
from .cm import CM, estimate_bank
from .data import Dataset, Example, load_dataset, load_file, parse_examples, split_dataset
from .errors import BackendError, BankError, CMError, DataError
from .evaluate import run_evaluation
from .methods import (ChainOfThought, Decoding, FewShot, NotFittedError, Prediction, SelfConsistency,
                      ZeroShot)
from .registry import build

__version__ = "0.2.0"
__all__ = ["build", "CM", "estimate_bank", "MemoryBank", "ZeroShot", "FewShot", "ChainOfThought", "SelfConsistency",
           "Decoding", "Prediction", "NotFittedError", "make_backend", "CachedLLM", "Dataset", "Example",
           "load_dataset", "load_file", "parse_examples", "split_dataset", "run_evaluation", "CMError", "DataError",
           "BankError", "BackendError"]
