"""Small helpers shared by every stage: hashing, atomic writes, state folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def state_dir() -> Path:
    """The one project-local folder that holds MLflow, Prefect, caches and run outputs.

    `FTFLOW_HOME` moves it (tests give each run its own).
    """
    home = os.environ.get("FTFLOW_HOME")
    path = Path(home) if home else PROJECT_ROOT / ".ftflow"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def sha256_sources(*modules: str) -> str:
    """Code identity of an artifact: the hash of the source files of `modules` (dotted names).

    Used in the content keys instead of hand-bumped version numbers: any edit to a module that
    determines an artifact gives the artifact a new key. Modules are found without being imported
    (`importlib.util.find_spec`), so the key costs a few file reads.
    """
    import importlib.util

    digests = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            raise ModuleNotFoundError(f"no source file for module {name!r} (needed for a content key)")
        digests[name.rsplit(".", 1)[-1]] = sha256_file(spec.origin)
    return sha256_json(digests)


def sha256_tree(path: str | Path) -> str:
    """Hash every file under `path` (names and bytes), in a stable order."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only if the block succeeds.

    An interrupted writer leaves a `.tmp-*` folder behind, never a folder at `final`, so a
    partial output is never mistaken for a complete one. The folders written this way are keyed
    by their content, so when two writers race, the first complete one wins and the other's copy
    is dropped: a folder someone may be reading is never deleted or replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another writer finished the same content first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
