"""The chunked LM-head loss equals transformers' own causal-LM loss, value and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tasks.loss import chunked_causal_lm_loss


def _model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 23), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100  # a prompt
    labels[1, 15:] = -100  # and a padded tail
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("num_items", [None, 40])
def test_chunked_loss_equals_the_library_loss_and_gradients(chunk, num_items):
    ids, labels = _batch()
    ref_model, model = _model(), _model()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    ref = ref_model(input_ids=ids, labels=labels, **kwargs).loss  # transformers' ForCausalLMLoss
    ref.backward()

    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    assert out.logits.shape == (2, 1, 97)  # the full (B, T, V) logits are never built
    loss = chunked_causal_lm_loss(out.hidden_states[-1], model.get_output_embeddings(), labels, chunk, num_items)
    loss.backward()

    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    ref_grads, grads = _grads(ref_model), _grads(model)
    assert ref_grads.keys() == grads.keys() and "model.embed_tokens.weight" in grads  # tied head included
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_targets_follow_the_shift_and_skip_untrained_positions():
    """Position t predicts labels[t+1]; -100 targets never reach the head."""
    calls = []

    class Head(torch.nn.Module):
        def forward(self, h):
            calls.append(h.shape[0])
            return torch.stack([h[:, 0], -h[:, 0]], dim=-1)  # 2-token vocabulary, logit gap = 2 * h

    hidden = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])
    labels = torch.tensor([[-100, 0, -100, 1]])  # targets at positions 0 (-> 0) and 2 (-> 1)
    loss = chunked_causal_lm_loss(hidden, Head(), labels, chunk_tokens=8)
    expected = (torch.nn.functional.cross_entropy(torch.tensor([[0.0, 0.0], [2.0, -2.0]]), torch.tensor([0, 1])))
    torch.testing.assert_close(loss, expected)
    assert calls == [2]  # one chunk of the two positions with a target


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_causal_lm_loss(torch.zeros(1, 2, 3), torch.nn.Linear(3, 4), torch.zeros(1, 2, dtype=torch.long), 0)


def test_lora_model_head_and_gradients():
    """Through peft (as the worker's LoRA runs use it): same loss and adapter gradients."""
    from peft import LoraConfig, get_peft_model

    ids, labels = _batch()
    models = [get_peft_model(_model(), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")) for _ in range(2)]
    for m in models:  # lora_B starts at zero: give it values so the adapter changes the output
        torch.manual_seed(3)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    ref = models[0](input_ids=ids, labels=labels).loss
    ref.backward()
    out = models[1](input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    loss = chunked_causal_lm_loss(out.hidden_states[-1], models[1].get_output_embeddings(), labels, 7)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    ref_grads, grads = _grads(models[0]), _grads(models[1])
    assert ref_grads.keys() == grads.keys() and all("lora_" in n for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
