"""Benchmark and comparison-report logic: a tiny benchmark run writes its tables and plots, the time/memory budget
and the ratios, the peak tensor memory, the performer-pytorch peer, and the comparison's grid, resumption and report
(from fake finished runs; no training here)."""

import csv
import json
import math
import os
import runpy
import sys
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from inference_helpers import read_predictions, train_tiny_folder
from sklearn.metrics import roc_auc_score

from benchmarks import attention as op_benchmark
from benchmarks import compare, fresh_customers, throughput
from benchmarks.compare import (
    CompareConfig,
    GroupSummary,
    RunSpec,
    context_verdict,
    family_recipe,
    family_recipe_lines,
    micro_batch_size,
    reference_verdict,
    run_all,
    train_command,
    write_report,
)
from benchmarks.measure import Measurement, measure_callable, measure_matmul_flops, tensor_peak_mib
from benchmarks.models import METHODS, PEER_LAYERS, benchmark_config, build_model
from benchmarks.report import write_results
from benchmarks.reversible import ReversibleBenchmarkConfig, format_reversible, run_reversible_benchmark
from benchmarks.suite import (
    CHECK_LEVEL,
    LEVELS,
    BenchmarkConfig,
    BenchmarkRow,
    Budget,
    add_ratios,
    run_benchmark,
)
from benchmarks.throughput import ThroughputConfig, format_throughput, parse_point, run_throughput
from txformer.attention_performer import favor_attention
from txformer.attention_reformer import lsh_attention
from txformer.configuration_txformer import ATTENTION_KINDS
from txformer.data import EventVocabulary, build_customer_dataset
from txformer.data.synthetic import SyntheticOracle
from txformer.metrics import bootstrap_auroc_interval, write_evaluated_predictions
from txformer.prediction import PredictionArguments, predict
from txformer.recipe import LONG_HISTORY_RECIPE, STANDARD_RECIPE


REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = (
    "hidden_size=16,num_attention_heads=2,intermediate_size=32,segment_length=8,ltm_num_basis=8,"
    "ltm_num_samples=8,performer_num_random_features=16"
)


def test_tiny_benchmark_writes_every_point_and_output(tmp_path):
    config = BenchmarkConfig(
        lengths=[8, 16],
        batch_size=2,
        min_run_time=0.01,
        config_overrides=TINY_MODEL,
        check_lengths=[16, 40],
        max_seconds=60,
        check_max_seconds=60,
    )
    result = run_benchmark(config, log=lambda line: None)
    methods = [name for name in METHODS if METHODS[name].available]
    measured = {(row.level, row.method, row.length) for row in result.rows}
    model_levels = [level for level in LEVELS if level != CHECK_LEVEL]
    expected = {(level, method, length) for level in model_levels for method in methods for length in (8, 16)}
    expected |= {(CHECK_LEVEL, method, length) for method in config.check_methods for length in (16, 40)}
    assert measured == expected
    assert not result.skipped
    check = [row for row in result.rows if row.level == CHECK_LEVEL]
    assert all(row.tensor_peak_mib > 0 for row in check)

    paths = write_results(result, config, "python scripts/benchmark.py --test", tmp_path)
    with open(tmp_path / "benchmark.csv") as csv_file:
        assert len(list(csv.DictReader(csv_file))) == len(expected)
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "## Training step" in markdown and "## ∞-former check" in markdown
    assert "∞-former time per event at L=40 / at L=16" in markdown
    assert {path.name for path in paths if path.suffix == ".png"} == {f"benchmark_{level}.png" for level in LEVELS}
    assert json.loads((tmp_path / "benchmark.json").read_text())["config"]["lengths"] == [8, 16]


def test_levels_choose_the_model_levels_and_the_check():
    config = BenchmarkConfig(
        levels=[CHECK_LEVEL], check_methods=["infinity"], check_lengths=[8, 16], tensor_memory=False,
        min_run_time=0.01, config_overrides=TINY_MODEL,
    )  # fmt: skip
    result = run_benchmark(config, log=lambda line: None)
    assert [(row.level, row.length) for row in result.rows] == [(CHECK_LEVEL, 8), (CHECK_LEVEL, 16)]
    assert BenchmarkConfig(levels=["train", "attention"]).model_levels() == ["attention", "train"]
    with pytest.raises(ValueError, match="Unknown levels"):
        BenchmarkConfig(levels=["check"])


