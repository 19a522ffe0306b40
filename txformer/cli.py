"""Command-line plumbing shared by the scripts: their argument parser, logging, one-line errors for expected
failures, and `--config_overrides`."""

import argparse
import dataclasses
import difflib
import importlib
import logging
import math
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data.reader import TransactionDataError


DEBUG_FLAG = "--debug"
DEBUG_ENVIRONMENT_VARIABLE = "TXFORMER_DEBUG"
PACKAGE_DIR = Path(__file__).resolve().parent
# Code whose explicit `raise ValueError(...)` reports bad input: the package, and in a source tree the benchmarks
# next to it.
OWN_CODE_DIRS = (PACKAGE_DIR, PACKAGE_DIR.parent / "benchmarks")
# Packages whose explicit `raise OSError(...)` reports a folder or file they cannot load (transformers' documented
# error for a model folder without weights or config), not a bug.
OS_ERROR_SOURCES = ("txformer", "transformers", "huggingface_hub")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ScriptHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with the script's docstring as written (its examples) and the default of every flag."""


def script_parser(dataclass_types: Any, description: str | None = None) -> Any:
    """The `HfArgumentParser` of a script: one flag per field of `dataclass_types`, `description` (the script's
    docstring) on top of `--help`."""
    from transformers import HfArgumentParser  # here, not on top: the console commands start faster without it

    return HfArgumentParser(dataclass_types, description=description, formatter_class=ScriptHelpFormatter)


