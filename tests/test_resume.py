"""Crash safety: a training run killed with SIGKILL mid-run resumes from its last complete checkpoint and ends with
the metrics and weights of an uninterrupted run; a killed writer never leaves a half-written file that looks
complete."""

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from txformer.io_utils import safetensors_defect
from txformer.training import is_complete_checkpoint, main, resolve_checkpoint


REPO_ROOT = Path(__file__).resolve().parents[1]
SAVE_STEPS = 4
MAX_STEPS = 10
# A tiny model on 200 synthetic customers (126 training customers, 16 steps per epoch). Dropout is on and the data
# is shuffled, so the resumed run must restore the RNG states and skip the batches already seen to end the same.
TRAINING_FLAGS = [
    "--synthetic_num_customers=200",
    "--config_overrides=hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32,"
    "hidden_dropout_prob=0.1,numeric_num_frequencies=2,time_num_harmonics=2",
    "--max_length=32",
    f"--max_steps={MAX_STEPS}",
    "--save_strategy=steps",
    f"--save_steps={SAVE_STEPS}",
    "--per_device_train_batch_size=8",
    "--per_device_eval_batch_size=32",
    "--logging_steps=1",
    "--report_to=none",
    "--disable_tqdm=true",
    "--use_cpu=true",
]
EVAL_METRICS = ("eval_loss", "eval_auroc", "eval_accuracy", "eval_log_loss")
# The killed run: `scripts/train.py`, slowed down after its first checkpoint (a pause after every later step, which
# changes no number) so that the SIGKILL surely lands while it still has steps to go.
SLOW_AFTER_FIRST_CHECKPOINT = textwrap.dedent(
    """
    import sys, time
    import transformers
    from txformer import training

    class Pause(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > args.save_steps:
                time.sleep(2.0)

    class PausingTrainer(training.TxFormerTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Pause())

    training.TxFormerTrainer = PausingTrainer
    training.main(sys.argv[1:])
    """
)