def test_budget_skips_lengths_by_growth_exponent():
    budget = Budget(max_seconds=1.0, max_memory_mib=100.0)
    point = Measurement(seconds=0.3, all_seconds=[0.3], peak_memory_mib=10.0)
    for name in ("full_sdpa", "infinity", "full_eager"):
        budget.record("train", METHODS[name], 100, point)
    assert "predicted 1 s" in budget.reason_to_skip("train", METHODS["full_sdpa"], 200)  # 0.3 * 2² > 1
    assert budget.reason_to_skip("train", METHODS["infinity"], 200) is None  # 0.3 * 2 < 1
    budget.record("train", METHODS["full_eager"], 100, Measurement(0.01, [0.01], 10.0))
    assert "MiB" in budget.reason_to_skip("train", METHODS["full_eager"], 400)  # 10 MiB * 4² > 100 MiB
    # Once stopped, longer lengths stay stopped.
    assert budget.reason_to_skip("train", METHODS["full_sdpa"], 150) is not None


def test_ratios_against_exact_peer_and_first_length():
    def row(method, length, seconds, memory):
        return BenchmarkRow(
            "train", method, length, 2, seconds, memory, 2 * length / seconds, 1e6 * seconds / length / 2
        )

    rows = [
        row("full_sdpa", 100, 1.0, 10.0),
        row("performer", 100, 2.0, 5.0),
        row("performer_pytorch", 100, 4.0, 20.0),
        row("performer", 200, 4.0, 10.0),
        row("infinity", 100, 1.0, math.nan),
    ]
    add_ratios(rows)
    performer = rows[1]
    assert performer.time_vs_exact == 2.0 and performer.memory_vs_exact == 0.5
    assert performer.time_vs_peer == 0.5 and performer.memory_vs_peer == 0.25
    assert rows[3].us_per_event_vs_first == pytest.approx(1.0) and rows[3].memory_vs_first == 2.0
    assert rows[3].time_vs_exact is None  # no SDPA point at 200
    assert rows[4].memory_vs_exact is None  # unknown memory gives no ratio


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs a writable /proc/self/clear_refs")
def test_measure_callable_times_blocks_and_counts_what_each_allocates():
    calls = []

    def step():
        calls.append("step")
        allocation = torch.ones(32 * 2**20 // 4)  # 32 MiB, written
        return allocation.sum()

    measurement = measure_callable(
        step, torch.device("cpu"), min_run_time=0.05, prepare=lambda: calls.append("prepare")
    )
    assert calls.count("step") > len(measurement.all_seconds) >= 1  # the warm-up run is not timed
    assert 0 < min(measurement.all_seconds) <= measurement.seconds <= max(measurement.all_seconds)
    assert 30 <= measurement.peak_memory_mib <= 48
    assert calls[-1] == "prepare"  # left cleared, as before the first block
    assert measure_matmul_flops(torch.device("cpu"), size=64, min_run_time=0.01) > 0


def test_tensor_peak_counts_live_tensor_bytes():
    def step():
        first = torch.ones(1024, 1024)  # 4 MiB
        second = first + 1  # 8 MiB live
        del first
        third = second * 2  # still 8 MiB live
        return third.sum()

    assert tensor_peak_mib(step, torch.device("cpu")) == pytest.approx(8.0, abs=0.01)


@pytest.mark.skipif(not METHODS["performer_pytorch"].available, reason="performer-pytorch not installed")
def test_performer_pytorch_peer_is_our_layer_with_their_core():
    config = benchmark_config(METHODS["performer_pytorch"], TINY_MODEL)
    theirs = build_model(METHODS["performer_pytorch"], config, torch.device("cpu")).txformer.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    query, key, value = (0.5 * torch.randn(2, 2, 12, 8, generator=generator) for _ in range(3))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    output, _ = theirs.attend(query, key, value, None, mask)
    reference = favor_attention(query, key, value, theirs.projection_matrix, mask, compat_performer_pytorch=True)
    torch.testing.assert_close(output, reference.transpose(1, 2), rtol=1e-4, atol=1e-5)


def peer_layer(name: str, overrides: str) -> torch.nn.Module:
    """The first attention layer of a peer's model, checked to be the peer's layer with our layer's weights."""
    config = benchmark_config(METHODS[name], f"{TINY_MODEL},{overrides}")
    torch.manual_seed(0)
    ours = build_model(METHODS[name.split("_")[0]], config, torch.device("cpu")).txformer.layers[0].self_attn
    torch.manual_seed(0)
    theirs = build_model(METHODS[name], config, torch.device("cpu")).txformer.layers[0].self_attn
    assert type(theirs) is PEER_LAYERS[name]
    assert torch.equal(theirs.o_proj.weight, ours.o_proj.weight) and torch.equal(theirs.rotations, ours.rotations)
    return theirs


def test_transformers_lsh_peer_is_their_projections_and_core_before_our_output_projection():
    """Histories no longer than a chunk take transformers' unhashed path: our core on their projections."""
    layer = peer_layer("reformer_transformers", "lsh_chunk_length=16").eval()
    hidden_states = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(0))
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    output, _, _ = layer(hidden_states, None, key_mask)
    lsh = layer.lsh_self_attention
    shared, value = (layer.split_heads(projection(hidden_states)) for projection in (lsh.query_key, lsh.value))
    expected = layer.o_proj(lsh_attention(shared, value, layer.rotations, 16, key_mask).flatten(2))
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not METHODS["reformer_pytorch"].available, reason="reformer-pytorch not installed")
def test_reformer_pytorch_peer_pads_folds_heads_and_masks_padding():
    """One round over two chunks that cover the padded history: every real event attends to every other one, with
    reformer-pytorch's scores q · k / ‖k‖ / √d."""
    layer = peer_layer("reformer_pytorch", "lsh_chunk_length=8,lsh_num_hashes=1").eval()
    generator = torch.Generator().manual_seed(0)
    query, value = (torch.randn(2, 2, 11, 8, generator=generator) for _ in range(2))
    key_mask = torch.arange(11)[None, :] < torch.tensor([11, 6])[:, None]
    output, _ = layer.attend(query, query, value, None, key_mask)
    keys = torch.nn.functional.normalize(query, dim=-1)
    scores = torch.matmul(query, keys.transpose(-1, -2)) / 8**0.5
    allowed = key_mask[:, None, None, :] & ~torch.eye(11, dtype=torch.bool)
    expected = torch.matmul(torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1), value).transpose(1, 2)
    torch.testing.assert_close(output[key_mask], expected[key_mask], rtol=1e-5, atol=1e-6)


