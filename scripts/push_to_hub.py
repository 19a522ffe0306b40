#!/usr/bin/env python
"""Push a trained output folder to the Hugging Face Hub in one commit: safetensors weights, config, model code,
vocabulary, preprocessing, metrics and a generated model card; never a pickle. The token comes from `hf auth login`
or HF_TOKEN.

    python scripts/push_to_hub.py --output_dir outputs/txformer --repo_id <user>/<name> [--private] [--revision BRANCH]
"""

from txformer.cli import run_cli
from txformer.hub import main


if __name__ == "__main__":
    run_cli(main)