@pytest.fixture
def one_thread():
    """One torch thread here and in the killed process: the same arithmetic in both, and no two threads spinning
    against each other on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_here(output_dir: Path, cache_dir: Path, *flags: str) -> None:
    main([*TRAINING_FLAGS, f"--output_dir={output_dir}", f"--data_cache_dir={cache_dir}", *flags])


def wait_for_checkpoint(process: subprocess.Popen, checkpoint: Path, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_complete_checkpoint(checkpoint):
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {checkpoint.name}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {checkpoint.name} after {timeout} s")
        time.sleep(0.02)


def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path, one_thread):
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    # Separate data caches: the two runs overlap and each generates its (identical, seeded) data.
    killed_cache, straight_cache = tmp_path / "cache_killed", tmp_path / "cache_straight"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    log = tmp_path / "killed_run.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SLOW_AFTER_FIRST_CHECKPOINT,
                *TRAINING_FLAGS,
                f"--output_dir={killed_dir}",
                f"--data_cache_dir={killed_cache}",
            ],
            cwd=tmp_path,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        train_here(straight_dir, straight_cache)  # meanwhile, the uninterrupted run
        wait_for_checkpoint(process, killed_dir / f"checkpoint-{SAVE_STEPS}", log)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (killed_dir / "all_results.json").exists()
    assert not is_complete_checkpoint(killed_dir / f"checkpoint-{MAX_STEPS}")

    train_here(killed_dir, killed_cache, "--resume_from_checkpoint=last")

    resumed = json.loads((killed_dir / "all_results.json").read_text())
    straight = json.loads((straight_dir / "all_results.json").read_text())
    assert {key: resumed[key] for key in EVAL_METRICS} == {key: straight[key] for key in EVAL_METRICS}
    resumed_weights = load_file(killed_dir / "model.safetensors")
    straight_weights = load_file(straight_dir / "model.safetensors")
    assert resumed_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name

    def step_losses(output_dir: Path) -> dict[int, float]:
        state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
        return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}

    assert list(step_losses(straight_dir)) == list(range(1, MAX_STEPS + 1))
    assert step_losses(killed_dir) == step_losses(straight_dir)
    profiled_steps = [
        json.loads(line)["step"] for line in (killed_dir / "profile_steps.jsonl").read_text().splitlines()
    ]
    assert profiled_steps == list(range(1, MAX_STEPS + 1))


def write_checkpoint(folder: Path, state: str | None = "{}") -> Path:
    """A checkpoint folder as the Trainer writes it: weights, optimizer and, last, `trainer_state.json` (unless None)."""
    folder.mkdir()
    save_file({"weight": torch.arange(64.0), "bias": torch.zeros(3)}, folder / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(8)}}}, folder / "optimizer.pt")
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


def truncate(path: Path, size: int) -> None:
    os.truncate(path, size if size >= 0 else path.stat().st_size + size)


def test_last_skips_checkpoints_left_half_written(tmp_path):
    """A kill while saving leaves a checkpoint folder without (or with a truncated) trainer_state.json, the file the
    Trainer writes last: `last` resumes from the newest complete one, and naming an incomplete one is an error."""
    for step, state in ((4, "{}"), (8, None), (12, '{"global_step": 1')):
        write_checkpoint(tmp_path / f"checkpoint-{step}", state)
    (tmp_path / "checkpoint-99-old").mkdir()
    assert resolve_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-4")
    assert resolve_checkpoint("True", tmp_path) == str(tmp_path / "checkpoint-4")
    assert resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(ValueError, match="checkpoint-8 is not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-8"), tmp_path)
    with pytest.raises(ValueError, match="has no complete checkpoint"):
        resolve_checkpoint("last", tmp_path / "checkpoint-8")


def test_last_falls_back_over_checkpoints_with_a_truncated_file_naming_it(tmp_path, caplog):
    """A checkpoint whose trainer_state.json reads back but whose weights or optimizer file was cut short (a full
    disk, an interrupted copy) would fail to load with a message that names no file: `last` skips it with a warning
    naming the file, and naming it is an error that names the file."""
    for step in (4, 8, 12):
        write_checkpoint(tmp_path / f"checkpoint-{step}")
    truncate(tmp_path / "checkpoint-12" / "model.safetensors", -10)
    truncate(tmp_path / "checkpoint-8" / "optimizer.pt", 100)
    with caplog.at_level(logging.WARNING, logger="txformer.training"):
        assert resolve_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-12 (model.safetensors is incomplete: " in caplog.text
    assert "checkpoint-8 (optimizer.pt is incomplete: no end of archive" in caplog.text
    with pytest.raises(
        ValueError, match=r"checkpoint-12 is not a complete checkpoint \(model.safetensors is incomplete"
    ):
        resolve_checkpoint(str(tmp_path / "checkpoint-12"), tmp_path)


@pytest.mark.parametrize("cut", ["length", "header", "data", "extra_bytes", "empty"])
def test_a_safetensors_file_is_whole_exactly_when_safetensors_loads_it(tmp_path, cut):
    """`safetensors_defect` reads the header alone; it flags exactly the files that the loader refuses."""
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.arange(64.0)}, path)
    assert safetensors_defect(path) is None
    load_file(path)
    header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    if cut == "extra_bytes":
        with open(path, "ab") as file:
            file.write(b"\0" * 4)
    else:
        truncate(path, {"length": 4, "header": header_end - 5, "data": header_end + 10, "empty": 0}[cut])
    assert safetensors_defect(path) is not None
    with pytest.raises(Exception, match="(?i)header|incomplete|metadata|too small"):
        load_file(path)


def load_io_utils():
    """`txformer/io_utils.py` alone (standard library only), without importing the package and torch."""
    spec = importlib.util.spec_from_file_location("io_utils", REPO_ROOT / "txformer" / "io_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KILLED_WRITER = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("io_utils", sys.argv[1])
    io_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io_utils)

    def write(file):
        file.write("customer_id,probability\\n" + "1,0.5\\n" * 1000)
        file.flush()
        print("half written", flush=True)
        time.sleep(60)
        file.write("2,0.5\\n")

    io_utils.atomic_write(sys.argv[2], write)
    """
)


def test_a_writer_killed_mid_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "predictions.csv"
    target.write_text("customer_id,probability\n7,0.25\n")
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(REPO_ROOT / "txformer" / "io_utils.py"), str(target)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "half written"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert target.read_text() == "customer_id,probability\n7,0.25\n"
    # What the kill left is a hidden temporary file, never a file of the target's name.
    leftovers = [path.name for path in tmp_path.iterdir() if path != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".predictions.csv.") and leftovers[0].endswith(".tmp")


def test_a_failing_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    io_utils = load_io_utils()
    target = tmp_path / "all_results.json"
    io_utils.atomic_write_json(target, {"eval_auroc": 0.5})

    def fail_halfway(file):
        file.write('{"eval_auroc": 0.9')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io_utils.atomic_write(target, fail_halfway)
    assert json.loads(target.read_text()) == {"eval_auroc": 0.5}
    assert [path.name for path in tmp_path.iterdir()] == ["all_results.json"]
