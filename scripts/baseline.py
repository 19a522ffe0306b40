#!/usr/bin/env python
"""LightGBM on per-customer aggregates (and/or customer embeddings), on the model's held-out split and metrics.

python scripts/baseline.py
python scripts/baseline.py --transactions transactions.csv --labels gender_train.csv --output_dir outputs/baseline
python scripts/baseline.py --features both --embeddings embeddings.parquet
"""

from txformer.baseline import main
from txformer.cli import run_cli


if __name__ == "__main__":
    run_cli(main)
