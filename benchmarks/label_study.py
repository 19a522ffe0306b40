"""The scarce-labels study: with a share of the training customers labelled, does self-supervised pretraining on the
transactions of every customer (labelled, unlabelled and held out; no labels) plus fine-tuning on the labelled share
come close to the supervised model trained with every label?

Per seed, four runs of the default model and recipe on one synthetic family, all reported on the same held-out
customers (the split of `scripts/compare.py`): supervised with every training label, supervised with the labelled
share only (`--max_train_customers`), CoLES pretraining (`scripts/pretrain.py`, same seed) and its fine-tuning on the
labelled share. Runs go through the comparison's runner (resumable, a folder per run); the report is Markdown.
"""

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from txformer.file_names import RESULTS_FILE
from txformer.training import DataArguments, data_files, last_complete_checkpoint

from .compare import CompareConfig, RunSpec, entry_point, is_finished, mean_std, read_run, run_command, run_one


PRETRAIN_ENTRY_POINT = "txformer-pretrain"
ALL_LABELS = "all-labels"
SHARE_SUPERVISED = "share-supervised"
PRETRAIN = "pretrain"
SHARE_FINETUNED = "share-finetuned"
SHARE_HEAD_ONLY = "share-head-only"
SHARE_HEAD_THEN_ALL = "share-head-then-all"
# The arms that start from another arm's folder (of the same seed): that arm, and the flags they add. Fine-tuning the
# head first and then the whole model is LP-FT (Kumar et al., ICLR 2022).
STARTING_POINTS = {
    SHARE_FINETUNED: (PRETRAIN, []),
    SHARE_HEAD_ONLY: (PRETRAIN, ["--freeze_encoder"]),
    SHARE_HEAD_THEN_ALL: (SHARE_HEAD_ONLY, []),
}
TRAINING_RUN_FILE = "training_run.json"


@dataclass
class LabelStudyConfig:
    """The study's data, model, seeds and pretraining budget (one command-line flag per field)."""

    family: str = field(default="independent:8000", metadata={"help": "FAMILY:CUSTOMERS of the synthetic data."})
    labelled_share: float = field(
        default=0.1, metadata={"help": "Share of the training customers whose labels the scarce-label runs use."}
    )
    attention_type: str = field(default="full", metadata={"help": "Attention kind of every run."})
    max_length: int = field(default=256, metadata={"help": "Context (most recent events) of every run."})
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44], metadata={"help": "Seeds (init, order)."})
    pretrain_steps: int = field(default=300, metadata={"help": "Optimizer steps of each CoLES pretraining."})
    pretrain_batch_size: int = field(default=32, metadata={"help": "Customers per pretraining step (5 slices each)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out share of the labelled customers."})
    output_dir: str = field(default="outputs/label_study", metadata={"help": "A folder per arm inside."})
    compare_output_dir: str = field(
        default="outputs/compare",
        metadata={
            "help": "`scripts/compare.py`'s folder: the every-label runs are its runs (the same command), run there "
            "when missing."
        },
    )
    report: str = field(default="docs/label_study.md", metadata={"help": "The Markdown report written at the end."})
    num_threads: int = field(default=0, metadata={"help": "OMP_NUM_THREADS of the runs (0: inherit)."})
    time_limit_minutes: float = field(
        default=0.0, metadata={"help": "Stop a run after this long in one call; it resumes at the next (0: no limit)."}
    )
    report_only: bool = field(default=False, metadata={"help": "Only aggregate the finished runs into the report."})

    def __post_init__(self):
        if not 0 < self.labelled_share < 1:
            raise ValueError(f"--labelled_share must be in (0, 1), got {self.labelled_share}.")
        family, _, customers = self.family.partition(":")
        if not customers.isdigit():
            raise ValueError(f"--family {self.family!r} is not FAMILY:CUSTOMERS.")
        self.family_name, self.num_customers = family, int(customers)

    def arm_dir(self, name: str) -> Path:
        """The folder of one arm's runs (the comparison's folder for the every-label runs)."""
        return Path(self.compare_output_dir) if name == ALL_LABELS else Path(self.output_dir) / name

    def arm(self, name: str) -> CompareConfig:
        """The comparison's settings for the runs of one arm: its folder, this family, no baseline."""
        return CompareConfig(
            families=[self.family],
            runs=[f"{self.attention_type}:{self.max_length}"],
            seeds=self.seeds,
            baseline=False,
            output_dir=str(self.arm_dir(name)),
            num_threads=self.num_threads,
            time_limit_minutes=self.time_limit_minutes,
        )

    def spec(self, seed: int) -> RunSpec:
        return RunSpec(self.family_name, self.attention_type, self.max_length, seed)

    def pretrain_dir(self, seed: int) -> Path:
        return self.arm_dir(PRETRAIN) / self.spec(seed).name


