"""txformer: Hugging Face-native transformers over long event sequences (bank transactions)."""

from pathlib import Path

from setuptools import find_packages, setup


setup(
    name="txformer",
    version="0.2.0",
    description="Transformers with pluggable long-sequence attention (full, Performer, ∞-former) for event sequences",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The model card template ships inside the package as `txformer/hub_cards/` (the source tree keeps `hub_cards/`).
    packages=[*find_packages(include=["txformer", "txformer.*"]), "txformer.hub_cards"],
    package_dir={"txformer.hub_cards": "hub_cards"},
    # The metric modules are `evaluate` scripts loaded from their path, not modules of the package.
    package_data={"txformer": ["metric_modules/*.py"], "txformer.hub_cards": ["*.md"]},
    # torch is not pinned here: GPU users keep their own build. CPU-only machines: `make install` pins the CPU wheel.
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0,<6",
        "huggingface_hub>=1.0",
        "datasets>=3.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "pyarrow>=15",
        "numpy>=1.26",
        "scikit-learn>=1.3",
        "scipy>=1.15",
        "lightgbm>=4.0",
        "tqdm>=4.66",
        "evaluate>=0.4.3",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "matplotlib>=3.8",
            "pandas>=2.1",
            "performer-pytorch==1.1.4",
            "reformer-pytorch==1.4.4",
            "optuna>=4.0",
        ],
        # `--hp_search_trials`: Trainer.hyperparameter_search's backend.
        "tune": ["optuna>=4.0"],
    },
    entry_points={
        "console_scripts": [
            "txformer-train=txformer.cli:train_command",
            "txformer-predict=txformer.cli:predict_command",
            "txformer-pretrain=txformer.cli:pretrain_command",
            "txformer-embed=txformer.cli:embed_command",
            "txformer-baseline=txformer.cli:baseline_command",
            "txformer-prepare=txformer.cli:prepare_command",
        ],
    },
)
