"""The ``paper`` protocol's building blocks (cm_core.paper) against the official code's behaviour.

Splits are recomputed here independently, calling Python's ``random`` the way the official scripts do; prompts are
compared with literal texts (checked byte for byte against the official functions when they were written);
cleaning, voting and the CM rules with hand-made cases. No LLM, a few seconds.
"""
from __future__ import annotations

import json
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from cm_core import paper as P
from cm_core.data import Example

NAMES = ("banking77", "clinc", "massive_scenario", "mtop_intent", "stackexchange")
WITH_LARGE = ("banking77", "clinc", "massive_scenario", "mtop_intent")
TEST_SIZE = {"banking77": 1540, "clinc": 2250, "massive_scenario": 1487, "mtop_intent": 2193, "stackexchange": 2078}
SMALL_ROWS = {"banking77": 3080, "clinc": 4500, "massive_scenario": 2974, "mtop_intent": 4386, "stackexchange": 4156}
N_LABELS = {"banking77": 77, "clinc": 150, "massive_scenario": 18, "mtop_intent": 102, "stackexchange": 121}


def _data_dir() -> Path:
    """CM_DATA_DIR, else the repository's data/, else the shared datasets folder."""
    candidates = [os.environ.get("CM_DATA_DIR"), "/work/main/data", "/work/shared/datasets"]
    for c in candidates:
        if c and (Path(c) / "banking77" / "small.jsonl").is_file():
            return Path(c)
    pytest.skip(f"no datasets folder among {candidates}")


def _path(name: str, split: str) -> Path:
    return _data_dir() / name / f"{split}.jsonl"


@lru_cache(maxsize=None)
def _raw(name: str, split: str) -> tuple:
    """The official reader, written out: json.loads per line, (input, label)."""
    with open(_path(name, split), encoding="utf-8") as fh:
        return tuple((json.loads(line)["input"], json.loads(line)["label"]) for line in fh)


@lru_cache(maxsize=None)
def _split(name: str, fraction: float):
    large = _path(name, "large")
    return P.paper_split(_path(name, "small"), large if large.is_file() else None, fraction)


# --------------------------------------------------------------------------- splits

@pytest.mark.parametrize("name", NAMES)
def test_test_rows_are_the_official_seeded_half_of_small(name):
    rows = _raw(name, "small")
    assert len(rows) == SMALL_ROWS[name]
    random.seed(40)
    expected = random.sample(range(len(rows)), int(0.5 * len(rows)))
    # the Python 3.9 path: sample() turned the set into tuple(set), which is range's order for 0..n-1
    random.seed(40)
    assert random.sample(tuple(set(range(len(rows)))), int(0.5 * len(rows))) == expected
    assert len(expected) == TEST_SIZE[name]
    assert P.official_test_indices(len(rows)) == expected
    for fraction in (0.01, 0.05):
        _, test, info = _split(name, fraction)
        assert info["test_indices"] == expected
        assert len(test) == info["n_test"] == TEST_SIZE[name]
        assert [(e.text, e.label) for e in test] == [rows[i] for i in expected]
        assert all(isinstance(e, Example) for e in test)


@pytest.mark.parametrize("fraction", [0.01, 0.05])
@pytest.mark.parametrize("name", WITH_LARGE)
def test_preference_rows_are_the_official_seeded_draw_of_large(name, fraction):
    rows = _raw(name, "large")
    random.seed(40)
    expected = random.sample(range(len(rows)), int(fraction * len(rows)))
    assert P.official_pref_indices(len(rows), fraction) == expected
    pref, test, info = _split(name, fraction)
    assert info["pref_indices"] == expected and info["pref_source"] == "large"
    assert [(e.text, e.label) for e in pref] == [rows[i] for i in expected]
    assert info["n_pref"] == len(pref) == int(fraction * len(rows)) and info["departures"] == []
    assert info["pref_test_overlap"] == sum(e.text in {t.text for t in test} for e in pref)


