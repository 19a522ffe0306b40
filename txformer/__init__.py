"""txformer: Hugging Face-native transformers over long event sequences (bank transactions)."""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForSequenceClassification, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_txformer import TxFormerConfig
from .modeling_txformer import (
    TxFormerForSequenceClassification,
    TxFormerModel,
    TxFormerPreTrainedModel,
    TxFormerState,
)
from .pipeline_txformer import PIPELINE_TASK, OnlineScorer, OnlineStates, TransactionClassificationPipeline
from .processing_txformer import TxFormerProcessor


__version__ = "0.1.0"

AutoConfig.register(TxFormerConfig.model_type, TxFormerConfig)
AutoModel.register(TxFormerConfig, TxFormerModel)
AutoModelForSequenceClassification.register(TxFormerConfig, TxFormerForSequenceClassification)
# save_pretrained then writes `auto_map` and copies the model files, so the folder loads with trust_remote_code.
TxFormerConfig.register_for_auto_class()
TxFormerModel.register_for_auto_class("AutoModel")
TxFormerForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
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
    "TxFormerProcessor",
    "TxFormerConfig",
    "TxFormerForSequenceClassification",
    "TxFormerModel",
    "TxFormerPreTrainedModel",
    "TxFormerState",
]