def test_grid_commands_and_resume_from_last_complete_checkpoint(tmp_path):
    config = CompareConfig(
        families=["independent:300", "order:200"], runs=["full:64,256", "infinity:0"], seeds=[1, 2],
        output_dir=str(tmp_path),
    )  # fmt: skip
    specs = config.specs()
    assert [spec.name for spec in specs[:5]] == [
        "independent/lightgbm-seed1",
        "independent/full-64-seed1",
        "independent/full-256-seed1",
        "independent/infinity-whole-seed1",
        "order/lightgbm-seed1",
    ]
    assert len(specs) == 16
    assert micro_batch_size(RunSpec("order", "full", 256, 1), config) == 64
    # A streaming kind holds one segment of each history at a time: its micro-batch is sized by the segment.
    assert micro_batch_size(RunSpec("order", "infinity", 0, 1), config) == 64
    assert micro_batch_size(RunSpec("order", "infinity", 0, 1), replace(config, micro_batch_events=4096)) == 16
    command = train_command(RunSpec("order", "infinity", 0, 1), config, ["--bf16"])
    assert Path(command[0]).name == "txformer-train" and command[-1] == "--bf16"
    assert command[command.index("--max_length") + 1] == "0"
    assert command[command.index("--synthetic_family") + 1] == "order"
    assert command[command.index("--synthetic_num_customers") + 1] == "200"
    assert command[command.index("--gradient_accumulation_steps") + 1] == "1"
    assert "--group_by_length" in command and "--resume_from_checkpoint" not in command
    assert "--train_max_length" not in command
    # On the long family train.py chooses the long-history recipe itself (nothing added to the command); the
    # micro-batches are sized by its training windows of at most 4,096 events, or by the comparison's own
    # --train_max_length, which is passed on; the command line's extra flags come last (they win).
    long_family = CompareConfig(families=["long:100"], runs=["infinity:0"])
    command = train_command(RunSpec("long", "performer", 16384, 1), long_family, ["--max_steps", "7"])
    assert "--config_overrides" not in command and "--train_max_length" not in command
    assert command[command.index("--per_device_train_batch_size") + 1] == "16"
    assert command[-2:] == ["--max_steps", "7"]
    assert family_recipe("long") is LONG_HISTORY_RECIPE and family_recipe("order") is STANDARD_RECIPE
    assert family_recipe_lines("order") == []
    assert "`long_histories` recipe" in family_recipe_lines("long")[0]
    assert "--train_max_length 4096 --config_overrides embedding_sum_readout=true" in family_recipe_lines("long")[0]
    windows = CompareConfig(families=["long:100"], runs=["infinity:0"], train_max_length=512)
    command = train_command(RunSpec("long", "infinity", 0, 1), windows, [])
    assert command.count("--train_max_length") == 1
    assert command[command.index("--train_max_length") + 1] == "512"
    assert command[command.index("--per_device_train_batch_size") + 1] == "64"
    assert command[command.index("--per_device_eval_batch_size") + 1] == "64"
    assert micro_batch_size(RunSpec("long", "full", 256, 1), windows) == 64
    baseline = train_command(RunSpec("order", "lightgbm", 0, 2), config, ["--bf16"])
    assert Path(baseline[0]).name == "txformer-baseline" and "--bf16" not in baseline
    assert baseline[baseline.index("--output_dir") + 1] == str(tmp_path / "order" / "lightgbm-seed2")

    run_dir = tmp_path / "order" / "infinity-whole-seed1"
    (run_dir / "checkpoint-10").mkdir(parents=True)
    (run_dir / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (run_dir / "checkpoint-20").mkdir()  # interrupted while saving: no trainer state
    command = train_command(RunSpec("order", "infinity", 0, 1), config, [])
    assert command[command.index("--resume_from_checkpoint") + 1] == str(run_dir / "checkpoint-10")
    scoped = CompareConfig(families=["order:200", "long:100"], runs=["full:256", "long/performer:4096"], seeds=[1])
    assert [spec.name for spec in scoped.specs()] == [
        "order/lightgbm-seed1",
        "order/full-256-seed1",
        "long/lightgbm-seed1",
        "long/full-256-seed1",
        "long/performer-4096-seed1",
    ]
    with pytest.raises(ValueError, match="FAMILY:CUSTOMERS"):
        CompareConfig(families=["order"]).specs()


def test_finished_runs_are_skipped(tmp_path):
    config = CompareConfig(families=["order:100"], runs=["full:64,256"], seeds=[1], output_dir=str(tmp_path))
    (tmp_path / "order" / "full-64-seed1").mkdir(parents=True)
    (tmp_path / "order" / "full-64-seed1" / "all_results.json").write_text("{}")
    (tmp_path / "order" / "lightgbm-seed1").mkdir(parents=True)
    (tmp_path / "order" / "lightgbm-seed1" / "baseline_results.json").write_text("{}")
    ran = []
    unfinished = run_all(config, [], log=lambda line: None, runner=lambda spec, *args: ran.append(spec) or False)
    assert [spec.name for spec in ran] == ["order/full-256-seed1"]
    assert unfinished == ran


def test_time_limit_stops_a_run_and_records_it(tmp_path, monkeypatch):
    config = CompareConfig(runs=["full:64"], seeds=[1], output_dir=str(tmp_path), time_limit_minutes=0.02)
    monkeypatch.setattr(compare, "train_command", lambda *args: [sys.executable, "-c", "import time; time.sleep(60)"])
    assert not compare.run_one(RunSpec("order", "full", 64, 1), config, [], log=lambda line: None)
    record = json.loads((tmp_path / "order" / "full-64-seed1" / "compare_run.json").read_text())
    assert record["calls"][0]["return_code"] is None and record["calls"][0]["wall_time_s"] < 30


def fake_run(run_dir, auroc, accuracy, oracle_window, tokens_per_s, results_file="all_results.json"):
    run_dir.mkdir(parents=True)
    metrics = {
        "eval_auroc": auroc,
        "eval_accuracy": accuracy,
        "oracle_auroc_all": 0.87,
        "oracle_auroc_last_max_length": oracle_window,
        "oracle_auroc_last_64": 0.7,
        "oracle_auroc_last_4096": 0.86,
    }
    (run_dir / results_file).write_text(json.dumps({"metrics": metrics} if "baseline" in results_file else metrics))
    steps = [
        {
            "step": step,
            "step_time_s": 1.0,
            "tokens": tokens_per_s,
            "tokens_per_s": tokens_per_s,
            "peak_memory_mib": 900 + step,
        }
        for step in (1, 2, 3)
    ]
    (run_dir / "profile_steps.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))
    history = [{"step": 10, "loss": 0.69}, {"step": 20, "loss": 0.6, "eval_validation_auroc": auroc}]
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))


