"""Benchmarks and the comparison report: `scripts/benchmark.py` (speed and memory of every attention kind against
length: `suite`, `models`, `report`), `scripts/compare.py` (quality and cost from training runs: `compare`),
`scripts/benchmark_attention.py` (the FAVOR+ kernel alone: `attention`) and `scripts/benchmark_throughput.py`
(events/s at natural batch shapes, side by side: `throughput`); `measure` holds the shared timers and memory
probes. `data_scale` is `scripts/benchmark_data.py --scale`: the sharded data preparation at several sizes."""
