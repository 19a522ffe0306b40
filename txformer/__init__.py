"""txformer: Hugging Face-native transformers over long event sequences (bank transactions)."""

import transformers
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForSequenceClassification, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_txformer import TxFormerConfig
from .modeling_txformer import (
    AUTO_CLASSES,
    TxFormerForContrastivePretraining,
    TxFormerForMaskedEventModeling,
    TxFormerForSequenceClassification,
    TxFormerModel,
    TxFormerPreTrainedModel,
    TxFormerState,
)
from .pipeline_txformer import PIPELINE_TASK, OnlineScorer, OnlineStates, TransactionClassificationPipeline
from .processing_txformer import TxFormerProcessor


__version__ = "0.2.0"

AutoConfig.register(TxFormerConfig.model_type, TxFormerConfig)
# save_pretrained then writes `auto_map` and copies the model files, so the folder loads with trust_remote_code.
TxFormerConfig.register_for_auto_class()
for auto_class_name, model_class in AUTO_CLASSES.items():
    getattr(transformers, auto_class_name).register(TxFormerConfig, model_class)
    model_class.register_for_auto_class(auto_class_name)
# The processor travels with the model: saved folders get `preprocessor_config.json` with its `auto_map`, and the
# processor's and the pipeline's code.
AutoFeatureExtractor.register(TxFormerConfig, TxFormerProcessor)
AutoProcessor.register(TxFormerConfig, TxFormerProcessor)
TxFormerProcessor.register_for_auto_class("AutoFeatureExtractor")
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK,
    pipeline_class=TransactionClassificationPipeline,
    pt_model=AutoModelForSequenceClassification,
    type="multimodal",
)

__all__ = [
    "OnlineScorer",
    "OnlineStates",
    "TransactionClassificationPipeline",
    "TxFormerConfig",
    "TxFormerForContrastivePretraining",
    "TxFormerForMaskedEventModeling",
    "TxFormerForSequenceClassification",
    "TxFormerModel",
    "TxFormerPreTrainedModel",
    "TxFormerProcessor",
    "TxFormerState",
]
