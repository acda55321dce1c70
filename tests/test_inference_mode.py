"""A forward pass under ``torch.inference_mode()`` gives what ``torch.no_grad()`` gives (as PEFT LoRA does)."""

import pytest
import torch
from peft import get_peft_model

from tenslora import TensLoraConfig
from tiny import bert, gpt2, inputs, llama

CASES = [  # model, construction, roles: separate q/k/v, grouped-query attention, a fused c_attn; with and without o
    ("bert", "qkv_depth", ["q", "k", "v"]),
    ("bert", "att_qkv_depth", ["q", "k", "v", "o"]),
    ("llama", "qkv_depth", ["q", "k", "v", "o"]),
    ("llama", "att_depth", ["q", "k", "v"]),
    ("llama", "att_qkv_depth", "all-linear"),  # MLP roles too (gate, up, down transposed)
    ("gpt2", "qkv", ["q", "k", "v", "o"]),
    ("gpt2", "depth", ["q", "v"]),
]
BUILD = {"bert": bert, "llama": llama, "gpt2": gpt2}


def _adapted(model_name: str, construction: str, factorization: str, roles: list[str] | str):
    config = TensLoraConfig(construction=construction, factorization=factorization, ranks=3, roles=roles,
                            init_weights=False)  # random factors: the adapter changes the output
    return get_peft_model(BUILD[model_name](), config).eval()


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
@pytest.mark.parametrize(("model_name", "construction", "roles"), CASES)
def test_inference_mode_gives_the_no_grad_output(model_name, construction, factorization, roles):
    model = _adapted(model_name, construction, factorization, roles)
    batch = dict(inputs(model_name), output_hidden_states=True)
    with torch.no_grad():
        expected = model(**batch).hidden_states[-1]
        with model.disable_adapter():
            base = model(**batch).hidden_states[-1]
    with torch.inference_mode():
        got = model(**batch).hidden_states[-1]
        with model.disable_adapter():
            base_in_inference = model(**batch).hidden_states[-1]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(base_in_inference, base)
    assert (got - base).abs().max() > 1e-3, "the adapter does not change the output: the comparison proves little"


def test_training_after_inference_mode_gets_the_same_gradients():
    """Nothing computed under inference_mode (inference tensors) is reused by a later pass that trains."""
    def gradients(model) -> dict[str, torch.Tensor]:
        model(**inputs("bert"), labels=torch.tensor([0, 1])).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and "tensors" in n}

    fresh, used = (_adapted("bert", "att_qkv_depth", "tucker", ["q", "k", "v", "o"]) for _ in range(2))
    with torch.inference_mode():
        used(**inputs("bert"))
    expected, got = gradients(fresh), gradients(used)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_inference_mode_through_a_layer_called_on_its_own():
    """A projection called outside the model's forward (no pass hooks) also works on inference tensors."""
    model = _adapted("bert", "qkv_depth", "cp", ["q", "k", "v"])
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = query(x)
    with torch.inference_mode():
        inference_x = x.clone()
        got = [query(inference_x) for _ in range(2)]
    for output in got:
        torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
