"""txformer: Hugging Face-native transformers over long event sequences (bank transactions)."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_txformer import TxFormerConfig
from .modeling_txformer import (
    TxFormerForSequenceClassification,
    TxFormerModel,
    TxFormerPreTrainedModel,
    TxFormerState,
)


__version__ = "0.1.0"

AutoConfig.register(TxFormerConfig.model_type, TxFormerConfig)
AutoModel.register(TxFormerConfig, TxFormerModel)
AutoModelForSequenceClassification.register(TxFormerConfig, TxFormerForSequenceClassification)
# save_pretrained then writes `auto_map` and copies the model files, so the folder loads with trust_remote_code.
TxFormerConfig.register_for_auto_class()
TxFormerModel.register_for_auto_class("AutoModel")
TxFormerForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "TxFormerConfig",
    "TxFormerForSequenceClassification",
    "TxFormerModel",
    "TxFormerPreTrainedModel",
    "TxFormerState",
]
