import json

import pytest

from endor.cli import main
from endor.evaluate import perplexity
from endor.reference_loader import load_in_memory
from tests.evaluate.tiny_models import char_tokenizer, tiny_model, write_endor_checkpoint

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


@pytest.fixture
def checkpoint(tmp_path):
    write_endor_checkpoint(tiny_model(), tmp_path / "ckpt", tokenizer=char_tokenizer(add_bos=True))
    (tmp_path / "text.txt").write_text(TEXT)
    return tmp_path


def test_json_matches_the_library(checkpoint, capsys):
    code = main(["eval", str(checkpoint / "ckpt"), "--text", str(checkpoint / "text.txt"),
                 "--window", "16", "--max-windows", "3", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    model, tokenizer = load_in_memory(checkpoint / "ckpt")
    expected = perplexity(model, tokenizer, TEXT, window=16, max_windows=3)
    assert printed["windows"] == 3 and printed["tokens"] == 48 and printed["add_bos"] is True
    assert printed["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)


def test_plain_output_and_bos_override(checkpoint, capsys):
    assert main(["eval", str(checkpoint / "ckpt"), "--text", str(checkpoint / "text.txt"),
                 "--window", "32", "--bos", "no"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "bos no" in out and "of 32" in out


def test_failures_exit_1_usage_errors_2(checkpoint, capsys):
    assert main(["eval", str(checkpoint / "nothing-here")]) == 1
    assert "no model at" in capsys.readouterr().err
    (checkpoint / "short.txt").write_text("a")
    assert main(["eval", str(checkpoint / "ckpt"), "--text", str(checkpoint / "short.txt"),
                 "--bos", "no"]) == 1
    assert "too short" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", str(checkpoint / "ckpt"), "--window", "1"])
    assert e.value.code == 2


def test_json_still_shows_progress_on_stderr(checkpoint, capsys):
    argv = ["eval", str(checkpoint / "ckpt"), "--text", str(checkpoint / "text.txt"),
            "--window", "16", "--max-windows", "2", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout: one JSON document, nothing else
    assert "perplexity" in captured.err and "batch" in captured.err
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
