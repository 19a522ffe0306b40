"""Exact attention backends that need a GPU: flash attention 2 (inference and training) and flex attention in training
(it has no backward on the CPU), each against SDPA with padding. Skipped without CUDA; `scripts/gpu_check.sh` runs
them as its `cuda_attention` step."""

import pytest
import torch
from conftest import random_batch, select_rows, tiny_config
from test_modeling import build, event_states, kinds_with, logits
from transformers.utils import is_flash_attn_2_available


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LENGTHS = [9, 5, 1]


def cuda_model_and_sdpa(attention_type: str, attn_implementation: str, dtype: torch.dtype):
    """A model on the GPU with `attn_implementation`, an SDPA one with the same weights, and a padded batch. Heads of
    32 dimensions (the kernels take multiples of 8, flex attention at least 16)."""
    config = tiny_config(attention_type, hidden_size=64)
    model = build(config, attn_implementation=attn_implementation).to("cuda", dtype)
    sdpa = build(config, attn_implementation="sdpa").to("cuda", dtype)
    sdpa.load_state_dict(model.state_dict())
    assert (model.config._attn_implementation, sdpa.config._attn_implementation) == (attn_implementation, "sdpa")
    batch = {key: value.cuda() for key, value in random_batch(config, LENGTHS).items()}
    return model, sdpa, batch


@pytest.mark.skipif(not is_flash_attn_2_available(), reason="needs the flash-attn package")
@pytest.mark.parametrize("attention_type", kinds_with("flash_attention_2"))
def test_flash_attention_2_gives_the_outputs_of_sdpa_and_is_padding_invariant(attention_type):
    flash, sdpa, batch = cuda_model_and_sdpa(attention_type, "flash_attention_2", torch.bfloat16)
    real_events = batch["attention_mask"].bool()
    flash_states, sdpa_states = (event_states(model, batch)[real_events].float() for model in (flash, sdpa))
    torch.testing.assert_close(flash_states, sdpa_states, rtol=2e-2, atol=2e-2)
    batched = logits(flash, batch).float()
    for row, length in enumerate(LENGTHS):
        alone = logits(flash, select_rows(batch, [row], length)).float()
        torch.testing.assert_close(alone, batched[row : row + 1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("attention_type", "attn_implementation", "dtype"),
    [
        *(
            pytest.param(
                kind,
                "flash_attention_2",
                torch.bfloat16,
                marks=pytest.mark.skipif(not is_flash_attn_2_available(), reason="needs the flash-attn package"),
            )
            for kind in kinds_with("flash_attention_2")
        ),
        *((kind, "flex_attention", torch.float32) for kind in kinds_with("flex_attention")),
    ],
)
def test_training_gives_the_loss_and_gradients_of_sdpa(attention_type, attn_implementation, dtype):
    model, sdpa, batch = cuda_model_and_sdpa(attention_type, attn_implementation, dtype)
    labels = torch.tensor([0, 1, 1], device="cuda")
    losses = []
    for trained in (model, sdpa):
        loss = trained.train()(**batch, labels=labels).loss
        loss.backward()
        losses.append(loss.detach().float())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(losses[0], losses[1], rtol=tolerance, atol=tolerance)
    for (name, parameter), reference in zip(model.named_parameters(), sdpa.parameters(), strict=True):
        if reference.grad is not None:
            torch.testing.assert_close(
                parameter.grad.float(), reference.grad.float(), rtol=tolerance, atol=tolerance, msg=name
            )
