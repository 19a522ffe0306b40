"""The scarce-labels study: its split sizes, its commands and the order of its runs."""

import json

import pytest

from benchmarks import label_study
from benchmarks.label_study import (
    ALL_LABELS,
    PRETRAIN,
    SHARE_FINETUNED,
    SHARE_HEAD_ONLY,
    SHARE_HEAD_THEN_ALL,
    SHARE_SUPERVISED,
    LabelStudyConfig,
    format_report,
    num_training_customers,
    run_study,
    scarce_label_customers,
)
from txformer.data import build_customer_dataset, generate_synthetic_data, split_for_evaluation
from txformer.training import DataArguments, data_files


def test_training_customers_are_those_the_held_out_split_leaves(tmp_path):
    info = generate_synthetic_data(tmp_path, num_customers=60, seed=0)
    customers = build_customer_dataset(info.transactions_path, info.train_labels_path)
    train, _ = split_for_evaluation(customers, 0.1, 42)
    assert num_training_customers(info.train_labels_path, 0.1) == len(train)


def test_the_scarce_share_counts_the_training_customers_of_the_generated_data():
    config = LabelStudyConfig(family="independent:60", labelled_share=0.25)
    scarce = scarce_label_customers(config)
    _, labels_file, _ = data_files(DataArguments(synthetic_num_customers=60))
    assert scarce == round(0.25 * num_training_customers(labels_file, 0.1))


def test_runs_in_order_with_the_share_and_the_pretrained_folder(tmp_path, monkeypatch):
    config = LabelStudyConfig(family="order:100", seeds=[7], output_dir=str(tmp_path / "study"),
                              compare_output_dir=str(tmp_path / "compare"))  # fmt: skip
    monkeypatch.setattr(label_study, "scarce_label_customers", lambda config: 13)
    calls = []

    def fake_train(spec, arm_config, extra_args, log):
        calls.append((arm_config.output_dir, extra_args))
        return True

    def fake_pretrain(command, name, header, arm_config, log):
        calls.append((arm_config.output_dir, command))
        return False  # pretraining stopped at a time limit: its fine-tuning must wait

    monkeypatch.setattr(label_study, "run_one", fake_train)
    monkeypatch.setattr(label_study, "run_command", fake_pretrain)
    unfinished = run_study(config, ["--bf16"], log=lambda line: None)
    assert [directory for directory, _ in calls] == [
        str(tmp_path / "compare"),
        str(tmp_path / "study" / SHARE_SUPERVISED),
        str(tmp_path / "study" / PRETRAIN),
    ]
    assert calls[0][1] == ["--bf16"]
    assert calls[1][1] == ["--max_train_customers", "13", "--bf16"]
    pretrain = calls[2][1]
    assert pretrain[pretrain.index("--seed") + 1] == "7" and pretrain[pretrain.index("--max_steps") + 1] == "300"
    assert "--labels" not in pretrain
    assert unfinished == [
        f"{PRETRAIN}/order/full-256-seed7",
        f"{SHARE_FINETUNED}/order/full-256-seed7",
        f"{SHARE_HEAD_ONLY}/order/full-256-seed7",
        f"{SHARE_HEAD_THEN_ALL}/order/full-256-seed7",
    ]

    pretrained = config.pretrain_dir(7)
    pretrained.mkdir(parents=True)
    (pretrained / "all_results.json").write_text("{}")
    calls.clear()
    run_study(config, [], log=lambda line: None)
    (finetune_dir, finetune), (head_only_dir, head_only) = calls[-2:]
    assert finetune_dir == str(tmp_path / "study" / SHARE_FINETUNED)
    assert finetune == ["--max_train_customers", "13", "--model_name_or_path", str(pretrained)]
    assert head_only_dir == str(tmp_path / "study" / SHARE_HEAD_ONLY)
    assert head_only == [*finetune, "--freeze_encoder"]
    # LP-FT waits for its head-only run, then starts from its folder.
    assert run_study(config, [], log=lambda line: None) == [f"{SHARE_HEAD_THEN_ALL}/order/full-256-seed7"]
    head_only_run = tmp_path / "study" / SHARE_HEAD_ONLY / "order" / "full-256-seed7"
    head_only_run.mkdir(parents=True)
    (head_only_run / "all_results.json").write_text("{}")
    calls.clear()
    assert run_study(config, [], log=lambda line: None) == []
    assert calls[-1][0] == str(tmp_path / "study" / SHARE_HEAD_THEN_ALL)
    assert calls[-1][1] == ["--max_train_customers", "13", "--model_name_or_path", str(head_only_run)]


def test_report_compares_each_arm_with_every_label(tmp_path):
    config = LabelStudyConfig(family="order:100", seeds=[1, 2], output_dir=str(tmp_path / "study"),
                              compare_output_dir=str(tmp_path / "compare"))  # fmt: skip
    # The fine-tuned arm has only seed 1 yet: it is compared with every label on seed 1 alone.
    aurocs = {
        ALL_LABELS: [0.80, 0.82],
        SHARE_SUPERVISED: [0.70, 0.72],
        SHARE_FINETUNED: [0.79],
        SHARE_HEAD_ONLY: [0.77],
    }
    for arm, values in aurocs.items():
        for seed, auroc in zip(config.seeds, values, strict=False):
            run_dir = config.arm_dir(arm) / config.spec(seed).name
            run_dir.mkdir(parents=True)
            metrics = {"eval_auroc": auroc, "eval_accuracy": 0.7, "oracle_auroc_last_max_length": 0.85,
                       "train_samples": 90, "validation_samples": 10}  # fmt: skip
            (run_dir / "all_results.json").write_text(json.dumps(metrics))
    report = format_report(config, "python scripts/label_study.py")
    assert "| 1, 2 | 0.8100 ± 0.0141 | – | 0.8500 |" in report
    assert "| 1, 2 | 0.7100 ± 0.0141 | -0.1000 |" in report
    assert "| 1 | 0.7900 | -0.0100 |" in report
    assert "fine-tuned: 0.0100 below every label (within 0.02)" in report
    assert "the head alone: 0.0300 below every label (**not within** 0.02)" in report
    assert "Without pretraining: 0.1000 below every label" in report


def test_labelled_share_must_be_a_share():
    with pytest.raises(ValueError, match="labelled_share"):
        LabelStudyConfig(labelled_share=1.0)