HELD_OUT_IDS = np.arange(1000, 1200)
HELD_OUT_LABELS = np.random.default_rng(0).integers(0, 2, size=len(HELD_OUT_IDS))


def fake_predictions(run_dir, strength, seed):
    """Held-out predictions of a run, written in a shuffled customer order: noisy scores of the labels."""
    rng = np.random.default_rng(seed)
    probabilities = 1 / (1 + np.exp(-(strength * (HELD_OUT_LABELS - 0.5) + rng.normal(size=len(HELD_OUT_IDS)))))
    order = rng.permutation(len(HELD_OUT_IDS))
    name = "baseline_predictions.csv" if "lightgbm" in run_dir.name else "eval_predictions.csv"
    write_evaluated_predictions(run_dir / name, HELD_OUT_IDS[order], HELD_OUT_LABELS[order], probabilities[order])
    return probabilities


def test_report_aggregates_seeds_and_states_the_goals_per_family(tmp_path):
    output_dir = tmp_path / "runs"
    for family in ("independent", "order"):
        fake_run(output_dir / family / "lightgbm-seed1", 0.80, 0.70, None, 0, "baseline_results.json")
        fake_run(output_dir / family / "lightgbm-seed2", 0.82, 0.72, None, 0, "baseline_results.json")
    fake_run(output_dir / "order" / "full-256-seed1", 0.83, 0.77, 0.84, 20000)
    fake_run(output_dir / "order" / "full-256-seed2", 0.85, 0.79, 0.84, 22000)
    fake_run(output_dir / "order" / "infinity-whole-seed1", 0.80, 0.78, 0.87, 5000)
    fake_run(output_dir / "order" / "infinity-whole-seed2", 0.80, 0.80, 0.87, 7000)
    config = CompareConfig(
        families=["independent:300", "order:200"],
        runs=["full:256,1024", "infinity:0"],
        seeds=[1, 2],
        output_dir=str(output_dir),
        report=str(tmp_path / "results.md"),
        figures_dir=str(tmp_path / "figures"),
    )
    unfinished = [spec for spec in config.specs() if spec.max_length == 1024]
    report = write_report(config, unfinished, "python scripts/compare.py").read_text()
    assert "## The `order` family (200 customers)" in report
    assert (
        "| full | last 256 | 2 | 0.8400 ± 0.0141 | – | 0.7800 ± 0.0141 | 0.8400 | 0.0000 | +0.0300 | – | 21,000 | 903 |"
        in report
    )
    assert "| lightgbm | aggregates of the whole history | 2 | 0.8100 ± 0.0141 | – |" in report
    assert "| Bayes oracle | whole history | | 0.8700 |" in report
    assert "- full, best at last 256: AUROC 0.8400 ± 0.0141; beats the baseline by +0.0300; 0.0000 below" in report
    assert (
        "- infinity, best at whole history: AUROC 0.8000 ± 0.0000; **does not beat** the baseline by -0.0100; 0.0700"
        in report
    )
    assert "**not within** 0.02" in report
    assert "- order: full, last 1,024, seed 1" in report
    for name in ("order_auroc_vs_context", "order_learning_curves", "independent_auroc_vs_context"):
        assert (tmp_path / "figures" / f"results_{name}.png").exists()
    assert "(figures/results_order_learning_curves.png)" in report