def test_split_anchors_do_not_drift():
    """Frozen values: a change in Python's random (or in the code) shows here."""
    assert P.official_test_indices(3080)[:5] == [1878, 2373, 2146, 130, 1004]
    assert sum(P.official_test_indices(3080)) == 2388883
    assert P.official_test_indices(4500)[:5] == [3756, 4292, 260, 2009, 2313]
    assert sum(P.official_test_indices(4156)) == 4353927
    assert P.official_pref_indices(10003, 0.01)[:4] == [7513, 9494, 8584, 521]
    assert P.official_pref_indices(15000, 0.05)[:4] == [7513, 9494, 14382, 8584]
    # for these sizes the 1 % draw is a prefix of the 5 % draw (same random stream)
    assert P.official_pref_indices(10003, 0.05)[:100] == P.official_pref_indices(10003, 0.01)
    assert sorted(P.gpt_test_indices(3080)) == list(range(3080))


@pytest.mark.parametrize("fraction", [0.01, 0.05])
def test_stackexchange_without_large_draws_from_small_non_test_rows(fraction):
    pref, test, info = _split("stackexchange", fraction)
    assert info["pref_source"] == "small-non-test" and info["n_large"] is None
    assert info["departures"] and "not published" in info["departures"][0]
    assert len(pref) == int(fraction * 4156)
    assert not set(info["pref_indices"]) & set(info["test_indices"])
    assert info["pref_test_overlap"] == 0
    assert len(info["labels"]) == 121


def test_raw_lines_keep_duplicates_and_text_as_is():
    rows = P.read_raw_lines(_path("banking77", "small"))
    assert len(rows) == 3080 and len({(r["input"], r["label"]) for r in rows}) == 3079
    assert [(r["input"], r["label"]) for r in rows] == list(_raw("banking77", "small"))


@pytest.mark.parametrize("name", NAMES)
def test_candidate_labels_are_numpy_unique_of_the_large_split(name):
    split = "large" if name in WITH_LARGE else "small"
    labels = [lab for _, lab in _raw(name, split)]
    got = P.candidate_labels(P.read_raw_lines(_path(name, split)))
    assert got == list(np.unique(labels)) == sorted(set(labels))
    assert len(got) == N_LABELS[name]
    assert _split(name, 0.01)[2]["labels"] == got


def test_labels_print_as_the_numpy_array():
    labels = P.candidate_labels(P.read_raw_lines(_path("banking77", "large")))
    assert labels[0] == "Refund not showing up"  # capital R sorts first
    text = P.numpy_labels(labels)
    assert text == str(np.unique(labels))
    assert text.startswith("['Refund not showing up' 'activate my card' 'age limit'\n"
                           " 'apple pay or google pay' 'atm support' 'automatic top up'\n")
    assert P.numpy_labels(list(reversed(labels))) == text
    np.set_printoptions(linewidth=200)
    try:
        assert P.numpy_labels(labels) == text  # immune to the caller's print options
    finally:
        np.set_printoptions(linewidth=75)


# --------------------------------------------------------------------------- prompts

MASSIVE = ["alarm", "audio", "calendar", "cooking", "datetime", "email", "general", "iot", "lists", "music", "news",
           "play", "qa", "recommendation", "social", "takeaway", "transport", "weather"]
MASSIVE_NP = ("['alarm' 'audio' 'calendar' 'cooking' 'datetime' 'email' 'general' 'iot'\n"
              " 'lists' 'music' 'news' 'play' 'qa' 'recommendation' 'social' 'takeaway'\n"
              " 'transport' 'weather']")
Q = "wake me up at 7"
S12 = " " * 12
TAIL_TOTAL = "\n\n Please ensure there are a total of 1 responses."


def test_massive_labels_print_like_numpy():
    assert P.numpy_labels(MASSIVE) == MASSIVE_NP == str(np.unique(MASSIVE))


