#!/usr/bin/env python
"""Pretrain a TxFormer on transactions alone (no labels). No arguments: CoLES on synthetic data, full attention.
Every `TrainingArguments` flag works.

python scripts/pretrain.py --output_dir outputs/pretrain
python scripts/pretrain.py --objective masked --attention_type performer --max_length 1024
python scripts/pretrain.py --transactions transactions.csv --output_dir outputs/pretrain-gender
python scripts/train.py --model_name_or_path outputs/pretrain --output_dir outputs/finetuned
"""

from txformer.cli import run_cli
from txformer.pretraining import main


if __name__ == "__main__":
    run_cli(main)