def test_a_grid_in_another_folder_writes_its_report_there(tmp_path):
    """Only the project's grid (the default `--output_dir`) writes `docs/results.md`; another one writes its report
    and figures inside its own folder unless told otherwise."""
    project = CompareConfig()
    assert (project.report, project.figures_dir) == ("docs/results.md", "docs/figures")
    other = CompareConfig(output_dir=str(tmp_path))
    assert (other.report, other.figures_dir) == (str(tmp_path / "results.md"), str(tmp_path / "figures"))
    told = CompareConfig(output_dir=str(tmp_path), report="docs/results.md")
    assert told.report == "docs/results.md"


def test_report_bootstraps_the_held_out_predictions_of_each_configuration(tmp_path):
    output_dir = tmp_path / "runs"
    scores = {}
    for name, strength, auroc in (("lightgbm-seed1", 1.0, 0.70), ("lightgbm-seed2", 1.0, 0.72)):
        fake_run(output_dir / "order" / name, auroc, 0.6, None, 0, "baseline_results.json")
        scores[name] = fake_predictions(output_dir / "order" / name, strength, seed=len(scores))
    for name, strength in (("full-256-seed1", 2.0), ("full-256-seed2", 2.0), ("infinity-whole-seed1", 2.0)):
        fake_run(output_dir / "order" / name, 0.8, 0.7, 0.84, 20000)
        scores[name] = fake_predictions(output_dir / "order" / name, strength, seed=len(scores))
    fake_run(output_dir / "order" / "infinity-whole-seed2", 0.8, 0.7, 0.87, 20000)  # a run without predictions
    config = CompareConfig(
        families=["order:200"], runs=["full:256", "infinity:0"], seeds=[1, 2], output_dir=str(output_dir),
        report=str(tmp_path / "results.md"), figures_dir=str(tmp_path / "figures"),
    )  # fmt: skip
    report = write_report(config, [], "python scripts/compare.py").read_text()
    full = [scores["full-256-seed1"], scores["full-256-seed2"]]
    baseline = [scores["lightgbm-seed1"], scores["lightgbm-seed2"]]
    low, high = bootstrap_auroc_interval(HELD_OUT_LABELS, full, num_resamples=compare.BOOTSTRAP_RESAMPLES)
    margin_low, margin_high = bootstrap_auroc_interval(
        HELD_OUT_LABELS, full, baseline=baseline, num_resamples=compare.BOOTSTRAP_RESAMPLES
    )
    assert 0 < margin_low < margin_high  # stronger scores than the baseline's on the same customers
    assert f"| full | last 256 | 2 | 0.8000 ± 0.0000 | [{low:.4f}, {high:.4f}] |" in report
    assert f"| +0.0900 | [{margin_low:+.4f}, {margin_high:+.4f}] |" in report
    assert f"beats the baseline by +0.0900 (95% CI [{margin_low:+.4f}, {margin_high:+.4f}])" in report
    baseline_low, baseline_high = bootstrap_auroc_interval(
        HELD_OUT_LABELS, baseline, num_resamples=compare.BOOTSTRAP_RESAMPLES
    )
    assert f"| lightgbm | aggregates of the whole history | 2 | 0.7100 ± 0.0141 | [{baseline_low:.4f}, " in report
    assert "| infinity | whole history | 2 | 0.8000 ± 0.0000 | – |" in report  # one seed has no predictions


