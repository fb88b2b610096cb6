"""--calib sources, offline: a text file, local data files, a dataset saved with save_to_disk;
a Hub id is tried only through `datasets` (here: offline, so a clear error)."""

import json

import pytest

from endor.data.calib import load_calibration_text

datasets = pytest.importorskip("datasets")

RECORDS = [{"text": "First record about Hamlet.", "n": 1}, {"text": "  ", "n": 2},
           {"text": "Second record, Ophelia.", "n": 3}]


def test_text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("plain text\nwith lines", encoding="utf-8")
    assert load_calibration_text(str(p)) == "plain text\nwith lines"
    p.write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_calibration_text(str(p))


def test_jsonl_file_joins_the_text_column(tmp_path):
    p = tmp_path / "calib.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert load_calibration_text(str(p)) == ("First record about Hamlet.\n\n"
                                             "Second record, Ophelia.")
    assert load_calibration_text(str(p), max_chars=5) == "First record about Hamlet."
    with pytest.raises(ValueError, match="no column 'body'.*--calib-column"):
        load_calibration_text(str(p), column="body")
    with pytest.raises(ValueError, match="holds int, not text"):
        load_calibration_text(str(p), column="n")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    data = datasets.Dataset.from_list(RECORDS)
    data.save_to_disk(str(tmp_path / "one"))
    assert "Ophelia" in load_calibration_text(str(tmp_path / "one"))
    datasets.DatasetDict({"train": data.select([0]), "validation": data.select([2])}) \
        .save_to_disk(str(tmp_path / "dict"))
    assert load_calibration_text(str(tmp_path / "dict")) == "First record about Hamlet."
    assert load_calibration_text(str(tmp_path / "dict"), split="validation") == \
        "Second record, Ophelia."
    with pytest.raises(ValueError, match="no split 'test'"):
        load_calibration_text(str(tmp_path / "dict"), split="test")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="is a directory, not a dataset"):
        load_calibration_text(str(tmp_path / "plain"))


def test_missing_paths_and_offline_hub_ids_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such file"):
        load_calibration_text(str(tmp_path / "missing.txt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load the Hub dataset"):
        load_calibration_text("endor-test/no-such-dataset-xyz")
