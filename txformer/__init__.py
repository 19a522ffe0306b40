"""txformer: Hugging Face-native transformers over long event sequences (bank transactions)."""

import transformers
from transformers import AutoConfig

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


__version__ = "0.2.0"

AutoConfig.register(TxFormerConfig.model_type, TxFormerConfig)
# save_pretrained then writes `auto_map` and copies the model files, so the folder loads with trust_remote_code.
TxFormerConfig.register_for_auto_class()
for auto_class_name, model_class in AUTO_CLASSES.items():
    getattr(transformers, auto_class_name).register(TxFormerConfig, model_class)
    model_class.register_for_auto_class(auto_class_name)

__all__ = [
    "TxFormerConfig",
    "TxFormerForContrastivePretraining",
    "TxFormerForMaskedEventModeling",
    "TxFormerForSequenceClassification",
    "TxFormerModel",
    "TxFormerPreTrainedModel",
    "TxFormerState",
]
