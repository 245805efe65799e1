"""cm-personalize: Consistent Marginalization, a training-free way to make an LLM answer in one user's labels.

    from cm_core import CM, ZeroShot, make_backend, load_dataset, split_dataset
    llm = make_backend("embedded")
    cm = CM(ZeroShot(llm, ds.labels)).fit(split.preference.examples)
    cm.predict(split.test.texts)
"""
from .backends import CachedLLM, make_backend
from .bank import MemoryBank
from .cm import CM
from .data import Dataset, Example, load_dataset, load_file, parse_examples, split_dataset
from .errors import BackendError, BankError, CMError, DataError
from .evaluate import run_evaluation
from .methods import ChainOfThought, Decoding, FewShot, Prediction, SelfConsistency, ZeroShot

__version__ = "0.1.0"
__all__ = ["CM", "MemoryBank", "ZeroShot", "FewShot", "ChainOfThought", "SelfConsistency", "Decoding", "Prediction",
           "make_backend", "CachedLLM", "Dataset", "Example", "load_dataset", "load_file", "parse_examples",
           "split_dataset", "run_evaluation", "CMError", "DataError", "BankError", "BackendError"]