def test_zero_shot_prompt_llama_exact():
    expected = ("\n" + S12 + 'Query 1: "wake me up at 7"\n\n'
                + S12 + "Identify the SINGLE most likely intention from this set:\n"
                + S12 + MASSIVE_NP + "\n\n"
                + S12 + "Strictly follow the required format like {'weather'},{'alarm'}.\n" + S12
                + "\n\n Please strictly identified the SINGLE most likely intention from the set " + MASSIVE_NP
                + " and do not add any additional information !!! ."
                + "\n\n Please strictly only provide identified intents and do not add any additional information !!! ."
                + "\n\n Please ensure that only show the intents and do not add any words or additional"
                + " response please."
                + "\n\n Concatenate reponse together in a single array."
                + "\n\n Please do not show anything except responses." + TAIL_TOTAL + TAIL_TOTAL)
    assert P.zero_shot_messages(Q, MASSIVE, dataset="massive_scenario") == [{"role": "system", "content": expected}]


def test_zero_shot_prompt_gpt_is_one_user_message_with_its_own_wording():
    expected = ("\n" + S12 + 'Query 1: "wake me up at 7"\n\n\n'
                + S12 + "Strictly follow the required format like {'weather'},{'alarm'}.\n" + S12
                + "\n\n Please strictly identified the SINGLE most likely intention from the set " + MASSIVE_NP
                + " and do not add any additional information !!! ."
                + "\n\n Please strictly only provide identified intents and do not add any additional information !!! ."
                + "\n\n Concatenate reponse together in a single array."
                + "\n\n Please do not show anything except responses." + TAIL_TOTAL)
    assert P.zero_shot_messages(Q, MASSIVE, dataset="massive_scenario", as_user_message=True) == [
        {"role": "user", "content": expected}]


@pytest.mark.parametrize("name", NAMES)
def test_every_prompt_shows_the_numpy_printed_label_set(name):
    labels = _split(name, 0.01)[2]["labels"]
    shown = str(np.unique(labels))
    ref = P.Reference("an example", labels[0], f"The intent of this input is related to '{labels[0]}'.", 0.5)
    for msgs in (P.zero_shot_messages("q", labels, dataset=name),
                 P.zero_shot_messages("q", labels, dataset=name, as_user_message=True),
                 P.cot_messages("q", labels, ref, dataset=name),
                 P.few_shot_messages("q", labels, [ref] * 5, dataset=name),
                 P.bank_messages("q", labels, dataset=name), P.judge_messages("q", labels[0], labels)):
        assert len(msgs) == 1 and shown in msgs[0]["content"]
    fmt = "{'" + P.OFFICIAL_FORMATS[name][0] + "'}"
    assert fmt in P.zero_shot_messages("q", labels, dataset=name)[0]["content"]


def test_bank_prompt_exact():
    s4 = " " * 4
    expected = ("\n" + s4 + 'Query 1: "wake me up at 7"\n\n'
                + s4 + "Identify the SINGLE most likely intent from the following set:\n" + s4 + MASSIVE_NP + "\n\n"
                + s4 + "Strictly follow the required format: {'weather'}\n" + s4
                + "\n\n" + s4 + "IMPORTANT INSTRUCTIONS:\n\n"
                + s4 + "- Only return the identified single intent from the provided set " + MASSIVE_NP + ".\n"
                + s4 + "- Do NOT provide any explanation, reasoning, or extra text.\n"
                + s4 + "- Only respond with the intent string \u2014 nothing else.\n"
                + s4 + "- Concatenate all responses into a single array.\n"
                + s4 + "- Do not include any headings, comments, or formatting outside the array.\n" + s4)
    assert P.bank_messages(Q, MASSIVE, dataset="massive_scenario") == [{"role": "system", "content": expected}]
    assert "{'caring'}" in P.bank_messages(Q, ["a", "b"], dataset="clinc")[0]["content"]  # MBE's own clinc hint


