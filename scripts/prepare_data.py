#!/usr/bin/env python
"""Prepare transaction files once (sharded, out of core) into the cache that training memory-maps; prints its folder.

python scripts/prepare_data.py --transactions transactions.csv --labels gender_train.csv
python scripts/prepare_data.py --transactions "exports/part-*.csv.gz" more.parquet --labels gender_train.csv
python scripts/prepare_data.py --transactions transactions.csv          # customers only (no split, no vocabulary)
"""

from txformer.cli import run_cli
from txformer.data.prepare import main


if __name__ == "__main__":
    run_cli(main)
