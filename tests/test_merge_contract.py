"""Merging as PEFT's generic checks expect of every method: safe_merge's NaN error, warnings on merging twice."""

import warnings

import pytest
import torch
from peft import get_peft_model

from tenslora import TensLoraConfig, TensLoraLayer
from tiny import bert, gpt2, inputs, llama

CASES = {
    "bert-tucker": (bert, dict(construction="qkv_depth", factorization="tucker", ranks=4)),
    "llama-cp": (llama, dict(construction="att_qkv_depth", factorization="cp", ranks=6)),
    "gpt2-o": (gpt2, dict(construction="qkv_depth", ranks=4, roles=["q", "k", "v", "o"])),
}


def _model(case: str):
    build, options = CASES[case]
    torch.manual_seed(0)
    config = TensLoraConfig(**options, init_weights=False, task_type="SEQ_CLS")
    return get_peft_model(build(), config).eval(), build.__name__


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.get_base_model().named_parameters() if "base_layer" in name}


@pytest.mark.parametrize("case", CASES)
def test_safe_merge_refuses_nan_with_pefts_message_and_leaves_the_weights(case):
    model, name = _model(case)
    with torch.no_grad():
        for parameter in model.base_model.tenslora_tensors.parameters():
            parameter.view(-1)[0] = float("nan")
    before = _base_weights(model)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, TensLoraLayer))
    for key, weight in _base_weights(model).items():
        torch.testing.assert_close(weight, before[key], atol=0, rtol=0)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_and_unload(safe_merge=True)
    merged = model.merge_and_unload()  # without safe_merge the NaNs go through, as in PEFT
    assert torch.isnan(merged(**inputs(name)).logits).any()


@pytest.mark.parametrize("case", CASES)
def test_merging_a_merged_adapter_warns_and_changes_nothing(case):
    model, name = _model(case)
    batch = inputs(name)
    with torch.no_grad():
        adapted = model(**batch).logits
        model.merge_adapter()
        with pytest.warns(UserWarning, match="All adapters are already merged"):
            model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits, adapted, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        with pytest.warns(UserWarning, match="Already unmerged"):
            model.unmerge_adapter()
        torch.testing.assert_close(model(**batch).logits, adapted, atol=1e-5, rtol=1e-5)


def test_adapter_names_as_in_pefts_check_adapters_to_merge():
    def config(seed: int) -> TensLoraConfig:
        torch.manual_seed(seed)
        return TensLoraConfig(construction="qkv_depth", ranks=4, init_weights=False)

    model = get_peft_model(bert(), config(0), adapter_name="first").eval()
    model.add_adapter("second", config(1))
    batch = inputs("bert")
    with torch.no_grad():
        model.base_model.set_adapter(["first", "second"])
        both = model(**batch).logits
        model.merge_adapter(adapter_names=["first"])
        with pytest.warns(UserWarning, match="Already following adapters were merged first. You are now "
                                             "additionally merging second."):
            model.merge_adapter(adapter_names=["first", "second"])
        torch.testing.assert_close(model(**batch).logits, both, atol=1e-5, rtol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.unmerge_adapter()
    with pytest.raises(TypeError, match="adapter_names should be a list of strings"):
        model.merge_adapter(adapter_names="first")
