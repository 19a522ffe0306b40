#!/usr/bin/env python
"""Score raw transactions with a trained folder or a Hub repository; writes `customer_id,probability` (the Kaggle
format) and `<output_file>.report.json`.

    python scripts/predict.py --model outputs/txformer --transactions transactions.csv \
        --customer_ids gender_test_kaggle_sample_submission.csv --output_file submission.csv
    python scripts/predict.py --model <user>/<name> --revision <commit hash> --transactions transactions.csv
"""

from txformer.cli import run_cli
from txformer.prediction import main


if __name__ == "__main__":
    run_cli(main)
