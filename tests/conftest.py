"""Shared fixtures: a tiny config per attention kind, a padded batch built from it, a Python without txformer, and a
data cache of the session's own."""

import functools
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from txformer import TxFormerConfig
from txformer.configuration_txformer import ATTENTION_KINDS


TESTS_DIR = Path(__file__).resolve().parent
# Every registered attention kind runs the shared tests.
ATTENTION_TYPES = list(ATTENTION_KINDS)
CACHE_ENVIRONMENT_VARIABLE = "TXFORMER_CACHE"


def pytest_configure(config):
    """Data prepared by the tests (training, prediction and pretraining cache what they read) goes to a folder of the
    session, never into the user's cache; set before any test module imports `txformer.data`, and inherited by the
    processes the tests start."""
    config.txformer_cache = tempfile.mkdtemp(prefix="txformer-test-cache-")
    os.environ[CACHE_ENVIRONMENT_VARIABLE] = config.txformer_cache


def pytest_unconfigure(config):
    shutil.rmtree(config.txformer_cache, ignore_errors=True)


@functools.cache
def tiny_kind_settings() -> dict:
    """The small settings of every kind: `TINY_SETTINGS` of its own test file, `tests/test_attention_<kind>.py`,
    where it defines them (read when first needed: those files import this one)."""
    settings = {}
    for name in ATTENTION_KINDS:
        if (TESTS_DIR / f"test_attention_{name}.py").exists():
            settings.update(getattr(importlib.import_module(f"test_attention_{name}"), "TINY_SETTINGS", {}))
    return settings


@pytest.fixture(autouse=True)
def keep_subnormal_numbers():
    """Tests that run a script's `run_cli` have the CPU flush subnormal numbers; the next test starts without it."""
    yield
    torch.set_flush_denormal(False)


def tiny_config(attention_type: str = "full", **overrides) -> TxFormerConfig:
    """A small config of the given attention kind; dropout off so outputs are deterministic."""
    settings = dict(
        categorical_vocab_sizes=[12, 9, 7],
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        attention_type=attention_type,
    )
    settings.update(tiny_kind_settings())
    settings.update(overrides)
    return TxFormerConfig(**settings)


def random_batch(config: TxFormerConfig, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch with histories of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    batch_size, max_length = len(lengths), max(lengths)
    input_ids = torch.stack(
        [
            torch.randint(1, size, (batch_size, max_length), generator=generator)
            for size in config.categorical_vocab_sizes
        ],
        dim=-1,
    )
    numeric_values = torch.randn(batch_size, max_length, len(config.numeric_fields), generator=generator) * 1e4
    event_time = torch.cumsum(torch.rand(batch_size, max_length, generator=generator) * 2, dim=1) + 100
    attention_mask = (torch.arange(max_length)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids * attention_mask[..., None]
    numeric_values = numeric_values * attention_mask[..., None]
    event_time = event_time * attention_mask
    return {
        "input_ids": input_ids,
        "numeric_values": numeric_values,
        "event_time": event_time,
        "attention_mask": attention_mask,
    }


def select_rows(batch: dict[str, torch.Tensor], rows: list[int], length: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of a batch, cut to `length` events."""
    return {key: value[rows, :length] for key, value in batch.items()}


@pytest.fixture(params=ATTENTION_TYPES)
def attention_type(request) -> str:
    return request.param


def run_without_txformer(script: str, args: list[str], tmp_path: Path) -> str:
    """Runs `script` in a fresh, offline Python where `txformer` cannot be imported (a remote-code user's environment),
    with its own modules cache; returns the last line it printed, after checking that it succeeded."""
    environment = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
    }
    blocker = 'import sys; sys.modules["txformer"] = None  # the package must not be importable here\n'
    result = subprocess.run(
        [sys.executable, "-c", blocker + script, *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]
