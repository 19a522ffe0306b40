#!/usr/bin/env python
"""Train a TxFormer classifier. No arguments: synthetic data, full attention. Every `TrainingArguments` flag works.

python scripts/train.py
python scripts/train.py --attention_type performer --max_length 4096
python scripts/train.py --transactions transactions.csv --labels gender_train.csv --output_dir outputs/gender
accelerate launch scripts/train.py --attention_type infinity --max_length 0
"""

from txformer.cli import run_cli
from txformer.training import main


if __name__ == "__main__":
    run_cli(main)