def test_choose_prompt_exact_shows_only_the_candidates():
    expected = (' Considering the following query "wake me up at 7", must identifing the most likely single intention'
                " only from the intention set \n['alarm', 'calendar']. Ensure each response strictly adheres to the"
                " prescribed format.\n\nProvide each response in the specified format: {'weather'},{'alarm'},"
                "{'customer service'}. Do not include multiple outputs and input or explanatory text.\n\n"
                " Please ensure there are a total of one responses.")
    assert P.choose_messages(Q, ["alarm", "calendar"], dataset="massive_scenario") == [
        {"role": "system", "content": expected}]
    gpt = P.choose_messages(Q, ["alarm", "calendar"], dataset="massive_scenario", as_user_message=True)
    assert gpt == [{"role": "user", "content": expected}]


def test_cot_and_few_shot_prompts():
    ref = P.Reference("set an alarm", "alarm", "The intent of this input is related to 'alarm'.", 0.91234)
    block = ('\n\nThe sentence: "wake me up at 7"\nExample: "set an alarm"\nIntent: alarm\nSimilarity: 0.9123\n'
             "Chain of thoughts (expressed) of example: The intent of this input is related to 'alarm'.")
    cot = P.cot_messages(Q, MASSIVE, ref, dataset="massive_scenario")[0]["content"]
    assert cot.startswith("\n" + S12 + 'Query 1: "wake me up at 7"\n' + S12
                          + "Reference (semantically similar example):\n" + block + "\n\n" + S12
                          + "Identify the SINGLE")
    assert cot.count("Please ensure there are a total of 1 responses.") == 1
    assert "Strictly follow the required format like {'weather'}.\n" in cot
    few = P.few_shot_messages(Q, MASSIVE, [ref] * 5, dataset="massive_scenario")[0]["content"]
    assert few.count("Example: ") == 5 and "total of 1 responses" not in few
    gpt_few = P.few_shot_messages(Q, MASSIVE, [ref] * 4, dataset="massive_scenario", as_user_message=True)[0]["content"]
    assert block + "\n" + S12 + "Strictly follow" in gpt_few
    assert "from the " + MASSIVE_NP + " and do not" in gpt_few
    choose = P.gpt_few_shot_choose_messages(Q, ["alarm", "iot"], [ref] * 4, dataset="massive_scenario")[0]["content"]
    assert "from the ['alarm', 'iot'] and do not" in choose and MASSIVE_NP not in choose


def test_self_refine_prompts():
    judge = P.judge_messages(Q, "alarm", MASSIVE)[0]["content"]
    assert judge == ("Evaluate whether each identified intent from " + MASSIVE_NP + " correctly matches its sentence.\n"
                     "Respond ONLY with:\n- 'Correct' if it matches\n- 'Incorrect' if it doesn't\n\n"
                     "Evaluation pairs:\n1. Sentence: wake me up at 7\n   Intent: alarm")
    assert P.judge_messages(Q, "alarm", MASSIVE, as_user_message=True)[0]["content"].endswith(
        "\n  Identified Intent: alarm")
    revise = P.revise_messages(Q, "alarm", "Incorrect", MASSIVE)[0]["content"]
    assert revise.startswith("Refine the current intents ['alarm'] for the following 1 queries based on feedback "
                             "['Incorrect'].\nSelect the final Single intent **only** from: [" + MASSIVE_NP + "].\n")
    assert "\n1. Query: wake me up at 7\n   Feedback: Incorrect\n   Current Intent: alarm\n\n" in revise
    assert revise.endswith("3. Select single intent only from: [" + MASSIVE_NP + "]\n4. No explanations or extra text")
    assert P.feedback_line("\n  Incorrect \nCorrect") == "Incorrect" and P.feedback_line("") == "Unknown"
    assert P.refine_needed("Incorrect") and P.refine_needed("Unknown") and not P.refine_needed("1. Correct")


