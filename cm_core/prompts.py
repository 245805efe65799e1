"""Prompt content of the paper's methods, as chat messages. Pure functions: data in, messages out."""
from __future__ import annotations

from typing import Sequence

from .data import Example

CONTENT_FREE = "N/A"  # the content-free input used to calibrate label priors (Zhao et al., 2021)


def _label_block(labels: Sequence[str]) -> str:
    return "\n".join(f"- {lab}" for lab in labels)


def system_prompt(labels: Sequence[str] | None) -> str:
    base = "You are a text classifier. Answer with the single most likely label for the query, and nothing else."
    if labels:
        base += "\nThe labels are:\n" + _label_block(labels)
    return base


def zero_shot(query: str, labels: Sequence[str] | None) -> list[dict]:
    return [{"role": "system", "content": system_prompt(labels)},
            {"role": "user", "content": f"Query: {query}\nLabel:"}]


def few_shot(query: str, labels: Sequence[str] | None, examples: Sequence[Example]) -> list[dict]:
    if not examples:
        return zero_shot(query, labels)
    shots = "\n\n".join(f"Query: {e.text}\nLabel: {e.label}" for e in examples)
    return [{"role": "system", "content": system_prompt(labels)},
            {"role": "user", "content": f"Examples:\n\n{shots}\n\nQuery: {query}\nLabel:"}]


def cot_reasoning(example: Example) -> str:
    """The worked reasoning shown for the one demonstration (the paper's CoT adds one similar example)."""
    return (f"The query \"{example.text}\" is about {example.label}. "
            f"So the label is: {example.label}")


def chain_of_thought(query: str, labels: Sequence[str] | None, example: Example | None) -> list[dict]:
    demo = ""
    if example is not None:
        demo = f"Example:\nQuery: {example.text}\nReasoning: {cot_reasoning(example)}\n\n"
    return [{"role": "system", "content": system_prompt(labels)},
            {"role": "user", "content": f"{demo}Query: {query}\nThink step by step in one or two sentences about "
                                        "what the query asks, then give the label."}]


def cot_answer(messages: list[dict], reasoning: str) -> list[dict]:
    """After the model's reasoning, ask for the label alone (what gets scored or parsed)."""
    return messages + [{"role": "assistant", "content": reasoning},
                       {"role": "user", "content": "So the label is:"}]


def choose_among(query: str, candidates: Sequence[str]) -> list[dict]:
    """CM's second call: pick the most likely label for this query among the memory bank's candidates only."""
    return zero_shot(query, candidates)
