"""`Trainer` callbacks of txformer."""

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .attention_performer import TxFormerPerformerAttention


class PerformerRedrawCallback(TrainerCallback):
    """Redraws the Performer projections due at each optimizer step, before its first forward pass.

    The draw is a function of `(performer_seed, layer_idx, global_step)`, so every process of a distributed run draws
    the same matrices without communication, and a resumed run continues with the matrices of an uninterrupted one.
    The interval, the training-only rule and the seed belong to the config (see `TxFormerPerformerAttention`).
    """

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ) -> None:
        """Calls `redraw_projection(state.global_step)` on every Performer attention layer of `model`."""
        if model is None:
            return
        # `modules()` also walks into wrappers (DDP, compiled modules), so the unwrapped layers are reached either way.
        for module in model.modules():
            if isinstance(module, TxFormerPerformerAttention):
                module.redraw_projection(state.global_step)
