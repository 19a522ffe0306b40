"""Atomic file writes: a crash never leaves a half-written file that looks complete."""

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO], Any], encoding: str = "utf-8", binary: bool = False
) -> Path:
    """Writes through `write(file)` to a temporary file next to `path`, then renames it over `path`. The file is
    text (`encoding`), or bytes when `binary`, and gets the permissions a plain `open(path, "w")` gives: those of
    the file it replaces, or 0o666 less the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_temporary(path)
    options = {"mode": "wb"} if binary else {"mode": "w", "encoding": encoding, "newline": ""}
    try:
        with os.fdopen(descriptor, **options) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new hidden file `.<name>.<random>.tmp` next to `path`, open for writing. Created with mode 0o666 so that the
    kernel applies the umask (`tempfile.mkstemp` would give 0o600), or given the mode of the file it will replace."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        break
    try:
        os.fchmod(descriptor, path.stat().st_mode & 0o7777)
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(descriptor)
        temporary.unlink(missing_ok=True)
        raise
    return descriptor, temporary


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Writes `payload` as indented JSON, atomically."""
    return atomic_write(path, lambda file: json.dump(payload, file, indent=2, sort_keys=True, default=str))
