"""Helpers of `scripts/gpu_check.sh`: the machine description, the attention kinds, the dry-run check of its command
lines (without running them) and the table of the training runs it profiled.

    python -m txformer.gpu_check machine               # versions and the GPU; fails without CUDA
    python -m txformer.gpu_check kinds                 # the attention kinds, one line, space-separated
    python -m txformer.gpu_check check PLAN            # PLAN: one shell-quoted command per line
    python -m txformer.gpu_check table OUTPUT_DIR      # Markdown table of OUTPUT_DIR/train_*/ and fsdp2/
"""

import argparse
import importlib.metadata
import importlib.util
import json
import runpy
import shlex
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from .configuration_txformer import ATTENTION_KINDS
from .file_names import PROFILE_SUMMARY_FILE, RESULTS_FILE
from .machine import describe_machine, installed_version


REQUIRED_PACKAGES = ("transformers", "accelerate", "datasets", "safetensors", "scikit-learn", "pytest")
# Used when present: parallel tests, the benchmark's peer and plots, flash attention 2.
OPTIONAL_PACKAGES = ("pytest-xdist", "performer-pytorch", "matplotlib", "flash-attn")


@contextmanager
def _argv(argv: list[str]):
    """`sys.argv` set to `argv` for the duration (argparse-based scripts read it)."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _parse_training_flags(arguments: list[str]) -> None:
    """Parses `scripts/train.py` flags as `txformer.training.main` does, and builds the config they ask for."""
    from transformers import HfArgumentParser

    from .training import DataArguments, ModelArguments, TxFormerTrainingArguments, new_config

    if not torch.cuda.is_available():
        # TrainingArguments refuses --bf16 without a GPU unless the run is on the CPU.
        arguments = [*arguments, "--use_cpu", "true"]
    parser = HfArgumentParser((ModelArguments, DataArguments, TxFormerTrainingArguments))
    model_args, _, _ = parser.parse_args_into_dataclasses(args=arguments)
    new_config(model_args)


def check_script(script: str, arguments: list[str]) -> None:
    """Checks that `script` exists and that `arguments` parse: with `txformer.training`'s parser for the training
    script, else with the script's own `parse_args()` (the benchmark scripts)."""
    from . import training

    if not Path(script).is_file():
        raise FileNotFoundError(f"{script}: no such script.")
    namespace = runpy.run_path(script, run_name="__gpu_check__")
    if namespace.get("main") is training.main:
        _parse_training_flags(arguments)
        return
    parse_args: Callable | None = namespace.get("parse_args")
    if parse_args is None:
        raise ValueError(f"{script}: no parse_args() and not the training entry point: its flags cannot be checked.")
    with _argv([script, *arguments]):
        parse_args()


def check_command(command: list[str]) -> None:
    """Checks one command of the plan: `[env K=V ...] PYTHON (-m MODULE | -c CODE | SCRIPT) ARGS...`."""
    while command and (command[0] == "env" or "=" in command[0]):
        command = command[1:]
    if len(command) < 2:
        raise ValueError("not a Python command.")
    option, *rest = command[1:]
    if option == "-c":
        compile(rest[0], "<string>", "exec")
    elif option == "-m" and rest[0] == "pytest":
        missing = [arg for arg in rest[1:] if not arg.startswith("-") and not Path(arg.split("::")[0]).exists()]
        if missing:
            raise FileNotFoundError(f"pytest paths not found: {missing}.")
    elif option == "-m" and rest[0] == "accelerate.commands.launch":
        from accelerate.commands.launch import launch_command_parser

        launch_args = launch_command_parser().parse_args(rest[1:])
        if launch_args.config_file is not None and not Path(launch_args.config_file).is_file():
            raise FileNotFoundError(f"{launch_args.config_file}: no such accelerate config.")
        check_script(launch_args.training_script, launch_args.training_script_args)
    elif option == "-m":
        if importlib.util.find_spec(rest[0]) is None:
            raise ModuleNotFoundError(f"python -m {rest[0]}: no such module.")
    else:
        check_script(option, rest)


def check_plan(plan: str | Path) -> int:
    """Checks every command of `plan` (one shell-quoted command per line) and prints one line per command; returns
    the number of commands that failed."""
    failures = 0
    for line in Path(plan).read_text().splitlines():
        if not line.strip():
            continue
        command = shlex.split(line)
        try:
            check_command(command)
        except (Exception, SystemExit) as error:  # argparse exits on a bad flag
            failures += 1
            print(f"FAIL {shlex.join(command)}\n     {type(error).__name__}: {error}")
        else:
            print(f"ok   {shlex.join(command)}")
    return failures


def check_machine() -> bool:
    """Prints the machine, the versions of the packages that the check runs with, and the GPUs; whether CUDA and the
    required packages are there."""
    print(f"{describe_machine()} ({sys.executable})")
    print(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    missing = []
    for package in [*REQUIRED_PACKAGES, *OPTIONAL_PACKAGES]:
        version = installed_version(package)
        print(f"{package} {version or 'not installed'}")
        if version is None and package in REQUIRED_PACKAGES:
            missing.append(package)
    if missing:
        print(f"Missing required packages: {missing} (pip install -e '.[dev]').")
    if not torch.cuda.is_available():
        print("CUDA is not available: on a machine without GPU run scripts/gpu_check.sh --dry-run.")
        return False
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        print(
            f"cuda:{index} {properties.name}, {properties.total_memory / 2**30:.1f} GiB, compute capability "
            f"{properties.major}.{properties.minor}, {properties.multi_processor_count} multiprocessors, bf16 "
            f"{torch.cuda.is_bf16_supported()}"
        )
    return not missing


def training_table(output_dir: str | Path) -> str:
    """Markdown table of the profiled training runs under `output_dir` (`train_<kind>/`, `fsdp2/`)."""
    rows = [
        "| run | steps | step time, median (s) | events/s, median | peak memory (MiB) | train runtime (s) | eval AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    output_dir = Path(output_dir)
    for folder in sorted([*output_dir.glob("train_*"), output_dir / "fsdp2"]):
        if not (folder / PROFILE_SUMMARY_FILE).is_file():
            continue
        profile = json.loads((folder / PROFILE_SUMMARY_FILE).read_text())
        results_path = folder / RESULTS_FILE
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        cells = [
            folder.name,
            profile.get("num_steps"),
            _format(profile.get("step_time_s", {}).get("median"), ".4f"),
            _format(profile.get("tokens_per_s_median"), ",.0f"),
            _format(profile.get("peak_memory_mib"), ",.0f"),
            _format(results.get("train_runtime"), ".1f"),
            _format(results.get("eval_auroc"), ".4f"),
        ]
        rows.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    if len(rows) == 2:
        return "No profiled training run."
    return "\n".join(rows)


def _format(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("machine", help="Print versions and the GPU; exit status 1 without CUDA.")
    commands.add_parser("kinds", help="Print the attention kinds.")
    commands.add_parser("check", help="Check the commands of a plan file.").add_argument("plan")
    commands.add_parser("table", help="Print the table of the training runs.").add_argument("output_dir")
    args = parser.parse_args(argv)
    if args.command == "machine":
        return 0 if check_machine() else 1
    if args.command == "kinds":
        print(" ".join(ATTENTION_KINDS))
    elif args.command == "check":
        return 1 if check_plan(args.plan) else 0
    else:
        print(training_table(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