def test_unknown_dataset_uses_its_own_labels_as_format_hints():
    text = P.zero_shot_messages("q", ["b", "a"], dataset=None)[0]["content"]
    assert "like {'a'},{'b'}." in text


# --------------------------------------------------------------------------- decoding

def test_decoding_constants():
    d = P.PAPER_DECODING
    assert (d["llama_base"].temperature, d["llama_base"].top_p, d["llama_base"].max_new_tokens) == (0.7, 0.9, 60)
    assert (d["llama_base_t01"].temperature, d["llama_base_t01"].max_new_tokens) == (0.1, 60)
    assert (d["llama_choose"].temperature, d["llama_choose"].top_p, d["llama_choose"].max_new_tokens) == (0.7, 0.9, 60)
    assert (d["llama_bank"].temperature, d["llama_bank"].top_p, d["llama_bank"].max_new_tokens) == (0.7, 0.9, 30)
    assert (d["gpt_base"].temperature, d["gpt_base"].top_p, d["gpt_base"].max_new_tokens) == (0.7, None, 10)
    assert d["gpt_choose"].max_new_tokens == 20 and d["gpt_refine"].max_new_tokens == 20
    with pytest.raises(Exception):
        d["llama_base"].temperature = 1.0  # frozen
    with pytest.raises(TypeError):
        d["new"] = d["llama_base"]  # read-only mapping


# --------------------------------------------------------------------------- cleaning and scoring

@pytest.mark.parametrize("raw, key", [
    ("{'Alarm'}", "alarm"),
    ("['weather']", "weather"),
    ('"Play Music"', "play music"),
    ("[{'calendar'}]", "calendar"),
    ("  {cooking}  ", "cooking"),
    ("The intent is 'news' here", "news"),
    ("alarm\nweather", "alarm\nweather"),  # not split into lines
    ("caf\\u00e9", "caf\u00e9"),  # backslash escapes decoded
    ("  IOT ", "iot"),
])
def test_clean_official_bank_keys(raw, key):
    assert P.clean_official(raw) == key


@pytest.mark.parametrize("raw, scored", [
    ("{'alarm'}\n{'weather'}", "alarm"),  # the first line counts
    ("The intent is 'alarm'.", "alarm"),  # first quoted value
    ("['Alarm']", "alarm"),
    ("{'intent': 'alarm'}", "intent"),  # a dict literal gives its key
    ("{alarm}", "{alarm}"),  # unparsable braces stay
    ("  Weather  ", "weather"),
    ("", "Unknown"),
    ("{ }", "superuser.com.txt"),  # the official empty-prediction fallback
])
def test_clean_test_official(raw, scored):
    assert P.clean_test_official(raw) == scored


@pytest.mark.parametrize("raw, voted", [
    ("{'alarm'}", "alarm"),
    ("['Alarm']", "Alarm"),  # not lower-cased yet
    ("reverted card payment?", "reverted card payment"),
    ("Intent: alarm", "Intent"),
    ("", "Unknown"),
    ("{}", "Unknown"),
])
def test_clean_vote_official(raw, voted):
    assert P.clean_vote_official(raw) == voted


def test_strict_label():
    labels = ["alarm", "audio", "Refund not showing up"]
    assert P.strict_label("alarm", labels) == "alarm"
    assert P.strict_label(" Alarm \n", labels) == "alarm"
    assert P.strict_label("set alarm", labels) == "Unknown"  # contains a label: still Unknown
    assert P.strict_label("alarms", labels) == "Unknown"
    assert P.strict_label("Refund not showing up", labels) == "Unknown"  # capitalised label is unreachable
    assert P.UNKNOWN == "Unknown"
    assert P.official_answer("{'Audio'}", labels) == "audio"
    assert P.official_answer("reverted card payment?", ["reverted card payment?"]) == "Unknown"
    assert P.is_correct(P.clean_test_official("{'alarm'}"), "alarm")
    assert not P.is_correct(P.clean_test_official("Refund not showing up"), "Refund not showing up")


