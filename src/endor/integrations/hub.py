"""Hub ids (`ORG/NAME`) as model sources: downloaded, or found in the local cache, through
huggingface_hub, which honours HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE (cache only, never the
network), HF_TOKEN and revisions (branch, tag or commit). Only safetensors weights and the JSON,
tokenizer and template files are fetched: pickled weights (.bin, .pt) never are."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def is_hub_id(spec) -> bool:
    """`ORG/NAME` that is not a path on this machine."""
    return (isinstance(spec, str) and bool(REPO_ID.match(spec)) and not Path(spec).exists()
            and not spec.endswith(".gguf"))


def snapshot(repo_id: str, *, revision: str | None = None) -> Path:
    """The local directory of `repo_id` at `revision` (default: main), downloaded if needed and
    allowed. Errors are FileNotFoundError / ValueError naming the id and what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if not REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub id (ORG/NAME)")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id}{'@' + revision if revision else ''} is not in the local Hub cache "
            "and downloading is off (HF_HUB_OFFLINE=1) or the Hub is unreachable; download it "
            "once with network access (and no local directory has that name)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no local directory and no Hub repository {repo_id!r} (if "
                                "it is private, set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"cannot fetch {repo_id} from the Hub: {e}") from None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{repo_id}{'@' + revision if revision else ''} has no "
                                "config.json: not a transformers model repository")
    return path


def resolve(spec, *, revision: str | None = None):
    """`spec` unchanged unless it is a Hub id, else its local snapshot directory."""
    if is_hub_id(spec):
        return snapshot(spec, revision=revision)
    if revision is not None:
        raise ValueError(f"--revision applies to Hub ids (ORG/NAME); {spec!r} is local")
    return spec
