"""One error family, so CLI, notebooks and demo can show a clear message instead of a traceback."""
from __future__ import annotations


class CMError(Exception):
    """Base class of every error this library raises on purpose."""


class DataError(CMError, ValueError):
    """Bad user data: names the file, the line (1-based) and the problem."""

    def __init__(self, problem: str, *, source: str | None = None, line: int | None = None):
        self.problem, self.source, self.line = problem, source, line
        where = ""
        if source:
            where = f"{source}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(where + problem)


class BankError(DataError):
    """A memory bank JSON of the wrong version or shape."""


class BackendError(CMError, RuntimeError):
    """An LLM backend failed (network, HTTP status, timeout, unusable reply) after its retries."""
