"""Distributed training for real: two CPU processes (gloo) run `scripts/train.py` once per attention kind, launched
either on one machine (`accelerate launch --config_file configs/cpu_2proc.yaml`) or as two simulated machines on
localhost with one process each (`configs/multi_node.yaml`, one launcher per machine rank); each run must match one
process with the same global batch (losses, gradient norms, saved weights, evaluation on the gathered predictions)
and profile both ranks.

Run as a script (`accelerate launch ... tests/test_distributed.py DATA_DIR OUTPUT_ROOT`), this file is the launched
program: it runs `scripts/train.py` with `train_arguments(...)` for every run of `RUNS` (every attention kind, and one
with reversible layers) in one pair of processes, so that the two processes start (and import torch and
transformers) once for all runs.
"""

import argparse
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_config
from safetensors.torch import load_file

from txformer import TxFormerForSequenceClassification
from txformer.configuration_txformer import ATTENTION_KINDS, POOLING_TYPES
from txformer.file_names import EVAL_PREDICTIONS_FILE
from txformer.metrics import read_evaluated_predictions
from txformer.modeling_txformer import TxFormerForContrastivePretraining, TxFormerForMaskedEventModeling
from txformer.pretraining import has_parameters_without_gradient
from txformer.training import TxFormerTrainingArguments


REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
CPU_CONFIG = REPO / "configs" / "cpu_2proc.yaml"
MULTI_NODE_CONFIG = REPO / "configs" / "multi_node.yaml"
WORLD_SIZE = 2
# Where the launched processes ran: one machine with both, or two simulated machines (loopback) with one each.
LAYOUTS = {"one_machine": (1, WORLD_SIZE), "two_machines": (WORLD_SIZE, 1)}
LAUNCH_TIMEOUT_S = 300
PER_DEVICE_BATCH = 4
MAX_STEPS = 4
EVAL_BATCH = 4
# Dropout off; a Performer redraw before every step after the first; ∞-former histories of several segments.
CONFIG_OVERRIDES = (
    "hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,hidden_dropout_prob=0,"
    "attention_dropout_prob=0,performer_num_random_features=16,performer_redraw_interval=1,segment_length=16,"
    "ltm_num_basis=8,ltm_num_samples=8"
)
# The runs by name: every attention kind, and reversible layers (`reversible_layers`, whose custom backward returns
# the parameters' gradients that DDP all-reduces) with a kind whose layers carry a state, if one is registered: its
# state is an input and an output of the custom backward.
REVERSIBLE_KIND = next((name for name, kind in ATTENTION_KINDS.items() if kind.streaming), next(iter(ATTENTION_KINDS)))
RUNS: dict[str, tuple[str, str]] = {
    **{name: (name, CONFIG_OVERRIDES) for name in ATTENTION_KINDS},
    f"{REVERSIBLE_KIND}_reversible": (REVERSIBLE_KIND, CONFIG_OVERRIDES + ",reversible_layers=true"),
}
# Both runs compute in float32; they differ only in summation order (batch split, all-reduce).
RTOL, ATOL = 1e-5, 1e-6
PAIR_EMBEDDING_ATOL = 1e-5
CACHE_FOLDER = "cache"
# Log lines of the data preparation (`txformer.data.prepare`).
ENCODING_LINE = "txformer.data.prepare: Encoding "
CACHE_HIT_LINE = "txformer.data.prepare: Using the prepared data in {}."


def train_arguments(data_dir: Path, output_dir: Path, run: str, per_device_batch: int) -> list[str]:
    """`scripts/train.py` arguments of the run `run` of `RUNS`: the global batch is `per_device_batch` times the number of processes.

    `MAX_STEPS` global batches fit in the first epoch, so both runs see the same samples in the same order; the
    evaluation split (9 customers of the test data) is not a multiple of `WORLD_SIZE * EVAL_BATCH`: uneven batches.
    The runs of one output root share a data cache (`CACHE_FOLDER`, next to their output folders); every process logs
    at INFO, so that the log shows which processes prepared the data.
    """
    attention_type, config_overrides = RUNS[run]
    return [
        "--data_cache_dir", str(output_dir.parent / CACHE_FOLDER),
        "--log_level_replica", "info",
        "--transactions", str(data_dir / "transactions.csv"),
        "--labels", str(data_dir / "gender_train.csv"),
        "--attention_type", attention_type,
        "--config_overrides", config_overrides,
        "--max_length", "64",
        "--eval_fraction", "0.2",
        "--per_device_train_batch_size", str(per_device_batch),
        "--per_device_eval_batch_size", str(EVAL_BATCH),
        "--max_steps", str(MAX_STEPS),
        "--logging_steps", "1",
        "--eval_strategy", "no",
        "--save_strategy", "steps",
        "--save_steps", str(MAX_STEPS),
        "--save_only_model", "true",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--output_dir", str(output_dir),
        # Each rank keeps the Performer projections it redraws itself (as under FSDP), not rank 0's copy.
        "--ddp_broadcast_buffers", "false",
        # The CPU on a GPU machine too (the launches hide the GPUs): both runs compute alike.
        "--use_cpu", "true",
    ]  # fmt: skip