def test_clean_refined():
    assert P.clean_refined("  {'alarm'} ") == "alarm" and P.clean_refined(["[weather]"]) == "weather"
    assert P.clean_refined("") == "Unknown"


# --------------------------------------------------------------------------- vote, CM rules, bank

def test_self_consistency_vote_tie_rule():
    assert P.self_consistency_vote("a", "b", "c") == "a"  # three-way tie: zero-shot
    assert P.self_consistency_vote("a", "b", "b") == "b"
    assert P.self_consistency_vote("a", "b", "a") == "a"
    assert P.self_consistency_vote("Alarm", "alarm", "x") == "Alarm"  # case-sensitive votes
    # GPT: voters zero-shot, self-refine, few-shot, CoT
    assert P.self_consistency_vote("a", "b", "a", refine="b") == "a"  # 2-2 tie: zero-shot's answer
    assert P.self_consistency_vote("a", "b", "c", refine="c") == "c"
    assert P.self_consistency_vote("a", "b", "b", refine="c") == "b"


BANK = {"alarm": ["alarm", "weather"], "weather": ["alarm"], "music": ["music"], "wake up": ["alarm", "iot"]}


def test_cm_paper_rule():
    assert P.cm_paper_rule("alarm", BANK) == (None, ["alarm", "weather"])  # re-ask among candidates
    assert P.cm_paper_rule("weather", BANK) == ("weather", ["alarm"])  # single candidate: base kept
    assert P.cm_paper_rule("music", BANK) == ("music", ["music"])
    assert P.cm_paper_rule("cooking", BANK) == ("cooking", None)  # no entry
    assert P.cm_paper_rule("Unknown", BANK) == ("Unknown", None)


def test_cm_formula_rule():
    assert P.cm_formula_rule("weather", BANK) == ("alarm", ["alarm"])  # single candidate: mapped
    assert P.cm_formula_rule("alarm", BANK) == (None, ["alarm", "weather"])
    assert P.cm_formula_rule("cooking", BANK) == ("cooking", None)


def test_official_bank_shape():
    pairs = [("{'alarm'}", "alarm"), ("'Alarm'", "weather"), ("alarm", "alarm"), ("['news']", "news"),
             ("['news']", "audio"), ("wake me up", "alarm")]
    bank = P.official_bank(pairs)
    assert bank == {"alarm": ["alarm", "weather"], "news": ["news", "audio"], "wake me up": ["alarm"]}
    assert list(bank) == ["alarm", "news", "wake me up"]
    assert P.official_bank([("X", "a")], clean=False) == {"X": ["a"]}
    # the bank feeds the rule directly
    assert P.cm_paper_rule(P.official_answer("{'alarm'}", MASSIVE), bank) == (None, ["alarm", "weather"])


def test_load_official_bank(tmp_path):
    path = tmp_path / "Memory_Masking_x_0.01_0.7_1.json"
    path.write_text(json.dumps({"alarm": ["alarm", "weather"], "how it's possible": ["qa"]}), encoding="utf-8")
    assert P.load_official_bank(path) == {"alarm": ["alarm", "weather"], "how it's possible": ["qa"]}
    path.write_text(json.dumps({"alarm": "alarm"}), encoding="utf-8")
    with pytest.raises(ValueError):
        P.load_official_bank(path)


def test_load_demonstrations(tmp_path):
    path = tmp_path / "selected_data_x.json"
    path.write_text(json.dumps({"set an alarm": {"intent": "alarm", "chain_of_thoughts": {
        "expressed": "The intent of this input is related to 'alarm'.", "reasoning": "r"}}}), encoding="utf-8")
    assert P.load_demonstrations(path) == [
        P.Reference("set an alarm", "alarm", "The intent of this input is related to 'alarm'.", 0.0)]