def configure_logging(training_args: Any = None) -> None:
    """The package's log lines to stdout: INFO on the main process; on the other processes of a launch, the level
    `TrainingArguments.get_process_log_level()` gives them (`--log_level_replica`, warning by default). Libraries
    keep warnings only."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.WARNING, stream=sys.stdout)
    level = logging.INFO
    if training_args is not None and not training_args.should_log:
        level = training_args.get_process_log_level()
    logging.getLogger(PACKAGE_DIR.name).setLevel(level)
    import transformers  # here, not on top: the console commands start faster without it

    transformers.utils.logging.set_verbosity_warning()


class ConfigOverrideError(ValueError):
    """A `--config_overrides` entry that is not `key=value`, names no config field, or has a value of the wrong type."""


def run_cli(main: Callable[[], Any]) -> None:
    """Runs a script's `main()`. An expected failure (`is_expected_failure`: bad data, flags or folder) ends with one
    line `error: <message>` on stderr and exit status 1; with `--debug` or `TXFORMER_DEBUG=1` its traceback is shown
    instead. Any other exception is a bug and keeps its traceback."""
    debug = _take_debug_flag(sys.argv) or os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "") not in ("", "0")
    flush_subnormals()
    try:
        main()
    except Exception as error:
        if debug or not is_expected_failure(error):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(1) from None


def flush_subnormals() -> None:
    """Has the CPU flush subnormal numbers (below about 1e-38 in float32) to zero, before torch starts its threads,
    which inherit the setting. Products that underflow into them run about 30 times slower, and the ∞-former's
    memory read makes many (docs/infinity_former.md#speed); their values are far below float32's resolution."""
    import torch  # here, not on top: the console commands start faster without it

    torch.set_flush_denormal(True)


def _take_debug_flag(argv: list[str]) -> bool:
    """Removes every bare `--debug` from `argv` and says whether there was one. `--debug <option>` (the Trainer's own
    flag, e.g. `--debug underflow_overflow`) is left to the script's parser."""
    bare = [
        index
        for index, token in enumerate(argv)
        if index > 0 and token == DEBUG_FLAG and (index + 1 == len(argv) or argv[index + 1].startswith("-"))
    ]
    for index in reversed(bare):
        del argv[index]
    return bool(bare)


def is_expected_failure(error: BaseException) -> bool:
    """Whether `error` reports bad input rather than a bug:
    - a `TransactionDataError` (a data file that cannot be read without guessing);
    - a `ValueError` raised by an explicit `raise` in txformer (its own checks of flags, configs, folders and data),
      or raised while the command line is parsed (`TrainingArguments` refusing a combination of flags);
    - an `OSError` about a named path (no such file, permission denied, a folder where a file is expected), or raised
      explicitly by txformer or transformers (a folder they cannot load).
    A `ValueError` raised inside torch, numpy or another library while running is a bug: its traceback stays."""
    if isinstance(error, TransactionDataError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    if isinstance(error, OSError):
        return error.filename is not None or _explicitly_raised_in(frames[-1], OS_ERROR_SOURCES)
    if isinstance(error, ValueError):
        parsing = any(frame.name == "parse_args_into_dataclasses" for frame in frames)
        return parsing or _explicitly_raised_in(frames[-1], ("txformer",))
    return False


def _explicitly_raised_in(frame: traceback.FrameSummary, packages: tuple[str, ...]) -> bool:
    """Whether `frame` is a `raise` statement in txformer (`OWN_CODE_DIRS`) or in an installed package among
    `packages`."""
    if not (frame.line or "").lstrip().startswith("raise"):
        return False
    path = Path(frame.filename).resolve()
    if "txformer" in packages and any(path.is_relative_to(folder) for folder in OWN_CODE_DIRS):
        return True
    installed = [index for index, part in enumerate(path.parts) if part in ("site-packages", "dist-packages")]
    return bool(installed) and installed[-1] + 1 < len(path.parts) and path.parts[installed[-1] + 1] in packages


def _one_line(error: BaseException) -> str:
    """The error's message on one line (its type when it has none)."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return message or type(error).__name__


def parse_config_overrides(text: str, config: Any) -> dict[str, Any]:
    """`key=value,key=value` (the `--config_overrides` flag) as typed values, by the declared types of `config`'s
    fields: integers, finite numbers, `true`/`false`, strings, `none` for optional fields, and lists in brackets
    (`time_periods_days=[1,7]`). A malformed entry, an unknown or repeated key, or a value of the wrong type raises
    `ConfigOverrideError` naming the key and the expected type. `config` is not changed."""
    field_types = _field_types(config)
    overrides: dict[str, Any] = {}
    for entry in _split_outside_brackets(text):
        key, equals, value = (part.strip() for part in entry.partition("="))
        if not equals or not key:
            raise ConfigOverrideError(f"--config_overrides: {entry.strip()!r} is not key=value.")
        if key not in field_types:
            close = difflib.get_close_matches(key, field_types, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise ConfigOverrideError(f"--config_overrides: {key!r} is not a field of {type(config).__name__}{hint}")
        if key in overrides:
            raise ConfigOverrideError(f"--config_overrides: {key!r} is given twice.")
        overrides[key] = _parse_value(value, field_types[key], f"{key}={value!r}")
    return overrides


def merge_config_overrides(*texts: str) -> str:
    """Several `--config_overrides` strings as one, a later string winning on a key that an earlier one sets."""
    entries: dict[str, str] = {}
    for text in texts:
        for entry in _split_outside_brackets(text):
            entries[entry.partition("=")[0].strip()] = entry.strip()
    return ",".join(entries.values())


def _field_types(config: Any) -> dict[str, Any]:
    """Declared type of each field (dataclass configs), else the type of each current value."""
    if not dataclasses.is_dataclass(config):
        return {key: type(value) for key, value in vars(config).items() if not key.startswith("_")}
    declaring_module = {}
    for owner in reversed(type(config).__mro__):
        declaring_module.update(dict.fromkeys(owner.__dict__.get("__annotations__", {}), owner.__module__))
    return {
        field.name: _resolve_annotation(field.type, declaring_module.get(field.name))
        for field in dataclasses.fields(config)
    }


def _resolve_annotation(annotation: Any, module: str | None) -> Any:
    """A string annotation (`from __future__ import annotations`) evaluated in its module, as `typing.get_type_hints`
    does field by field; one that names what the module imports only for type checking stays a string."""
    if not isinstance(annotation, str) or module not in sys.modules:
        return annotation
    try:
        return eval(annotation, vars(sys.modules[module]))
    except Exception:
        return annotation


def _split_outside_brackets(text: str) -> list[str]:
    """`text` split at the commas that are not inside `[...]`; empty entries (a trailing comma) are dropped."""
    entries, depth, start = [], 0, 0
    for index, character in enumerate(text):
        depth += {"[": 1, "]": -1}.get(character, 0)
        if character == "," and depth == 0:
            entries.append(text[start:index])
            start = index + 1
    entries.append(text[start:])
    return [entry for entry in entries if entry.strip()]


def _parse_value(text: str, annotation: Any, what: str) -> Any:
    """`text` as a value of type `annotation`; an error quotes `what` and says what was expected."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in arguments and text.lower() in ("none", "null"):
            return None
        for candidate in (argument for argument in arguments if argument is not type(None)):
            try:
                return _parse_value(text, candidate, what)
            except ConfigOverrideError:
                continue
        raise ConfigOverrideError(f"--config_overrides {what}: expected {_describe(annotation)}.")
    if origin is list or annotation is list:
        if not (text.startswith("[") and text.endswith("]")):
            raise ConfigOverrideError(f"--config_overrides {what}: expected {_describe(annotation)}.")
        item_type = arguments[0] if arguments else str
        return [_parse_value(item.strip(), item_type, what) for item in _split_outside_brackets(text[1:-1])]
    try:
        if annotation is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        if annotation is int:
            return int(text)
        if annotation is float and math.isfinite(value := float(text)):
            return value
        if annotation is float:
            raise ValueError(f"{text} is not finite")
    except (KeyError, ValueError):
        raise ConfigOverrideError(f"--config_overrides {what}: expected {_describe(annotation)}.") from None
    if annotation is str:
        return text
    raise ConfigOverrideError(f"--config_overrides {what}: a field of type {annotation} cannot be set here.")


def _describe(annotation: Any) -> str:
    """How an error names the expected type."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        described = " or ".join(_describe(argument) for argument in arguments if argument is not type(None))
        return f"none or {described}" if type(None) in arguments else described
    if origin is list or annotation is list:
        item = _describe(arguments[0]) if arguments else "a string"
        return f"a list in brackets, e.g. [1,2], each {item}"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(annotation, str(annotation))


def console_command(module: str) -> Callable[[], None]:
    """A console command (setup.py entry point) running `txformer.<module>.main` under `run_cli`; the module is
    imported when the command runs, as the package's modules import this one."""

    def command() -> None:
        run_cli(importlib.import_module(f"txformer.{module}").main)

    command.__doc__ = f"`run_cli(txformer.{module}.main)`."
    return command


train_command = console_command("training")
predict_command = console_command("prediction")
pretrain_command = console_command("pretraining")
embed_command = console_command("embedding")
baseline_command = console_command("baseline")
prepare_command = console_command("data.prepare")


__all__ = [
    "ConfigOverrideError",
    "is_expected_failure",
    "parse_config_overrides",
    "predict_command",
    "run_cli",
    "train_command",
]
