"""The vocabulary-misalignment setting: seeded, documented renamings of a dataset's labels, the model keeping its
own words (the original names), and the CLI / grid switch that runs an evaluation in it."""
from __future__ import annotations

import json

import pytest

from cm_core.cli import main
from cm_core.data import load_dataset
from cm_core.errors import CMError
from cm_core.experiments.grid import check_grid, expand_grid
from cm_core.misalign import COLOURS, NOUNS, SCHEMES, misaligned, rename_map


@pytest.mark.parametrize("scheme", SCHEMES)
def test_renaming_is_a_seeded_bijection_that_hides_the_meaning(scheme):
    ds = load_dataset("clinc")  # 150 labels: the largest label set of the paper's datasets
    names = rename_map(ds.labels, scheme)
    assert sorted(names) == sorted(ds.labels) and len(set(names.values())) == len(ds.labels)
    assert rename_map(list(reversed(ds.labels)), scheme) == names  # the order labels come in changes nothing
    assert rename_map(ds.labels, scheme, seed=1) != names
    original_words = {w for label in ds.labels for w in label.replace("_", " ").split()}
    for new in names.values():
        assert not set(new.replace("-", " ").split()) & original_words, new  # no name says what it means
        if scheme == "nicknames":
            colour, noun = new.split()
            assert colour in COLOURS and noun in NOUNS
        else:
            letter, number = new.split("-")
            assert len(letter) == 1 and number.isdigit()


def test_misaligned_dataset_keeps_rows_and_gives_the_model_the_original_names():
    ds = load_dataset("massive_scenario")
    renamed, responses = misaligned(ds, "nicknames")
    names = rename_map(ds.labels, "nicknames")
    assert responses == ds.labels
    assert renamed.texts == ds.texts
    assert renamed.targets == [names[t] for t in ds.targets]
    assert renamed.labels == sorted(names.values()) and renamed.name == "massive_scenario:nicknames"


def test_unknown_scheme_and_too_many_labels_are_refused():
    with pytest.raises(CMError, match="unknown renaming 'emoji'"):
        rename_map(["a", "b"], "emoji")
    with pytest.raises(CMError, match="at most 256"):
        rename_map([f"label {i}" for i in range(300)], "nicknames")


def test_cli_rename_runs_the_setting_and_records_it(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--dataset", "massive_scenario", "--rename", "codes", "--methods", "knn,label_similarity",
               "--pref-count", "60", "--n-test", "30", "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    codes = set(rename_map(load_dataset("massive_scenario").labels, "codes").values())
    assert res["config"]["rename"] == "codes" and res["config"]["dataset"] == "massive_scenario:codes"
    assert set(res["gold"]) <= codes and set(res["predictions"]["knn"]) <= codes
    # kNN learns the codes from the samples; label-name similarity has nothing to go on
    assert res["results"]["knn"]["accuracy"] > res["results"]["label_similarity"]["accuracy"] + 0.2


def test_cli_rename_is_refused_where_it_cannot_apply(tmp_path, capsys):
    rc = main(["evaluate", "--protocol", "paper", "--dataset", "banking77", "--rename", "codes",
               "--methods", "zero_shot", "--output", str(tmp_path / "r.json")])
    assert rc != 0 and "--rename does not apply to --protocol paper" in capsys.readouterr().err


def test_grid_cells_carry_the_setting_in_their_ids_and_parameters():
    g = check_grid({"datasets": ["banking77"], "rename": "nicknames", "methods": ["own_words+cm", "knn"]})
    cell, = expand_grid(g)
    assert cell["id"] == "nicknames_embedded_banking77_0.05" and cell["params"]["rename"] == "nicknames"
    with pytest.raises(CMError, match="rename must be one of"):
        check_grid({"datasets": ["banking77"], "rename": "emoji"})
