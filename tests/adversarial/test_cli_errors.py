"""The CLI error contract, case by case: every expected failure is exactly one line
`endor <cmd>: error: ...` naming the path or option, exit 1; usage errors exit 2; tracebacks only
with --debug or ENDOR_DEBUG=1; Ctrl-C exits 130 whenever it comes."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import endor
from endor.cli import main
from tests.adversarial.conftest import REPO, assert_one_line_error


def _hf_dir(tmp_path, ckpt_dir):
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(ckpt_dir / "config.json", hf)
    return hf


def _no_tokenizer(tmp_path, ckpt_dir):
    return shutil.copytree(ckpt_dir, tmp_path / "bare",
                           ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))


def _garbage_manifest(tmp_path, ckpt_dir):
    (ckpt_dir / "endor.json").write_text("{ not json")
    return ckpt_dir


def _file(tmp_path, _):
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file"


def _empty_gguf(tmp_path, _):
    (tmp_path / "empty.gguf").write_bytes(b"")
    return tmp_path / "empty.gguf"


def _corrupt_file(tmp_path, _):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    return tmp_path / "bad.safetensors"


def _plain_dir(tmp_path, _):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("x")
    return tmp_path / "notes"


# (id, command, argv with {ck} the checkpoint and {x} what `make` returns, make, words the one
# line must hold)
FAILURES = [
    ("missing-checkpoint", "generate", ["{tmp}/nowhere", "--prompt", "x"], None,
     ["no such checkpoint directory", "nowhere"]),
    ("hf-dir", "generate", ["{x}", "--prompt", "x"], _hf_dir,
     ["HuggingFace model directory", "endor convert", "--method none"]),
    ("no-tokenizer", "generate", ["{x}", "--prompt", "x"], _no_tokenizer,
     ["holds no tokenizer", "bare"]),
    ("bad-manifest", "generate", ["{x}", "--prompt", "x"], _garbage_manifest,
     ["endor.json", "not valid JSON"]),
    ("backend-unavailable", "generate", ["{ck}", "--prompt", "x", "--backend", "nosuch"], None,
     ["unknown backend 'nosuch'"]),
    ("triton-on-cpu", "generate", ["{ck}", "--prompt", "x", "--backend", "triton"], None,
     ["backend 'triton' is not available here"]),
    ("budget-too-small", "generate", ["{ck}", "--prompt", "x", "--max-memory", "100B"], None,
     ["smaller than the weights outside the decoder layers"]),
    ("out-is-a-file", "convert", ["{ck}", "{x}", "--quiet"], _file, ["a-file", "is a file"]),
    ("calib-is-a-directory", "convert",
     ["{ck}", "{tmp}/o", "--method", "wanda", "--calib", "{tmp}", "--quiet"], None,
     ["--calib", "is a directory"]),
    ("calib-missing", "convert",
     ["{ck}", "{tmp}/o", "--method", "wanda", "--calib", "{tmp}/none.txt", "--quiet"], None,
     ["--calib", "none.txt", "no such file"]),
    ("overwrite-a-plain-directory", "convert", ["{ck}", "{x}", "--overwrite", "--quiet"],
     _plain_dir, ["holds no Endor checkpoint", "notes"]),
    ("src-missing", "convert", ["{tmp}/nowhere", "{tmp}/o", "--quiet"], None, ["nowhere"]),
    ("empty-gguf", "eval", ["{x}"], _empty_gguf, ["empty.gguf", "not a GGUF file", "empty"]),
    ("eval-missing", "eval", ["{tmp}/nowhere"], None, ["no model at", "nowhere"]),
    ("corrupt-file", "inspect", ["{x}"], _corrupt_file, ["bad.safetensors"]),
    ("inspect-missing", "inspect", ["{tmp}/nowhere.safetensors"], None, ["nowhere"]),
    ("inspect-hf-dir", "inspect", ["{x}"], _hf_dir, ["endor convert"]),
]


@pytest.mark.parametrize("case", FAILURES, ids=[c[0] for c in FAILURES])
def test_expected_failure_is_one_line_exit_1(case, ckpt, tmp_path, capsys, monkeypatch):
    _, command, argv, make, words = case
    monkeypatch.delenv("ENDOR_DEBUG", raising=False)
    if case[0] == "triton-on-cpu":  # as on a machine with no GPU, outside the test suite
        if torch.cuda.is_available():
            pytest.skip("a GPU is present: triton is available")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ckpt_dir = ckpt[0]
    made = make(tmp_path, ckpt_dir) if make else None
    argv = [a.format(ck=ckpt_dir, tmp=tmp_path, x=made) for a in argv]
    code = main([command, *argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert_one_line_error(err, command, *words)


def test_resume_with_other_settings_reads_as_options(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(ckpt[0]), str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", str(ckpt[0]), str(out), "--method", "magnitude", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, "convert", "method \"none\" in OUT, \"magnitude\" now",
                          "--overwrite")
    assert "resume=False" not in err and "{" not in err


def test_overwrite_replaces_every_file_of_the_old_checkpoint(ckpt, tmp_path, capsys):
    """Issue 16 case 3: an older conversion of another model, its tokenizer, chat template,
    generation config and source record must all go."""
    out = tmp_path / "out"
    assert main(["convert", str(ckpt[0]), str(out), "--quiet"]) == 0
    for stale in ("chat_template.jinja", "generation_config.json", "special_tokens_map.json"):
        (out / stale).write_text("from the old model")
    manifest = json.loads((out / "endor.json").read_text())
    bare = _no_tokenizer(tmp_path, ckpt[0])  # a "new model" without tokenizer files
    assert main(["convert", str(bare), str(out), "--overwrite", "--weights", "dense",
                 "--quiet"]) == 0
    names = {p.name for p in out.iterdir()}
    assert not names & {"chat_template.jinja", "generation_config.json",
                        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"}
    new_manifest = json.loads((out / "endor.json").read_text())
    assert manifest["weights"] == "endor" and new_manifest["weights"] == "dense"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_files_are_written_with_the_umask(ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", str(ckpt[0]), str(out), "--quiet"]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    import os
    mask = os.umask(0o022)
    os.umask(mask)
    assert set(modes.values()) == {0o666 & ~mask}, modes


@pytest.mark.parametrize("argv", [["generate"], ["nosuch"], ["inspect", "x", "--bogus"],
                                  ["generate", "{ck}", "--prompt", ""],
                                  ["convert", "a", "b", "--sparsity", "2"]],
                         ids=["missing-args", "unknown-command", "unknown-option",
                              "empty-prompt", "sparsity-out-of-range"])
def test_usage_errors_exit_2(argv, ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main([a.format(ck=ckpt[0]) for a in argv])
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("size", ["12XB", "-3", "lots", "1.5.2GB", ""])
def test_malformed_max_memory_is_a_usage_error(command, size, ckpt, capsys):
    argv = [command, str(ckpt[0]), "--max-memory", size]
    if command == "generate":
        argv += ["--prompt", "x"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"endor {command}: error: argument --max-memory: cannot read size {size!r}; write e.g. "
        "500MB, 2GiB or 1000000"), err


def test_tracebacks_only_with_debug(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ENDOR_DEBUG", raising=False)
    missing = str(tmp_path / "nowhere")
    assert main(["generate", missing, "--prompt", "x"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert main(["generate", missing, "--prompt", "x", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["--debug", "inspect", missing]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("ENDOR_DEBUG", "1")
    assert main(["inspect", missing]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_is_one_line_too_and_says_so(ckpt, capsys, monkeypatch):
    from endor.cli import inspect as inspect_cli

    def broken(args):
        raise TypeError("a bug")
    monkeypatch.delenv("ENDOR_DEBUG", raising=False)
    monkeypatch.setattr(inspect_cli, "run", broken)
    assert main(["inspect", str(ckpt[0])]) == 1
    assert_one_line_error(capsys.readouterr().err, "inspect", "unexpected TypeError: a bug",
                          "--debug")


def _loaded(pid: int, library: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return library in maps.read()
    except OSError:
        return False


def _sigint_as_at_a_terminal():
    """The child starts with SIGINT's default action, as under a terminal. A job started in the
    background by a non-interactive shell (how CI may run us) inherits SIGINT ignored, and Python,
    as Unix convention asks, then leaves it ignored: Ctrl-C could not reach such a process."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("when", ["during-imports", "while-generating"])