def summary(kind: str, length: int, aurocs: list[float], oracle_window: float | None) -> GroupSummary:
    return GroupSummary("long", kind, length, [1, 2], aurocs, aurocs, 0.84, oracle_window, {}, None, None, None)


def test_context_verdict_compares_the_best_model_with_the_oracle_and_shorter_contexts():
    summaries = [
        summary("lightgbm", 0, [0.70, 0.72], None),
        summary("full", 1024, [0.70, 0.70], 0.75),
        summary("infinity", 0, [0.81, 0.83], 0.84),
    ]
    assert context_verdict(summaries) == [
        "- Best: infinity at whole history, 0.0200 below the whole-history oracle (within 0.03).",
        "- It gains +0.1200 over full at last 1,024, whose oracle is 0.0900 lower (goal: at least 0.0700, **met**).",
    ]
    summaries[2] = summary("infinity", 0, [0.74, 0.74], 0.84)
    assert context_verdict(summaries)[0].endswith("0.1000 below the whole-history oracle (**not within** 0.03).")
    assert context_verdict(summaries)[1].endswith("(goal: at least 0.0700, **not met**).")
    assert context_verdict(summaries[:1]) == []


def test_reference_verdict_holds_every_other_kind_against_full_attention_at_the_same_context():
    summaries = [
        summary("lightgbm", 0, [0.70, 0.72], None),
        summary("full", 256, [0.80, 0.82], 0.84),
        summary("local", 256, [0.79, 0.80], 0.84),
        summary("reformer", 256, [0.78, 0.78], 0.84),
        summary("performer", 1024, [0.70, 0.70], 0.86),  # no full attention at 1,024: no verdict
        summary("infinity", 0, [0.90, 0.90], 0.87),
    ]
    summaries[3].reference_margin_interval = (-0.05, 0.01)
    assert reference_verdict(summaries) == [
        "- local against full at last 256: AUROC 0.7950 ± 0.0071 (2 seeds) against 0.8100 ± 0.0141 (2 seeds), "
        "-0.0150 (goal: at least -0.02, **met**).",
        "- reformer against full at last 256: AUROC 0.7800 ± 0.0000 (2 seeds) against 0.8100 ± 0.0141 (2 seeds), "
        "-0.0300 (95% CI [-0.0500, +0.0100]) (goal: at least -0.02, **not met**).",
    ]


