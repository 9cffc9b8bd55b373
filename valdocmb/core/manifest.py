"""weights/MANIFEST.json, its one owner: reading, atomic updates, the stale-entry policy and command recording.

The manifest records, for each weight file, its sha256, architecture, training data and command, and beside the
files the figures measured on those weights (`validation`, `comparison`) and the three-stage lesion rule
(`lesion_rule`). Every writer goes through `update`, which holds a lock while it reads, changes and atomically
replaces the file, so two research processes recording at once cannot lose each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
from pathlib import Path
from typing import Callable

from .errors import CaseError
from .imageio import write_text_atomic

MANIFEST = "MANIFEST.json"
# Entries measured on (or chosen for) one set of three-stage weights: new three-stage weights make them stale.
THREE_STAGE_DEPENDENT = ("lesion_rule", "validation", "comparison")


def manifest_path(weights_dir: Path) -> Path:
    return Path(weights_dir) / MANIFEST


def read(weights_dir: Path) -> dict:
    """The manifest as a dict ({"files": {}} when the folder has none); a damaged one is a CaseError."""
    path = manifest_path(weights_dir)
    if not path.is_file():
        return {"files": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaseError(f"{path}: not a readable JSON manifest: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.setdefault("files", {}), dict):
        raise CaseError(f"{path}: not a valdocmb manifest (expected an object with a 'files' object)")
    return manifest


def entry(weights_dir: Path, relative: str) -> dict | None:
    """The manifest's record of one weight file (path relative to the weights folder), or None."""
    return read(weights_dir)["files"].get(relative)


def update(weights_dir: Path, change: Callable[[dict], None]) -> dict:
    """Read the manifest, let `change` edit it in place, write it back atomically; returns the new manifest."""
    path = manifest_path(weights_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        manifest = read(weights_dir)
        change(manifest)
        text = json.dumps(_nan_to_null(manifest), indent=2, default=float) + "\n"
        write_text_atomic(text, path)
    return manifest


def drop_stale(manifest: dict, previous_files: dict, three_stage_files) -> list[str]:
    """The stale-entry policy: when any three-stage weight file changed against `previous_files` (the manifest's
    files before the change), drop the entries measured on the old weights; returns the keys dropped."""
    changed = any(previous_files.get(relative, {}).get("sha256") != manifest["files"].get(relative, {}).get("sha256")
                  for relative in three_stage_files)
    stale = [key for key in THREE_STAGE_DEPENDENT if key in manifest] if changed else []
    for key in stale:
        del manifest[key]
    return stale


def command_line(prog: str, argv: list[str] | None) -> str:
    """The command that made an entry: the arguments a `main(argv)` call received, else the process's own."""
    return " ".join([prog, *(argv if argv is not None else sys.argv[1:])])


def _nan_to_null(value):
    """JSON has no NaN: undefined figures (F1 of a case without CMBs) are stored as null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(v) for v in value]
    return value


@contextlib.contextmanager
def _locked(path: Path):
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
