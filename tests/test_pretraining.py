"""Self-supervised pretraining: the two losses, the CoLES slices, the masked-event head, `auto_map` for every class
(with and without the package), and the pretrain → fine-tune → embed chain on a tiny synthetic data set."""

import itertools
import json
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ATTENTION_TYPES, random_batch, run_without_txformer, tiny_config
from transformers import AutoModel

from txformer import (
    TxFormerConfig,
    TxFormerForContrastivePretraining,
    TxFormerForMaskedEventModeling,
    TxFormerForSequenceClassification,
)
from txformer.data import EventVocabulary, generate_synthetic_data
from txformer.embedding import main as embed_main
from txformer.modeling_txformer import AUTO_CLASSES, info_nce_loss, margin_contrastive_loss
from txformer.pretraining import ContrastiveSliceCollator
from txformer.pretraining import main as pretrain_main


# Losses on hand-made embeddings.


def unit_vectors(num: int, dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(num, dim, generator=generator, dtype=torch.float64), dim=-1)


def loop_margin_loss(embeddings: torch.Tensor, groups: list[int], margin: float, num_negatives: int) -> float:
    """The CoLES loss written pair by pair."""
    distance = lambda i, j: float(torch.linalg.norm(embeddings[i] - embeddings[j]))  # noqa: E731
    losses = [distance(i, j) ** 2 for i, j in itertools.combinations(range(len(groups)), 2) if groups[i] == groups[j]]
    for anchor in range(len(groups)):
        negatives = sorted(distance(anchor, other) for other in range(len(groups)) if groups[other] != groups[anchor])
        losses += [max(margin - value, 0.0) ** 2 for value in negatives[:num_negatives]]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("num_negatives", [1, 2, 100])
def test_margin_loss_matches_a_pair_by_pair_loop(num_negatives):
    embeddings = unit_vectors(9, 3)
    groups = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    loss = margin_contrastive_loss(embeddings, torch.tensor(groups), margin=1.2, num_negatives=num_negatives)
    # pairwise_distance adds 1e-6 to each difference, as pytorch-lifestream's loss does.
    assert loss.item() == pytest.approx(loop_margin_loss(embeddings, groups, 1.2, num_negatives), abs=1e-5)


def test_margin_loss_is_zero_for_separated_customers_and_not_when_they_mix():
    axes = torch.eye(3, dtype=torch.float64)
    separated = axes[[0, 0, 1, 1, 2, 2]]  # slices of one customer coincide; customers are √2 apart (margin 0.5)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert margin_contrastive_loss(separated, groups, margin=0.5, num_negatives=5).item() == pytest.approx(0, abs=1e-9)
    mixed = axes[[0, 1, 1, 2, 2, 0]]
    assert margin_contrastive_loss(mixed, groups, margin=0.5, num_negatives=5).item() > 0.1


def test_info_nce_matches_a_loop_over_anchors_and_positives():
    embeddings = unit_vectors(7, 4, seed=1)
    groups = [0, 0, 1, 1, 1, 2, 3]  # customers 2 and 3 have one slice: negatives only
    temperature = 0.3
    similarity = (embeddings @ embeddings.T / temperature).tolist()
    anchor_losses = []
    for anchor in range(7):
        positives = [other for other in range(7) if other != anchor and groups[other] == groups[anchor]]
        if not positives:
            continue
        normaliser = np.log(sum(np.exp(similarity[anchor][other]) for other in range(7) if other != anchor))
        anchor_losses.append(np.mean([normaliser - similarity[anchor][other] for other in positives]))
    loss = info_nce_loss(embeddings, torch.tensor(groups), temperature)
    assert loss.item() == pytest.approx(np.mean(anchor_losses), rel=1e-9)


@pytest.mark.parametrize("loss", [margin_contrastive_loss, info_nce_loss])
def test_a_batch_without_two_slices_of_one_customer_is_refused(loss):
    with pytest.raises(ValueError, match="no positive pair"):
        loss(unit_vectors(3, 4), torch.tensor([0, 1, 2]), 0.5, *([5] if loss is margin_contrastive_loss else []))


def test_pretraining_settings_are_validated():
    with pytest.raises(ValueError, match="contrastive_loss"):
        TxFormerConfig(contrastive_loss="triplet")
    with pytest.raises(ValueError, match="mask_probability"):
        TxFormerConfig(mask_probability=1.0)
    with pytest.raises(ValueError, match="masked_prediction_fields"):
        TxFormerConfig(masked_prediction_fields=["merchant"])
    with pytest.raises(ValueError, match="strictly increasing"):
        TxFormerConfig(amount_bucket_boundaries=[0.0, 10.0, 5.0])
    assert TxFormerConfig().masked_prediction_fields == ["mcc_code", "tr_type"]