def test_report_bootstraps_the_difference_from_full_attention_on_the_same_customers(tmp_path):
    output_dir = tmp_path / "runs"
    scores = {}
    for name, strength, auroc in (
        ("full-256-seed1", 2.0, 0.8),
        ("full-256-seed2", 2.0, 0.8),
        ("local-256-seed1", 1.0, 0.7),
    ):
        fake_run(output_dir / "order" / name, auroc, 0.7, 0.84, 20000)
        scores[name] = fake_predictions(output_dir / "order" / name, strength, seed=len(scores))
    config = CompareConfig(
        families=["order:200"], runs=["full:256", "local:256"], seeds=[1, 2], baseline=False,
        output_dir=str(output_dir), report=str(tmp_path / "results.md"), figures_dir=str(tmp_path / "figures"),
    )  # fmt: skip
    report = write_report(config, [], "python scripts/compare.py").read_text()
    low, high = bootstrap_auroc_interval(
        HELD_OUT_LABELS,
        [scores["local-256-seed1"]],
        baseline=[scores["full-256-seed1"], scores["full-256-seed2"]],
        num_resamples=compare.BOOTSTRAP_RESAMPLES,
    )
    assert low < high < 0  # weaker scores than full attention's on the same customers
    assert (
        "- local against full at last 256: AUROC 0.7000 (1 seed) against 0.8000 ± 0.0000 (2 seeds), -0.1000 "
        f"(95% CI [{low:+.4f}, {high:+.4f}]) (goal: at least -0.02, **not met**)." in report
    )


def test_throughput_measures_every_point_side_by_side():
    config = ThroughputConfig(
        points=["full_sdpa:4x8", "infinity:2x16"],
        rounds=2,
        min_run_time=0.01,
        ragged=True,
        config_overrides=TINY_MODEL,
        clock="process",
    )
    rows, loads = run_throughput(config, log=lambda line: None)
    assert [(row.level, row.point) for row in rows] == [
        (level, point) for level in config.levels for point in config.points
    ]
    # Ragged histories: 1..8 and 2..16 events, only the real ones counted.
    assert [row.events_per_step for row in rows[:2]] == [int(torch.linspace(1, 8, 4).round().sum()), 18]
    assert all(row.min_events_per_s <= row.events_per_s <= row.max_events_per_s for row in rows)
    assert rows[0].vs_first == 1.0
    table = format_throughput(rows, config, loads)
    assert "| training step | infinity:2x16 | 18 |" in table and "events/CPU-s (median round)" in table


def script_namespace(name: str) -> dict:
    return runpy.run_path(str(REPO / "scripts" / f"{name}.py"), run_name="script")


def test_scripts_parse_every_field_as_a_flag_with_hf_argument_parser(capsys):
    config, output = script_namespace("benchmark")["parse_args"](
        ["--levels", "train", "--lengths", "8", "16", "--no_tensor_memory", "--figures_dir", "docs/figures"]
    )
    assert config.levels == ["train"] and config.lengths == [8, 16] and not config.tensor_memory
    assert output.output_dir == "outputs/benchmark" and output.figures_dir == "docs/figures"
    config, output = script_namespace("benchmark_attention")["parse_args"](["--min_run_time", "0.5"])
    assert config.min_run_time == 0.5 and output.output_dir == "outputs/benchmark_attention"
    assert script_namespace("benchmark_throughput")["parse_args"](["--ragged"]).ragged
    parse_data_args = script_namespace("benchmark_data")["parse_args"]
    assert parse_data_args([]).scale is None and parse_data_args(["--scale", "1", "10"]).scale == [1, 10]
    config, extra_args = script_namespace("compare")["parse_args"](["--seeds", "1", "--", "--bf16", "true"])
    assert config.seeds == [1] and extra_args == ["--bf16", "true"]
    with pytest.raises(SystemExit):
        script_namespace("benchmark")["parse_args"](["--help"])
    help_text = capsys.readouterr().out
    assert "python scripts/benchmark.py --levels train" in help_text  # the docstring's examples, as written
    assert "(default: 1.0)" in help_text  # --min_run_time


@pytest.mark.parametrize(
    "point", ["infinity", "infinity:8", "infinity:8xlong", "nope:8x16", "infinity[a=1:8x16", "infinity[]x:8x16"]
)
def test_throughput_rejects_malformed_points(point):
    with pytest.raises(ValueError, match="METHOD:HISTORIESxLENGTH|Unknown method"):
        ThroughputConfig(points=[point])


def test_a_throughput_point_can_set_config_fields_of_its_own(monkeypatch):
    """`METHOD[key=value,...]:BxL` builds that point's model with those fields on top of `--config_overrides`, and
    only that point's."""
    assert parse_point("infinity[ltm_read_current_segment=false,segment_length=4]:2x16") == (
        "infinity", 2, 16, "ltm_read_current_segment=false,segment_length=4"
    )  # fmt: skip
    built = []
    runner_class = throughput.MethodRunner

    def recording_runner(method, config, device):
        runner = runner_class(method, config, device)
        built.append(runner.model_config.ltm_read_current_segment)
        return runner

    monkeypatch.setattr(throughput, "MethodRunner", recording_runner)
    config = ThroughputConfig(
        points=["infinity:2x16", "infinity[ltm_read_current_segment=false]:2x16"],
        levels=["forward"], rounds=1, min_run_time=0.01, config_overrides=TINY_MODEL,
    )  # fmt: skip
    rows, _ = run_throughput(config, log=lambda line: None)
    assert built == [True, False]
    assert [row.point for row in rows] == config.points