def num_training_customers(labels_file: Path, eval_fraction: float) -> int:
    """Labelled customers left for training once the held-out ones are split off (`stratified_split` holds out
    `ceil(eval_fraction x labelled)`, scikit-learn's rounding)."""
    with open(labels_file, encoding="utf-8") as file:
        num_labelled = sum(1 for line in file if line.strip()) - 1
    return num_labelled - math.ceil(eval_fraction * num_labelled)


def scarce_label_customers(config: LabelStudyConfig) -> int:
    """Training customers of the scarce-label runs: `labelled_share` of the training customers (the data is generated
    into the cache first, as the training runs would)."""
    data_args = DataArguments(synthetic_family=config.family_name, synthetic_num_customers=config.num_customers)
    _, labels_file, _ = data_files(data_args)
    return max(2, round(config.labelled_share * num_training_customers(labels_file, config.eval_fraction)))


def pretrain_command(config: LabelStudyConfig, seed: int) -> list[str]:
    """CoLES pretraining on the transactions of every customer (no labels), with the run's seed and model."""
    output_dir = config.pretrain_dir(seed)
    checkpoint = last_complete_checkpoint(output_dir)
    return [
        entry_point(PRETRAIN_ENTRY_POINT),
        "--synthetic_family", config.family_name,
        "--synthetic_num_customers", str(config.num_customers),
        "--attention_type", config.attention_type,
        "--max_length", str(config.max_length),
        "--seed", str(seed),
        "--max_steps", str(config.pretrain_steps),
        "--per_device_train_batch_size", str(config.pretrain_batch_size),
        "--save_steps", "0.1",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--output_dir", str(output_dir),
        *(["--overwrite_output_dir", "true"] if checkpoint is None else ["--resume_from_checkpoint", str(checkpoint)]),
    ]  # fmt: skip


def run_arm(config: LabelStudyConfig, arm: str, seed: int, extra_args: list[str], log: Callable[[str], None]) -> bool:
    """Runs (or continues) one arm's run of one seed unless it is finished; returns whether it is finished."""
    spec = config.spec(seed)
    if is_finished(config.arm_dir(arm) / spec.name):
        return True
    if arm == PRETRAIN:
        return run_command(pretrain_command(config, seed), spec.name, {"spec": asdict(spec)}, config.arm(arm), log)
    if arm in STARTING_POINTS:
        source_arm, flags = STARTING_POINTS[arm]
        source = config.arm_dir(source_arm) / spec.name
        if not is_finished(source):
            return False
        extra_args = ["--model_name_or_path", str(source), *flags, *extra_args]
    if arm != ALL_LABELS:
        extra_args = ["--max_train_customers", str(scarce_label_customers(config)), *extra_args]
    return run_one(spec, config.arm(arm), extra_args, log)


def run_study(config: LabelStudyConfig, extra_args: list[str], log: Callable[[str], None] = print) -> list[str]:
    """Runs every unfinished run, seed by seed (pretraining before its fine-tuning); returns those still unfinished."""
    return [
        f"{arm}/{config.spec(seed).name}"
        for seed in config.seeds
        for arm in (ALL_LABELS, SHARE_SUPERVISED, PRETRAIN, *STARTING_POINTS)
        if not run_arm(config, arm, seed, extra_args, log)
    ]


def pretraining_loss(run_dir: Path) -> tuple[float, float] | None:
    """First and last logged loss of a pretraining run."""
    path = run_dir / TRAINING_RUN_FILE
    if not path.exists():
        return None
    losses = [entry["loss"] for entry in json.loads(path.read_text())["loss_history"]]
    return (losses[0], losses[-1]) if losses else None