def test_ctrl_c_exits_130_without_a_traceback(pristine, when):
    """SIGINT while torch is being imported (the CLI's first seconds: its shared library is
    mapped, its Python modules still loading), or once generation has printed the prompt."""
    ckpt_dir = pristine[0]
    child = subprocess.Popen(
        [sys.executable, "-m", "endor.cli", "generate", str(ckpt_dir), "--prompt", "Hi",
         "--max-new-tokens", "60", "--max-memory", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_as_at_a_terminal)
    if when == "during-imports":
        deadline = time.monotonic() + 60
        while not _loaded(child.pid, "libtorch") and time.monotonic() < deadline:
            time.sleep(0.005)
        assert child.poll() is None, "exited before torch was imported"
    else:
        assert child.stdout.read(2) == "Hi"  # the prompt: loading is done, generation starts
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, (child.returncode, err)
    assert err.strip().splitlines()[-1] == "endor generate: interrupted", err
    assert "Traceback" not in err, err


def _console_script() -> list[str]:
    """The `endor` command as installed (pyproject's console script), else its entry module run
    as a file: either way nothing of endor is imported before the Ctrl-C handler."""
    script = Path(sys.executable).with_name("endor")
    if script.is_file() and "_endor_entry" in script.read_text(errors="replace"):
        return [str(script)]
    return [sys.executable, str(REPO / "src" / "_endor_entry.py")]


def _outside_endor(traceback: str) -> bool:
    """A traceback all of whose frames are the interpreter's own startup (frozen modules, site,
    .pth hooks) or the console script's line importing the entry module: before any line of
    this project runs."""
    frames = [line.strip() for line in traceback.splitlines() if line.strip().startswith("File ")]
    package = str(Path(endor.__file__).parent)
    return bool(frames) and all("_endor_entry.py" not in f and package not in f for f in frames)


def test_the_entry_module_handles_ctrl_c_from_its_first_line():
    """Deterministic: SIGINT right after `import _endor_entry` (nothing of endor imported yet)."""
    code = ("import os, signal, sys, time; sys.path.insert(0, sys.argv[1]); import _endor_entry; "
            "assert 'endor' not in sys.modules; os.kill(os.getpid(), signal.SIGINT); "
            "time.sleep(30)")
    child = subprocess.run([sys.executable, "-c", code, str(REPO / "src")],
                           capture_output=True, text=True, timeout=60,
                           preexec_fn=_sigint_as_at_a_terminal)
    assert child.returncode == 130, (child.returncode, child.stderr)
    assert child.stderr == "endor: interrupted\n"


@pytest.mark.parametrize("delay_ms", [0, 20, 50, 200])
def test_ctrl_c_at_the_first_instants_exits_130(pristine, delay_ms):
    """SIGINT while Python starts and endor's modules import. Before the interpreter has
    installed any handler, SIGINT's default action ends the process (killed by SIGINT: what a
    shell reports as 130); from the entry module's first line on, exit 130 with one line. Between
    the two, the interpreter's own startup and its finding the entry module (~10 ms idle, far
    longer on a loaded machine) report KeyboardInterrupt themselves: allowed only with no frame
    of this project in it."""
    child = subprocess.Popen(
        [*_console_script(), "generate", str(pristine[0]), "--prompt", "Hi",
         "--max-new-tokens", "60", "--max-memory", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_as_at_a_terminal)
    time.sleep(delay_ms / 1000)
    assert child.poll() is None, "exited before the signal"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    if "Traceback" in err:
        assert _outside_endor(err), err
        return
    if child.returncode == -signal.SIGINT:
        assert err == "", err
        return
    assert child.returncode == 130, (child.returncode, err)
    assert err.strip().splitlines()[-1] in ("endor: interrupted", "endor generate: interrupted")
