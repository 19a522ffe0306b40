#!/usr/bin/env python
"""Write per-customer embeddings of a trained or pretrained folder to Parquet (`customer_id`, `emb_0..emb_{d-1}`).

python scripts/embed.py --model_dir outputs/pretrain --transactions transactions.csv --output_file embeddings.parquet
python scripts/embed.py --model_dir outputs/pretrain --transactions transactions.csv --embedding contrastive
"""

from txformer.cli import run_cli
from txformer.embedding import main


if __name__ == "__main__":
    run_cli(main)
