"""Names of the files a run writes into its output folder, defined once for their writers (training, pretraining,
profiling, prediction, the baseline) and their readers (the Hub upload, the comparison report, the GPU check).

The Trainer's own files keep transformers' names (`transformers.trainer.TRAINER_STATE_NAME`, ...); the data files
are named in `txformer.data` (`TRANSACTIONS_FILE`, `VOCABULARY_FILE`, ...), next to their format.
"""

RESULTS_FILE = "all_results.json"
TRAINING_RUN_FILE = "training_run.json"
EVAL_PREDICTIONS_FILE = "eval_predictions.csv"
PROFILE_STEPS_FILE = "profile_steps.jsonl"
PROFILE_SUMMARY_FILE = "profile_summary.json"
BASELINE_RESULTS_FILE = "baseline_results.json"
BASELINE_PREDICTIONS_FILE = "baseline_predictions.csv"
PREDICTIONS_FILE = "predictions.csv"
PREDICTIONS_REPORT_SUFFIX = ".report.json"


def profile_steps_file(rank: int, world_size: int) -> str:
    """The profiling callback's steps file of one process: one file per process of a multi-process run."""
    return PROFILE_STEPS_FILE if world_size == 1 else f"profile_steps.rank{rank}.jsonl"
