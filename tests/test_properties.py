"""Property-based tests: random and malformed inputs to the loaders and the bank importer raise only our own
error type (DataError / BankError), never a crash from inside."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cm_core.bank import MemoryBank
from cm_core.data import Example, parse_examples, split_dataset, Dataset
from cm_core.errors import BankError, DataError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


@SETTINGS
@given(st.text(max_size=400), st.sampled_from(["jsonl", "csv", "tsv", None]))
def test_parse_examples_random_text(text, fmt):
    try:
        rows = parse_examples(text, source="fuzz", fmt=fmt, text_column="input", label_column="label")
    except DataError as e:
        assert "fuzz" in str(e)
        return
    assert rows and all(isinstance(r, Example) and r.text and r.label for r in rows)


@SETTINGS
@given(st.lists(json_values, max_size=6))
def test_parse_examples_random_jsonl(objs):
    text = "\n".join(json.dumps(o) for o in objs)
    try:
        rows = parse_examples(text, source="fuzz.jsonl", text_column="input", label_column="label")
    except DataError:
        return
    assert all(r.text.strip() and r.label.strip() for r in rows)


@SETTINGS
@given(st.binary(max_size=300))
def test_bank_importer_random_bytes(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        bank = MemoryBank.from_json(text if text.lstrip().startswith("{") else "{" + text)
    except BankError:
        return
    assert all(isinstance(c, int) and c > 0 for row in bank.counts.values() for c in row.values())


@SETTINGS
@given(json_values)
def test_bank_importer_random_json(obj):
    try:
        bank = MemoryBank.from_dict(obj)
    except BankError:
        return
    again = MemoryBank.from_json(bank.to_json())
    assert again.counts == bank.counts


@SETTINGS
@given(st.lists(st.tuples(st.text(min_size=1, max_size=5), st.sampled_from("abc")), min_size=2, max_size=40),
       st.integers(1, 10), st.integers(0, 5))
def test_split_always_disjoint(rows, count, seed):
    ds = Dataset("fuzz", [Example(t, y) for t, y in rows])
    try:
        sp = split_dataset(ds, pref_count=count, seed=seed)
    except DataError:
        return
    assert not {e.text for e in sp.preference.examples} & {e.text for e in sp.test.examples}
    assert len(sp.preference) == count
