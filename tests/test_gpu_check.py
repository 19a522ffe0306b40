"""`scripts/gpu_check.sh` without a GPU: its syntax, its dry run (every command printed and checked, one training run
per attention kind, nothing written), and the checks that catch a bad flag, script or config."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from txformer.configuration_txformer import ATTENTION_KINDS
from txformer.gpu_check import check_plan, training_table


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
TRAIN = ["python", "scripts/train.py", "--max_steps", "2"]


def run_script(*arguments: str, timeout: int = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *arguments], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout
    )


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dry_run_checks_every_step_trains_every_kind_and_writes_nothing(tmp_path):
    output_dir, work_dir = tmp_path / "gpu", tmp_path / "work"
    result = run_script("--dry-run", "--output-dir", str(output_dir), "--work-dir", str(work_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    checked = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
    planned = [line for line in result.stdout.split("Checking the commands")[0].splitlines()[1:] if line]
    assert len(checked) == len(planned) and all(line.startswith("ok ") for line in checked)
    steps = [line.split()[0] for line in planned]
    assert steps == [
        "machine", "tests", "cuda_attention", "data", *(f"train_{kind}" for kind in ATTENTION_KINDS), "fsdp2",
        "benchmark_attention", "benchmark",
    ]  # fmt: skip
    for kind in ATTENTION_KINDS:
        (command,) = [line for line in checked if f"--attention_type {kind} " in line and "--bf16 true" in line]
        assert "--max_length 16384" in command and "--max_steps 200" in command
    assert "--config_file configs/fsdp2.yaml --num_processes 1" in result.stdout
    assert sum(int(line.split()[2].rstrip("s")) for line in planned) <= 600, "the steps' timeouts exceed 10 minutes"
    assert not output_dir.exists() and not work_dir.exists()


def test_bad_arguments_stop_before_any_step():
    result = run_script("--steps", "many", timeout=30)
    assert result.returncode == 2 and "positive integers" in result.stderr
    result = run_script("--no-such-option", timeout=30)
    assert result.returncode == 2 and "unknown argument --no-such-option" in result.stderr


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ([*TRAIN, "--no_such_flag", "1"], "--no_such_flag"),
        ([*TRAIN, "--max_length", "long"], "SystemExit"),
        ([*TRAIN, "--attention_type", "linear"], "SystemExit"),  # argparse: not among the choices
        ([*TRAIN, "--config_overrides", "hidden_size=30,num_attention_heads=4"], "ValueError"),
        (["python", "scripts/no_such_script.py"], "no such script"),
        (["python", "-m", "accelerate.commands.launch", "--config_file", "configs/none.yaml", "scripts/train.py"],
         "no such accelerate config"),
        (["python", "scripts/benchmark.py", "--methods", "full_sdpa", "linear"], "Unknown methods"),
        (["env", "A=1", "python", "-m", "pytest", "tests/no_such_test.py"], "pytest paths not found"),
    ],
)  # fmt: skip
def test_check_catches_a_bad_command(command, error, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    good = [*TRAIN, "--attention_type", "performer", "--bf16", "true"]
    plan = tmp_path / "plan.txt"
    plan.write_text(shlex.join(good) + "\n" + shlex.join(command) + "\n")
    assert check_plan(plan) == 1
    ok, fail = capsys.readouterr().out.split("FAIL ")
    assert ok.startswith("ok ") and error in fail


def test_training_table_reads_each_profiled_run(tmp_path):
    for name, tokens_per_s in (("train_full", 1.5e6), ("fsdp2", 2.5e5)):
        (tmp_path / name).mkdir()
        profile = {"num_steps": 200, "step_time_s": {"median": 0.0123}, "tokens_per_s_median": tokens_per_s}
        profile["peak_memory_mib"] = 2048.4
        (tmp_path / name / "profile_summary.json").write_text(json.dumps(profile))
    (tmp_path / "train_full" / "all_results.json").write_text(
        json.dumps({"eval_auroc": 0.61234, "train_runtime": 9.87})
    )
    (tmp_path / "train_performer").mkdir()  # a run that failed before writing its profile
    rows = training_table(tmp_path).splitlines()
    assert rows[2:] == [
        "| fsdp2 | 200 | 0.0123 | 250,000 | 2,048 |  |  |",
        "| train_full | 200 | 0.0123 | 1,500,000 | 2,048 | 9.9 | 0.6123 |",
    ]
    assert training_table(tmp_path / "train_performer") == "No profiled training run."