def format_report(config: LabelStudyConfig, command: str, tolerance: float = 0.02) -> str:
    """The study's table (held-out AUROC per arm, mean ± std over the finished seeds) and its verdict."""
    arms = {
        ALL_LABELS: "supervised, every training label",
        SHARE_SUPERVISED: f"supervised, {config.labelled_share:.0%} of the labels, no pretraining",
        SHARE_FINETUNED: f"CoLES pretraining on every customer, fine-tuned on {config.labelled_share:.0%} of the labels",
        SHARE_HEAD_ONLY: f"CoLES pretraining on every customer, the head alone trained on {config.labelled_share:.0%} "
        "of the labels (`--freeze_encoder`)",
        SHARE_HEAD_THEN_ALL: "the head alone, then the whole model fine-tuned on the same labels (LP-FT)",
    }
    results = {
        arm: [
            read_run(config.arm_dir(arm) / config.spec(seed).name, config.spec(seed))
            for seed in config.seeds
            if is_finished(config.arm_dir(arm) / config.spec(seed).name)
        ]
        for arm in arms
    }
    every_label = {run.spec.seed: run.auroc for run in results[ALL_LABELS]}

    def below_every_label(runs: list) -> float | None:
        """Mean AUROC of the every-label runs minus that of `runs`, over the seeds both have."""
        paired = [run for run in runs if run.spec.seed in every_label]
        if not paired:
            return None
        return statistics.fmean(every_label[run.spec.seed] - run.auroc for run in paired)

    training = {}
    for arm, runs in results.items():
        for run in runs:
            metrics = json.loads((config.arm_dir(arm) / run.spec.name / RESULTS_FILE).read_text())
            training[arm] = metrics["train_samples"] + metrics.get("validation_samples", 0)
    lines = [
        f"# Scarce labels: pretraining on every customer, fine-tuning on {config.labelled_share:.0%} of the labels",
        "",
        "Generated by `scripts/label_study.py` (do not edit by hand); rerun to update. Command:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Data: the `{config.family_name}` synthetic family, {config.num_customers:,} customers. Model: the default "
        f"model and recipe of `scripts/train.py`, {config.attention_type} attention, last {config.max_length:,} "
        "events. Every run is reported on the same held-out customers as `scripts/compare.py` (labelled customers "
        f"split 90/10, split seed 42). The scarce-label runs train on {config.labelled_share:.0%} of the training "
        "customers (`--max_train_customers`, seeded by the split seed; their validation split is carved from them). "
        f"Pretraining: CoLES (`scripts/pretrain.py`, {config.pretrain_steps} steps of {config.pretrain_batch_size} "
        "customers x 5 slices) on the transactions of every customer (labelled, unlabelled and held out; no label), "
        "with the run's seed; fine-tuning starts from it (`--model_name_or_path`, at a tenth of the recipe's learning "
        "rate), or trains the classifier head alone on it (`--freeze_encoder`), or fine-tunes the whole model from "
        "that head-only run (LP-FT).",
        "",
        "| arm | training customers (with validation) | seeds | held-out AUROC (mean ± std) | − every label, same "
        "seeds | oracle, same window |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm, description in arms.items():
        runs = results[arm]
        if not runs:
            lines.append(f"| {description} | | | not run yet | | |")
            continue
        mean, std = mean_std([run.auroc for run in runs])
        spread = "" if std is None else f" ± {std:.4f}"
        gap = None if arm == ALL_LABELS else below_every_label(runs)
        margin = "–" if gap is None else f"{-gap:+.4f}"
        oracle = "–" if runs[0].oracle_window is None else f"{runs[0].oracle_window:.4f}"
        seeds = ", ".join(str(run.spec.seed) for run in runs)
        lines.append(f"| {description} | {training[arm]:,} | {seeds} | {mean:.4f}{spread} | {margin} | {oracle} |")
    losses = [pretraining_loss(config.pretrain_dir(seed)) for seed in config.seeds]
    losses = [loss for loss in losses if loss is not None]
    if losses:
        lines += [
            "",
            "CoLES loss (first → last logged): "
            + ", ".join(f"{first:.4f} → {last:.4f}" for first, last in losses)
            + ".",
        ]
    lines.append("")
    verdicts = {
        SHARE_FINETUNED: "Pretrained and fine-tuned",
        SHARE_HEAD_ONLY: "Pretrained, the head alone",
        SHARE_HEAD_THEN_ALL: "Pretrained, the head alone, then fine-tuned",
    }
    for arm, name in verdicts.items():
        gap = below_every_label(results[arm])
        if gap is not None:
            verdict = "within" if gap <= tolerance else "**not within**"
            lines.append(f"- {name}: {gap:.4f} below every label ({verdict} {tolerance}).")
    supervised = below_every_label(results[SHARE_SUPERVISED])
    if supervised is not None:
        lines.append(f"- Without pretraining: {supervised:.4f} below every label.")
    return "\n".join(lines) + "\n"


def write_report(config: LabelStudyConfig, command: str) -> Path:
    report_path = Path(config.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(format_report(config, command), encoding="utf-8")
    return report_path
