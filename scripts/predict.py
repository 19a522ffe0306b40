#!/usr/bin/env python
"""Score raw transactions with a trained folder; writes `customer_id,probability` (the Kaggle format).

    python scripts/predict.py --model_dir outputs/txformer --transactions transactions.csv \
        --customer_ids gender_test_kaggle_sample_submission.csv --output_file submission.csv
"""

from txformer.cli import run_cli
from txformer.prediction import main


if __name__ == "__main__":
    run_cli(main)
