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


def run_command(body) -> int:
    """Run a command-line entry point: a CMError becomes one ``error:`` line and exit status 2 (no traceback), and
    Ctrl-C says how to resume, since finished LLM calls are already in the response cache."""
    import sys
    try:
        return body() or 0
    except CMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished LLM calls are in the response cache; re-run the same command to resume",
              file=sys.stderr)
        return 130
