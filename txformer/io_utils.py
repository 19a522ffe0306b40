"""Atomic file writes: a crash never leaves a half-written file that looks complete."""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO], Any], encoding: str = "utf-8", binary: bool = False
) -> Path:
    """Writes through `write(file)` to a temporary file next to `path`, then renames it over `path`. The file is
    text (`encoding`), or bytes when `binary`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    options = {"mode": "wb"} if binary else {"mode": "w", "encoding": encoding, "newline": ""}
    try:
        with os.fdopen(descriptor, **options) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Writes `payload` as indented JSON, atomically."""
    return atomic_write(path, lambda file: json.dump(payload, file, indent=2, sort_keys=True, default=str))
