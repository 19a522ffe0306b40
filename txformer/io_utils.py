"""Atomic file writes, so that a crash never leaves a half-written file that looks complete, and the checks that
tell a file cut short (by a kill, a full disk or an interrupted copy) before it is loaded."""

import json
import os
import secrets
import tempfile
import zipfile
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


# Files that record their own length: safetensors weights (a header of tensor offsets) and what `torch.save` writes
# (a zip archive, which ends with its central directory).
SAFETENSORS_PATTERN = "*.safetensors"
TORCH_ARCHIVE_PATTERNS = ("*.pt", "*.pth")
SAFETENSORS_LENGTH_BYTES = 8


def safetensors_defect(path: str | os.PathLike) -> str | None:
    """What is wrong with a safetensors file whose length disagrees with its header (None when it agrees): the
    header cannot be read, or the tensors it describes end after or before the end of the file."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            header_length = int.from_bytes(file.read(SAFETENSORS_LENGTH_BYTES), "little")
            data_start = SAFETENSORS_LENGTH_BYTES + header_length
            if size < data_start:
                return f"{size:,} bytes, shorter than its header"
            header = json.loads(file.read(header_length))
        data_end = max(
            (int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"), default=0
        )
    except OSError as error:
        return error.strerror or str(error)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its header is not a safetensors header"
    if size != data_start + data_end:
        return f"{size:,} bytes where its header describes {data_start + data_end:,}"
    return None


def torch_archive_defect(path: str | os.PathLike) -> str | None:
    """What is wrong with a file of `torch.save` (a zip archive) that lacks the end of the archive (None when it has
    it)."""
    try:
        return None if zipfile.is_zipfile(path) else "no end of archive (a torch.save file cut short)"
    except OSError as error:
        return error.strerror or str(error)


def incomplete_files(folder: str | os.PathLike, torch_archives: bool = True) -> dict[Path, str]:
    """The safetensors files (and, with `torch_archives`, the `torch.save` files) directly in `folder` that are cut
    short, each with what is wrong."""
    folder = Path(folder)
    defects = {path: safetensors_defect(path) for path in sorted(folder.glob(SAFETENSORS_PATTERN))}
    for pattern in TORCH_ARCHIVE_PATTERNS if torch_archives else ():
        defects.update({path: torch_archive_defect(path) for path in sorted(folder.glob(pattern))})
    return {path: defect for path, defect in defects.items() if defect is not None}


def check_weights_are_whole(folder: str | os.PathLike) -> None:
    """Raises `ValueError` naming the first safetensors file of a model folder that is cut short, so that it is
    reported by name rather than by the loader's own message (the other files of a checkpoint are not loaded)."""
    for path, defect in incomplete_files(folder, torch_archives=False).items():
        raise ValueError(f"{path}: the file is incomplete ({defect}); it was cut short while written or copied.")


def check_writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """Creates `folder` if needed and makes sure a file can be written into it, so that a run fails before its work
    rather than when it writes its results; `what` names the flag in the error."""
    folder = Path(folder)
    blocking = next((parent for parent in (folder, *folder.parents) if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise NotADirectoryError(f"{what} {folder}: {blocking} is a file, not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(f"{what} {folder}: cannot write there ({error.strerror or error}).") from error
    return folder


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Makes sure `path` can be written as a file (its folder is created if needed): not a folder, and in a folder
    that can be written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give the path of a file.")
    check_writable_folder(path.parent, what)
    return path
