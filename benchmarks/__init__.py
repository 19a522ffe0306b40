"""Benchmarks and the comparison report, kept next to the package (not installed with it), as
flash-linear-attention keeps its `benchmarks/`: `scripts/benchmark.py` (speed and memory of every attention kind
against length: `suite`, `models`, `report`), `scripts/compare.py` (quality and cost from training runs: `compare`),
`scripts/benchmark_attention.py` (the FAVOR+ kernel alone: `attention`) and `scripts/benchmark_throughput.py`
(events/s at natural batch shapes, side by side: `throughput`); `measure` holds the shared timers. `data_scale` is
`scripts/benchmark_data.py --scale`: the sharded data preparation at several sizes. `online.py` runs on its own
(`python benchmarks/online.py`).

The scripts put the source tree's root on `sys.path` to import this package; the tests run from that root."""
