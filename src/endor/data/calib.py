"""Calibration text from what a user names with `--calib`: a UTF-8 text file, a local data file
(.json, .jsonl, .csv, .parquet), a dataset saved with `datasets`' save_to_disk, or a Hugging Face
Hub dataset id ("allenai/c4", "wikitext:wikitext-2-raw-v1" for a config), read through the
`datasets` library when it is installed. The SparseGPT and Wanda papers calibrate on C4; a text
close to the one a model will serve calibrates SparseGPT better (see bench quality).

Records are joined with blank lines until about `max_chars` characters (enough for the
calibration segments: Hub datasets are streamed, never downloaded whole)."""

from __future__ import annotations

from pathlib import Path

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_COLUMN = "text"
DEFAULT_SPLIT = "train"
_SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("--calib names a dataset, which needs the `datasets` library: "
                         "pip install datasets (or give a UTF-8 text file)") from None
    return datasets


def _join(records, column: str, max_chars: int, what: str) -> str:
    parts, size = [], 0
    for record in records:
        if column not in record:
            raise ValueError(f"{what} has no column {column!r} (columns: "
                             f"{', '.join(sorted(record))}); choose one with --calib-column")
        value = record[column]
        if not isinstance(value, str):
            raise ValueError(f"column {column!r} of {what} holds {type(value).__name__}, not "
                             "text; choose a text column with --calib-column")
        if value.strip():
            parts.append(value.strip())
            size += len(parts[-1]) + 2
        if size >= max_chars:
            break
    if not parts:
        raise ValueError(f"{what} holds no text in column {column!r}")
    return "\n\n".join(parts)


def load_calibration_text(spec: str, *, split: str = DEFAULT_SPLIT, column: str = DEFAULT_COLUMN,
                          max_chars: int = 4_000_000) -> str:
    """The calibration text `spec` names (see the module docstring)."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() not in DATA_FILE_BUILDERS:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--calib {spec}: not UTF-8 text ({e})") from None
    if path.is_file():
        datasets = _datasets()
        data = datasets.load_dataset(DATA_FILE_BUILDERS[path.suffix.lower()],
                                     data_files=str(path), split="train")
        return _join(data, column, max_chars, str(path))
    if path.is_dir():
        if not any((path / f).is_file() for f in _SAVED_DATASET_FILES):
            raise ValueError(f"--calib {spec}: is a directory, not a dataset saved with "
                             "save_to_disk; give a UTF-8 text file or a dataset")
        datasets = _datasets()
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"--calib {spec}: is a directory, but not a dataset saved with "
                             f"save_to_disk ({e})") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"--calib {spec}: no split {split!r} (splits: "
                                 f"{', '.join(data)}); choose one with --calib-split")
            data = data[split]
        return _join(data, column, max_chars, str(path))
    if spec.startswith((".", "/", "~")) or path.suffix:
        raise ValueError(f"--calib {spec}: no such file or directory")
    datasets = _datasets()
    name, _, config = spec.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # datasets raises many kinds (offline, missing, gated)
        raise ValueError(f"--calib {spec}: cannot load the Hub dataset ({type(e).__name__}: "
                         f"{e})") from None
    return _join(data, column, max_chars, spec)