# CoLES slices.

FIELDS = {"categorical_fields": ["mcc_code", "tr_type"], "numeric_fields": ["amount"]}


def customer(customer_id: int, num_events: int) -> dict:
    """An encoded history whose amounts name the customer and the event: customer_id * 1000 + event index."""
    return {
        "customer_id": customer_id,
        "event_time": list(np.arange(num_events) * 0.5),
        "mcc_code": list(np.arange(num_events) % 7 + 2),
        "tr_type": [3] * num_events,
        "amount": list(customer_id * 1000.0 + np.arange(num_events)),
    }


def test_slices_come_from_their_customer_contiguously_and_within_the_lengths():
    torch.manual_seed(0)
    collator = ContrastiveSliceCollator(**FIELDS, split_count=4, min_length=5, max_length=12, event_dropout=0.0)
    features = [customer(7, 40), customer(8, 6), customer(9, 12)]
    batch = collator(features)
    assert batch["slice_labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape[0] == 12
    for row, label in enumerate(batch["slice_labels"].tolist()):
        num_events = len(features[label]["event_time"])
        assert 5 <= lengths[row] <= min(12, num_events)
        amounts = batch["numeric_values"][row, : lengths[row], 0].long()
        assert (amounts // 1000 == features[label]["customer_id"]).all()
        events = amounts % 1000
        assert (events.diff() == 1).all() and events[-1] < num_events
    # Lengths and starts vary (uniform draws), rather than always the same window.
    assert len(set(lengths[:4].tolist())) > 1


def test_event_dropout_keeps_each_slice_an_ordered_subsequence_of_its_customer():
    torch.manual_seed(1)
    collator = ContrastiveSliceCollator(**FIELDS, split_count=3, min_length=5, max_length=30, event_dropout=0.3)
    batch = collator([customer(3, 60), customer(4, 60)])
    gaps = []
    for row, label in enumerate(batch["slice_labels"].tolist()):
        amounts = batch["numeric_values"][row, : batch["attention_mask"][row].sum(), 0].long()
        assert (amounts // 1000 == [3, 4][label]).all()
        gaps.append((amounts % 1000).diff())
    gaps = torch.cat(gaps)
    assert (gaps >= 1).all() and (gaps > 1).any()


def test_a_history_shorter_than_the_shortest_slice_is_an_error_naming_the_customer():
    collator = ContrastiveSliceCollator(**FIELDS, min_length=5, max_length=10)
    with pytest.raises(ValueError, match="Customer 12 has 4 events"):
        collator([customer(11, 20), customer(12, 4)])


# Masked event modelling.


def build_masked(config: TxFormerConfig) -> TxFormerForMaskedEventModeling:
    torch.manual_seed(0)
    return TxFormerForMaskedEventModeling(config).eval()


def test_random_masks_fall_on_real_events_only():
    config = tiny_config(mask_probability=0.5)
    batch = random_batch(config, [9, 3, 6])
    torch.manual_seed(0)
    masked = build_masked(config)(**batch).masked_events
    real = batch["attention_mask"].bool()
    assert not (masked & ~real).any()
    assert 0.3 < masked.sum() / real.sum() < 0.7


def test_padding_never_changes_the_masked_loss(attention_type):
    config = tiny_config(attention_type)
    model = build_masked(config)
    batch = random_batch(config, [9, 6])
    masked_events = torch.zeros(2, 9, dtype=torch.bool)
    masked_events[0, [1, 4, 8]] = True
    masked_events[1, [0, 5]] = True
    loss = model(**batch, masked_events=masked_events).loss
    padded = {
        key: torch.nn.functional.pad(value, (0, 0, 0, 5) if value.dim() == 3 else (0, 5))
        for key, value in batch.items()
    }
    # Masks set on padding are ignored.
    padded_masks = torch.nn.functional.pad(masked_events, (0, 5), value=True)
    torch.testing.assert_close(model(**padded, masked_events=padded_masks).loss, loss)


def test_masked_fields_reach_neither_the_predictions_nor_anything_else():
    config = tiny_config()
    model = build_masked(config)
    batch = random_batch(config, [8, 8])
    masked_events = torch.zeros(2, 8, dtype=torch.bool)
    masked_events[:, 3] = True
    outputs = model(**batch, masked_events=masked_events)
    changed = {**batch, "input_ids": batch["input_ids"].clone(), "numeric_values": batch["numeric_values"].clone()}
    changed["input_ids"][:, 3] = 1
    changed["numeric_values"][:, 3] = 123456.0
    changed_outputs = model(**changed, masked_events=masked_events)
    for logits, changed_logits in zip(outputs.field_logits, changed_outputs.field_logits, strict=True):
        torch.testing.assert_close(logits, changed_logits)
    torch.testing.assert_close(outputs.amount_logits, changed_outputs.amount_logits)
    # Unmasked, the same change is visible.
    unmasked = torch.zeros_like(masked_events)
    changed_logits = model(**changed, masked_events=unmasked).amount_logits
    assert not torch.allclose(changed_logits, model(**batch, masked_events=unmasked).amount_logits)


def test_masked_loss_is_the_sum_of_the_cross_entropies_on_masked_events():
    config = tiny_config(amount_bucket_boundaries=[-100.0, 0.0, 100.0])
    model = build_masked(config)
    batch = random_batch(config, [7, 5])
    masked_events = torch.zeros(2, 7, dtype=torch.bool)
    masked_events[0, [0, 6]] = True
    masked_events[1, 2] = True
    outputs = model(**batch, masked_events=masked_events)
    amounts = batch["numeric_values"][..., 0][masked_events]
    buckets = (amounts > -100).long() + (amounts > 0).long() + (amounts > 100).long()
    expected = sum(
        torch.nn.functional.cross_entropy(logits[masked_events], batch["input_ids"][..., field][masked_events])
        for logits, field in zip(outputs.field_logits, [0, 1], strict=True)
    ) + torch.nn.functional.cross_entropy(outputs.amount_logits[masked_events], buckets)
    torch.testing.assert_close(outputs.loss, expected)


# Both heads, every attention kind.


def test_both_heads_train_on_every_attention_kind(attention_type):
    config = tiny_config(attention_type)
    batch = random_batch(config, [9, 4, 7, 6, 5, 8])
    torch.manual_seed(0)
    contrastive = TxFormerForContrastivePretraining(config).train()
    outputs = contrastive(**batch, slice_labels=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert outputs.embeddings.shape == (6, config.hidden_size)
    torch.testing.assert_close(outputs.embeddings.norm(dim=-1), torch.ones(6))
    outputs.loss.backward()
    masked = TxFormerForMaskedEventModeling(config).train()
    masked_outputs = masked(**batch)
    masked_outputs.loss.backward()
    for model, loss in ((contrastive, outputs.loss), (masked, masked_outputs.loss)):
        assert torch.isfinite(loss) and loss > 0
        gradient = model.txformer.embeddings.categorical_embeddings[0].weight.grad
        assert gradient is not None and gradient.abs().sum() > 0


# auto_map: any folder loads as the encoder and as every head, without the package.

REMOTE_AUTO_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import transformers
    results = {}
    for folder in json.loads(sys.argv[1]):
        batch = {key: torch.tensor(value) for key, value in json.load(open(folder + "/batch.json")).items()}
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
        types, outputs = {"AutoConfig": type(config).__name__}, {}
        for name in json.loads(sys.argv[2]):
            model = getattr(transformers, name).from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            types[name] = type(model).__name__
            if name == "AutoModel":
                encoded = model(**batch)
                outputs["pooled"] = encoded.pooler_output.tolist()
                outputs["events"] = encoded.last_hidden_state.tolist()
            elif model.config.architectures == [type(model).__name__]:
                result = model(**batch, **({"masked_events": batch["attention_mask"].bool()} if "Masked" in types[name] else {}))
                outputs["head"] = (result.logits if hasattr(result, "logits") else result.embeddings).tolist()
        results[folder] = {"types": types, **outputs}
    print(json.dumps(results))
    """
)


def test_every_folder_loads_as_the_encoder_and_every_head_without_the_package(tmp_path):
    folders, expected = [], {}
    for attention_type in ATTENTION_TYPES:
        config = tiny_config(attention_type)
        batch = random_batch(config, [8, 5])
        for head_class in (TxFormerForSequenceClassification, TxFormerForContrastivePretraining):
            torch.manual_seed(0)
            model = head_class(config).eval()
            folder = tmp_path / f"{attention_type}-{head_class.__name__}"
            model.save_pretrained(folder)
            (folder / "batch.json").write_text(json.dumps({key: value.tolist() for key, value in batch.items()}))
            encoded = model.txformer(**batch)
            head = model(**batch)
            head = head.logits if head_class is TxFormerForSequenceClassification else head.embeddings
            expected[str(folder)] = (encoded, head)
            folders.append(str(folder))
            # With the package installed, AutoModel also takes this folder's encoder weights.
            torch.testing.assert_close(
                AutoModel.from_pretrained(folder).eval()(**batch).pooler_output, encoded.pooler_output
            )
            auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
            assert set(auto_map) == {"AutoConfig", *AUTO_CLASSES}

    results = json.loads(
        run_without_txformer(REMOTE_AUTO_SCRIPT, [json.dumps(folders), json.dumps(list(AUTO_CLASSES))], tmp_path)
    )
    for folder, (encoded, head) in expected.items():
        result = results[folder]
        assert result["types"] == {
            "AutoConfig": "TxFormerConfig",
            **{name: model_class.__name__ for name, model_class in AUTO_CLASSES.items()},
        }
        torch.testing.assert_close(torch.tensor(result["pooled"]), encoded.pooler_output, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(result["events"]), encoded.last_hidden_state, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(result["head"]), head, rtol=1e-5, atol=1e-6)


# Pretrain → fine-tune → embed on a tiny synthetic data set.


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic_data(tmp_path_factory.mktemp("synthetic"), num_customers=200, seed=0)


TINY_MODEL = "hidden_size=16,num_attention_heads=2,intermediate_size=32,num_hidden_layers=1"


def run_pretraining(synthetic, output_dir, *extra: str) -> dict:
    return pretrain_main(
        ["--transactions", str(synthetic.transactions_path), "--output_dir", str(output_dir)]
        + ["--config_overrides", TINY_MODEL, "--max_steps", "2", "--per_device_train_batch_size", "8"]
        + ["--save_strategy", "no", "--report_to", "none", "--use_cpu", "--logging_steps", "1", *extra]
    )


@pytest.fixture(scope="module")
def pretrained_folder(synthetic, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pretrained")
    run_pretraining(synthetic, output_dir)
    return output_dir


def test_pretraining_writes_a_folder_that_the_classifier_loads_with_only_its_head_new(pretrained_folder):
    assert {"model.safetensors", "preprocessor_config.json"} <= {path.name for path in pretrained_folder.iterdir()}
    processor = json.loads((pretrained_folder / "preprocessor_config.json").read_text())
    assert processor["max_length"] == 256 and processor["label_prior"] is None
    vocabulary = EventVocabulary.from_pretrained(pretrained_folder)
    model, loading_info = TxFormerForSequenceClassification.from_pretrained(
        pretrained_folder, output_loading_info=True
    )
    assert set(loading_info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert set(loading_info["mismatched_keys"]) == set()
    assert model.config.categorical_vocab_sizes == vocabulary.vocab_sizes
    run = json.loads((pretrained_folder / "training_run.json").read_text())
    assert [entry["step"] for entry in run["loss_history"]] == [1, 2]


def test_masked_pretraining_runs_under_the_trainer(synthetic, tmp_path):
    metrics = run_pretraining(synthetic, tmp_path, "--objective", "masked", "--max_length", "32")
    assert np.isfinite(metrics["train_loss"])
    model = TxFormerForMaskedEventModeling.from_pretrained(tmp_path)
    assert model.config.architectures == ["TxFormerForMaskedEventModeling"]


def test_pretraining_refuses_labels_and_streaming(synthetic, tmp_path):
    with pytest.raises(ValueError, match="no labels"):
        run_pretraining(synthetic, tmp_path, "--labels", str(synthetic.train_labels_path))
    with pytest.raises(ValueError, match="--streaming is for scripts/train.py"):
        run_pretraining(synthetic, tmp_path, "--streaming")


@pytest.mark.parametrize("embedding", ["pooled", "contrastive"])
def test_embed_writes_one_row_per_customer(pretrained_folder, synthetic, tmp_path, embedding):
    output_file = tmp_path / "embeddings.parquet"
    embed_main(
        ["--model_dir", str(pretrained_folder), "--transactions", str(synthetic.transactions_path)]
        + ["--output_file", str(output_file), "--embedding", embedding, "--batch_size", "64"]
    )
    table = pq.read_table(output_file)
    assert table.column_names == ["customer_id", *[f"emb_{index}" for index in range(16)]]
    assert table.num_rows == synthetic.num_customers
    assert len(set(table.column("customer_id").to_pylist())) == synthetic.num_customers
    vectors = np.stack([table.column(f"emb_{index}").to_numpy() for index in range(16)], axis=1)
    assert np.isfinite(vectors).all() and vectors.std(axis=0).min() > 0
    if embedding == "contrastive":
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_embed_refuses_contrastive_embeddings_of_a_folder_without_them(tmp_path, synthetic, pretrained_folder):
    classifier = TxFormerForSequenceClassification.from_pretrained(pretrained_folder)
    classifier.save_pretrained(tmp_path / "classifier")
    for name in ("preprocessor_config.json",):
        (tmp_path / "classifier" / name).write_bytes((pretrained_folder / name).read_bytes())
    with pytest.raises(ValueError, match="Use --embedding pooled"):
        embed_main(
            ["--model_dir", str(tmp_path / "classifier"), "--transactions", str(synthetic.transactions_path)]
            + ["--embedding", "contrastive", "--output_file", str(tmp_path / "e.parquet")]
        )