def run_kinds_in_launched_processes(data_dir: Path, output_root: Path) -> None:
    """The launched program: `scripts/train.py` once per run of `RUNS`, `PER_DEVICE_BATCH` rows per process; each
    process first records where torchrun placed it (`placement.rank<r>.json`)."""
    placement = {key: int(os.environ[key]) for key in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    (output_root / f"placement.rank{placement['RANK']}.json").write_text(json.dumps(placement))
    for run in RUNS:
        arguments = train_arguments(data_dir, output_root / run, run, PER_DEVICE_BATCH)
        sys.argv = [str(TRAIN_SCRIPT), *arguments]
        runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")


def free_port() -> int:
    """A TCP port that is free on the loopback interface now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_commands(layout: str, data_dir: Path, output_root: Path) -> list[list[str]]:
    """The `accelerate launch` commands of a layout, one per machine. Two machines take `configs/multi_node.yaml`
    with the fields that a user edits per machine given as flags: both on localhost, one process each, float32."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    program = [__file__, str(data_dir), str(output_root)]
    if layout == "one_machine":
        return [[*launch, "--config_file", str(CPU_CONFIG), *program]]
    num_machines, _ = LAYOUTS[layout]
    port = str(free_port())
    return [
        [
            *launch,
            "--config_file",
            str(MULTI_NODE_CONFIG),
            "--num_machines",
            str(num_machines),
            "--num_processes",
            str(WORLD_SIZE),
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            *program,
        ]  # fmt: skip
        for machine_rank in range(num_machines)
    ]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def runs(request, tmp_path_factory) -> dict[str, Path]:
    """Output roots of every kind trained by two processes (`PER_DEVICE_BATCH` rows each) launched in the layout
    `request.param`, and by this process (`txformer.training.main`, as `scripts/train.py`, with the global batch),
    on tiny synthetic data with short histories (about 48 events) so that batches hold padding and truncated rows.
    The reference runs here while the launched processes start."""
    from txformer.data import SyntheticConfig, generate_synthetic_data

    data_dir, one_process, two_processes = (tmp_path_factory.mktemp(name) for name in ("data", "one", "two"))
    generate_synthetic_data(data_dir, num_customers=64, seed=3, config=SyntheticConfig(median_length=48.0))
    environment = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    # The checkout under test, not another copy installed in the environment; the CPU, even on a GPU machine.
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    environment["CUDA_VISIBLE_DEVICES"] = ""
    launches, log_paths = [], []
    try:
        for machine_rank, command in enumerate(launch_commands(request.param, data_dir, two_processes)):
            log_paths.append(two_processes / f"launch.machine{machine_rank}.log")
            with open(log_paths[-1], "w") as log:
                launches.append(
                    subprocess.Popen(
                        command,
                        cwd=REPO,
                        env=environment,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        from txformer.training import main

        for run in RUNS:
            main(train_arguments(data_dir, one_process / run, run, WORLD_SIZE * PER_DEVICE_BATCH))
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        returncodes = [launch.wait(timeout=max(deadline - time.monotonic(), 1)) for launch in launches]
    finally:
        for launch in launches:
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)  # the launcher and the processes it started
    assert returncodes == [0] * len(launches), "\n".join(path.read_text()[-6000:] for path in log_paths)
    log = "".join(path.read_text() for path in log_paths)
    return {"one": one_process, "two": two_processes, "layout": request.param, "log": log}


def test_processes_ran_on_the_machines_of_the_layout(runs):
    """Two machines are two torchrun agents (node ranks 0 and 1) with one process each, joined over loopback."""
    num_machines, processes_per_machine = LAYOUTS[runs["layout"]]
    placements = [json.loads((runs["two"] / f"placement.rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert [placement["GROUP_RANK"] for placement in placements] == [
        rank // processes_per_machine for rank in range(WORLD_SIZE)
    ]
    assert {placement["GROUP_RANK"] for placement in placements} == set(range(num_machines))
    assert [placement["LOCAL_RANK"] for placement in placements] == [
        rank % processes_per_machine for rank in range(WORLD_SIZE)
    ]
    assert all(placement["LOCAL_WORLD_SIZE"] == processes_per_machine for placement in placements)


def test_the_launch_encoded_the_data_once_and_every_later_run_read_the_cache(runs):
    """The runs of `RUNS` in two processes: the first run's main process prepares and encodes the data while the
    other process waits; its loading, and both processes' loading in the later runs, read the cache."""
    (training_folder,) = (runs["two"] / CACHE_FOLDER / "prepared").glob("training-*")
    assert runs["log"].count(ENCODING_LINE) == 1, runs["log"][-6000:]
    cache_hits = runs["log"].count(CACHE_HIT_LINE.format(training_folder))
    assert cache_hits == WORLD_SIZE * len(RUNS) - 1, runs["log"][-6000:]


def training_logs(output_dir: Path) -> list[dict]:
    """The per-step training logs (loss, grad_norm) of the checkpoint saved at the last step."""
    state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


@pytest.mark.parametrize("run", RUNS)
def test_two_ranks_exist_and_the_profile_summary_gathers_both(runs, run):
    output_dir = runs["two"] / run
    summary = json.loads((output_dir / "profile_summary.json").read_text())
    assert summary["world_size"] == WORLD_SIZE and summary["training"]["world_size"] == WORLD_SIZE
    assert [rank["rank"] for rank in summary["per_rank"]] == list(range(WORLD_SIZE))
    assert summary["training"]["device"].startswith("cpu")
    for rank in range(WORLD_SIZE):
        records = [
            json.loads(line) for line in (output_dir / f"profile_steps.rank{rank}.jsonl").read_text().splitlines()
        ]
        assert [record["step"] for record in records] == list(range(1, MAX_STEPS + 1))
        assert all(record["samples"] == PER_DEVICE_BATCH and record["rank"] == rank for record in records)
    assert summary["samples_total"] == MAX_STEPS * WORLD_SIZE * PER_DEVICE_BATCH
    # The real events of both ranks, as the Trainer counts them (gathered), and as one process counts them.
    single = json.loads((runs["one"] / run / "profile_summary.json").read_text())
    assert [rank["tokens_total"] for rank in summary["per_rank"]] == [single["tokens_total"]] * WORLD_SIZE
    assert summary["tokens_total"] == single["tokens_total"] > summary["samples_total"]
    assert not (output_dir / "profile_steps.jsonl").exists()


def test_ddp_does_not_search_for_unused_parameters(runs):
    """Every parameter gets a gradient, so DDP is told so and does not warn, on each rank, that its search found
    nothing."""
    logs = "".join(path.read_text() for path in runs["two"].glob("launch.machine*.log"))
    assert "find_unused_parameters=True was specified" not in logs


@pytest.mark.parametrize("pooling", POOLING_TYPES)
@pytest.mark.parametrize("attention_type", ATTENTION_KINDS)
def test_ddp_searches_for_unused_parameters_exactly_where_a_loss_leaves_some(attention_type, pooling):
    """The default `ddp_find_unused_parameters` of training (off) and of each pretraining objective agrees with the
    gradients: on where some parameter gets none (DDP would otherwise fail), off where all get one."""
    config = tiny_config(attention_type, pooling=pooling)
    batch = random_batch(config, [3, 9])  # the ∞-former reads the longer history in several segments
    heads = {
        "classification": (TxFormerForSequenceClassification, {"labels": torch.tensor([0, 1])}),
        "contrastive": (TxFormerForContrastivePretraining, {"slice_labels": torch.tensor([0, 0])}),
        "masked": (TxFormerForMaskedEventModeling, {"masked_events": batch["attention_mask"].bool()}),
    }
    for objective, (model_class, targets) in heads.items():
        torch.manual_seed(0)
        model = model_class(config)
        model(**batch, **targets).loss.backward()
        without_gradient = [name for name, parameter in model.named_parameters() if parameter.grad is None]
        if objective == "classification":
            searches = TxFormerTrainingArguments(output_dir="unused", report_to="none").ddp_find_unused_parameters
        else:
            searches = has_parameters_without_gradient(objective, config)
        assert searches == bool(without_gradient), (objective, without_gradient)


@pytest.mark.parametrize("run", RUNS)
def test_loss_trajectory_matches_one_process_with_the_same_global_batch(runs, run):
    """Each global batch is split between the ranks with its own padding; the loss is a per-sample sum over the
    global batch (`num_items_in_batch`). Per-row state must make the split invisible: the ∞-former's memory, and
    the Performer projection that each rank redraws itself."""
    assert results(runs["one"] / run)["train_samples"] >= MAX_STEPS * WORLD_SIZE * PER_DEVICE_BATCH
    single, distributed = training_logs(runs["one"] / run), training_logs(runs["two"] / run)
    assert [entry["step"] for entry in distributed] == list(range(1, MAX_STEPS + 1))
    assert [entry["step"] for entry in single] == list(range(1, MAX_STEPS + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(
            [entry[key] for entry in distributed], [entry[key] for entry in single], rtol=RTOL, atol=ATOL, err_msg=key
        )
    # The trajectory moves: a run whose updates were lost would not match by accident.
    assert len({entry["loss"] for entry in single}) == MAX_STEPS


@pytest.mark.parametrize("run", RUNS)
def test_saved_model_equals_the_one_process_model(runs, run):
    single = load_file(runs["one"] / run / "model.safetensors")
    distributed = load_file(runs["two"] / run / "model.safetensors")
    assert single.keys() == distributed.keys()
    for name, value in single.items():
        # A pair-embedding row used by a single event moves by Adam's normalised step whatever the size of its
        # gradient, so float32 summation-order differences in that gradient show up at ~1e-6 in the row.
        atol = PAIR_EMBEDDING_ATOL if name.endswith("pair_embedding.weight") else ATOL
        torch.testing.assert_close(distributed[name], value, rtol=RTOL, atol=atol, msg=name)


def test_performer_projection_is_the_deterministic_redraw_of_the_last_step(runs):
    """Without DDP's buffer broadcast each rank used its own redraws: they agree (else the weights would differ)."""
    from txformer import TxFormerForSequenceClassification
    from txformer.attention_performer import TxFormerPerformerAttention

    model = TxFormerForSequenceClassification.from_pretrained(runs["two"] / "performer")
    layers = [module for module in model.modules() if isinstance(module, TxFormerPerformerAttention)]
    assert len(layers) == 2
    single = load_file(runs["one"] / "performer" / "model.safetensors")
    for layer in layers:
        # The last redraw happens before the last step, at global step MAX_STEPS - 1 (interval 1).
        assert torch.equal(layer.projection_matrix, layer.draw_projection(MAX_STEPS - 1))
        assert not torch.equal(layer.projection_matrix, layer.draw_projection(0))
    buffers = [name for name in single if name.endswith("projection_matrix")]
    assert len(buffers) == len(layers)
    distributed = load_file(runs["two"] / "performer" / "model.safetensors")
    assert all(torch.equal(distributed[name], single[name]) for name in buffers)


@pytest.mark.parametrize("run", RUNS)
def test_evaluation_covers_every_sample_once_with_uneven_last_batches(runs, run):
    single, distributed = results(runs["one"] / run), results(runs["two"] / run)
    num_eval = distributed["eval_samples"]
    assert num_eval == single["eval_samples"] and num_eval % (WORLD_SIZE * EVAL_BATCH) != 0
    # Accuracy is a count over the gathered predictions: over `num_eval` of them it is a multiple of 1/num_eval.
    correct = distributed["eval_accuracy"] * num_eval
    assert abs(correct - round(correct)) < 1e-9 and 0 < round(correct) < num_eval
    # Metrics of the gathered predictions; `eval_loss` too, which `compute_metrics` replaces by the exact mean (the
    # Trainer's own averages per-batch losses that include the rows duplicated to even out the last batch).
    for key in ("eval_loss", "eval_log_loss", "eval_auroc", "eval_accuracy"):
        assert distributed[key] == pytest.approx(single[key], rel=RTOL, abs=ATOL), key
    assert single["eval_log_loss"] == pytest.approx(single["eval_loss"], rel=RTOL, abs=ATOL)
    # The held-out predictions, gathered from both processes, are written in the customers' order.
    single_ids, single_labels, single_probabilities = read_evaluated_predictions(
        runs["one"] / run / EVAL_PREDICTIONS_FILE
    )
    ids, labels, probabilities = read_evaluated_predictions(runs["two"] / run / EVAL_PREDICTIONS_FILE)
    assert ids.tolist() == single_ids.tolist() and labels.tolist() == single_labels.tolist()
    np.testing.assert_allclose(probabilities, single_probabilities, rtol=RTOL, atol=ATOL)


def test_a_process_of_a_launch_that_joins_no_process_group_is_an_error(monkeypatch, tmp_path):
    """Without a process group (here: an accelerator is claimed, so no CPU fallback) a launched process refuses to
    train alone instead of writing a lone run over its peers'."""
    from txformer.training import TxFormerTrainingArguments

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        TxFormerTrainingArguments(output_dir=str(tmp_path), report_to="none")


# What `accelerate launch --config_file configs/<name>` starts: launcher, processes in all, mixed precision.
LAUNCH_PLANS = {
    "single_gpu.yaml": ("one process", 1, "bf16"),
    "multi_gpu_ddp.yaml": ("torchrun", 2, "bf16"),
    "cpu_2proc.yaml": ("torchrun", 2, "no"),
    "fsdp2.yaml": ("torchrun fsdp", 2, "bf16"),
    "deepspeed_zero2.yaml": ("deepspeed", 2, "bf16"),
    "multi_node.yaml": ("torchrun", 16, "bf16"),
}


def launch_plan(config: Path, monkeypatch) -> tuple[str, argparse.Namespace, dict[str, str]]:
    """The launcher, arguments and environment that `accelerate launch --config_file config scripts/train.py` would
    use, from accelerate's own launch code, without starting anything (no port is probed)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as launch_utils

    monkeypatch.setattr(launch_utils, "is_port_in_use", lambda port: False)
    args = launch_command_parser().parse_args(["--config_file", str(config), str(TRAIN_SCRIPT)])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return "deepspeed", args, launch_utils.prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return "torchrun fsdp" if args.use_fsdp else "torchrun", args, launch_utils.prepare_multi_gpu_env(args)
    return "one process", args, launch_utils.prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("name", sorted(LAUNCH_PLANS))
def test_each_config_launches_what_it_says(name, monkeypatch):
    assert {path.name for path in CPU_CONFIG.parent.glob("*.yaml")} == set(LAUNCH_PLANS)
    launcher, args, environment = launch_plan(CPU_CONFIG.parent / name, monkeypatch)
    assert (launcher, args.num_processes, environment["ACCELERATE_MIXED_PRECISION"]) == LAUNCH_PLANS[name]
    if launcher.startswith("torchrun"):
        assert int(args.nproc_per_node) * args.num_machines == args.num_processes


def test_the_cpu_config_is_the_multi_gpu_config_with_the_cpu_as_device(monkeypatch):
    """The test's launch and the documented multi-GPU launch take the same path: torchrun, one process per device."""
    _, cpu, _ = launch_plan(CPU_CONFIG, monkeypatch)
    _, gpu, _ = launch_plan(CPU_CONFIG.parent / "multi_gpu_ddp.yaml", monkeypatch)
    per_launch = {"config_file", "main_process_port", "master_port"}  # the file's name; a free port drawn per launch
    device = {"use_cpu", "mixed_precision", "num_cpu_threads_per_process"}
    differences = {key for key, value in vars(gpu).items() if value != vars(cpu).get(key)} - per_launch
    assert differences and differences <= device


def test_fsdp2_config_shards_one_unit_per_transformer_layer(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from txformer import TxFormerConfig, TxFormerForSequenceClassification

    _, _, environment = launch_plan(CPU_CONFIG.parent / "fsdp2.yaml", monkeypatch)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)
    model = TxFormerForSequenceClassification(TxFormerConfig(num_hidden_layers=3))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [type(module).__name__ for module in model.modules() if policy(module)] == ["TxFormerLayer"] * 3


def test_deepspeed_config_takes_batch_accumulation_and_clipping_from_the_trainer_flags(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    _, _, environment = launch_plan(CPU_CONFIG.parent / "deepspeed_zero2.yaml", monkeypatch)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    config = DeepSpeedPlugin().deepspeed_config
    assert config["zero_optimization"]["stage"] == 2
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
    assert all(config[key] == "auto" for key in keys)


if __name__ == "__main__":
    run_kinds_in_launched_processes(Path(sys.argv[1]), Path(sys.argv[2]))
