"""`Trainer` callbacks of txformer."""

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .attention_full import TxFormerSelfAttention


class AttentionStepCallback(TrainerCallback):
    """Runs every attention layer's per-optimizer-step hook (`begin_optimizer_step`: the Performer redraws its
    projection) at the start of each optimizer step, before its first forward pass.

    A hook depends only on the config and the step (the Performer's draw is a function of `(performer_seed,
    layer_idx, global_step)`), so every process of a distributed run does the same without communication, and a
    resumed run continues as an uninterrupted one would.
    """

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ) -> None:
        """Calls `begin_optimizer_step(state.global_step)` on every attention layer of `model`."""
        if model is None:
            return
        # `modules()` also walks into wrappers (DDP, compiled modules), so the unwrapped layers are reached either way.
        for module in model.modules():
            if isinstance(module, TxFormerSelfAttention):
                module.begin_optimizer_step(state.global_step)