def test_throughput_rejects_an_unknown_clock():
    with pytest.raises(ValueError, match="Unknown clock 'cpu'"):
        ThroughputConfig(clock="cpu")


def test_attention_op_benchmark_ratios_against_sdpa_and_crossover_lengths():
    def row(method: str, length: int, time_ms: float) -> op_benchmark.BenchmarkRow:
        return op_benchmark.BenchmarkRow(method, length, time_ms, 1.0, 1.0, 0.5)

    sdpa, local, favor = op_benchmark.SDPA, op_benchmark.LOCAL, op_benchmark.OURS
    rows = [
        *(row(sdpa, length, time) for length, time in ((1024, 10.0), (2048, 40.0), (4096, 160.0))),
        *(row(local, length, time) for length, time in ((1024, 12.0), (2048, 20.0), (4096, 40.0), (8192, 80.0))),
        *(row(favor, length, time) for length, time in ((1024, 5.0), (2048, 50.0), (4096, 30.0))),
    ]
    op_benchmark.add_ratios(rows, reference_length=1024)
    assert [row.time_vs_sdpa for row in rows if row.method == local] == [1.2, 0.5, 0.25, None]
    assert op_benchmark.crossover_length(rows, local) == 2048
    assert op_benchmark.crossover_length(rows) == 4096  # FAVOR+ is slower than SDPA at 2048


def test_reversible_benchmark_measures_every_kind_side_by_side():
    config = ReversibleBenchmarkConfig(
        length=8, batch_size=1, layers=[1, 2], min_run_time=0.0, tensor_memory=False, config_overrides=TINY_MODEL
    )
    result = run_reversible_benchmark(config, log=lambda line: None)
    assert [(row.kind, row.reversible, row.num_layers) for row in result.rows] == [
        (kind, reversible, num_layers)
        for kind in ATTENTION_KINDS
        for reversible in (False, True)
        for num_layers in (1, 2)
    ]
    assert all(row.time_s > 0 and math.isnan(row.tensor_peak_mib) for row in result.rows)
    report = format_reversible(result, config)
    for kind in ATTENTION_KINDS:
        assert f"| {kind} | 2 | reversible |" in report and f"\n| {kind} | " in report.split("Ratios")[1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layers": [8, 1]}, "two increasing"),
        ({"layers": [1, 2, 4]}, "two increasing"),
        ({"kinds": ["nope"]}, "Unknown attention kinds"),
        ({"config_overrides": "num_hidden_layers=4"}, "--layers does"),
    ],
)
def test_reversible_benchmark_rejects_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        ReversibleBenchmarkConfig(**overrides)


def test_fresh_customers_scores_a_folder_and_the_plug_in_on_other_draws_of_the_generator(tmp_path, capsys):
    comparison = fresh_customers.synthetic_folder("order", 40, 0)
    customers = build_customer_dataset(comparison[0], comparison[1])
    folder = train_tiny_folder(tmp_path / "model", "full", EventVocabulary.fit(customers), customers, 32)
    with patch.object(
        sys, "argv", ["x", "--model_dirs", str(folder), "--comparison_customers", "40", "--num_customers", "30"]
    ):
        fresh_customers.main()
    report = capsys.readouterr().out
    transactions, _, fresh_folder = fresh_customers.synthetic_folder("order", 30, 0)
    oracle = SyntheticOracle.load(fresh_folder)
    scores = read_predictions(predict(PredictionArguments(model=str(folder), transactions=str(transactions),
                                                          output_file=str(tmp_path / "p.csv"))))  # fmt: skip
    ids = list(scores)
    auroc = roc_auc_score(oracle.true_labels(ids), list(scores.values()))
    assert f"| `{folder}` | 32 | {auroc:.4f} | {oracle.auroc(ids, 32):.4f} |" in report
    assert "| plug-in Bayes (transition counts) | 256 | " in report
    assert len(ids) == 30  # every fresh customer, labelled or not


def test_fresh_customers_must_be_other_draws_than_the_comparison():
    with pytest.raises(ValueError, match="must differ"):
        fresh_customers.FreshCustomersConfig(model_dirs=["x"], comparison_customers=100, num_customers=100)
