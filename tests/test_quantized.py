"""TensLoRA on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases: training, merging into dense layers (or requantizing,
opted in), exact unmerge."""

import contextlib
import warnings

import pytest
import torch
import transformers
from peft import get_peft_model, prepare_model_for_kbit_training
from torch import nn

import tiny
from tenslora import TensLoraConfig, TensLoraLayer, requantizing_merge
from tenslora.tuner.quantized import DequantizedLinear, dense_weight

bnb = pytest.importorskip("bitsandbytes")

QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    # Nested statistics and a storage dtype other than uint8 must survive requantization.
    "fp4-nested-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_quant_storage=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny LLaMA with hidden size 64: bitsandbytes' CPU inference layout for 4-bit weights (AVX512-BF16 CPUs)
    needs at least one 64-wide block per row and output sizes that are multiples of 32."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(tiny.DECODER, hidden_size=64, intermediate_size=128), num_labels=3)
    folder = tmp_path_factory.mktemp("llama64")
    transformers.LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder


def _quantized(folder, quantization: str) -> nn.Module:
    config = transformers.BitsAndBytesConfig(**QUANTIZATIONS[quantization])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=config,
                                                                            device_map="cpu")
    return prepare_model_for_kbit_training(model)  # with gradient checkpointing, as QLoRA recipes do


def _adapted(folder, quantization: str, **options):
    torch.manual_seed(0)
    config = TensLoraConfig(construction="qkv_depth", ranks=4, task_type="SEQ_CLS", **options)
    return get_peft_model(_quantized(folder, quantization), config)


def _projection(model) -> TensLoraLayer:
    return model.base_model.model.model.layers[0].self_attn.q_proj


def _settings(weight) -> tuple:
    """How the weight is quantized (not how bitsandbytes happens to lay it out for CPU inference right now)."""
    if isinstance(weight, bnb.nn.Params4bit):
        return type(weight), weight.quant_type, weight.blocksize, weight.compress_statistics, weight.quant_storage
    return type(weight), weight.dtype, weight.has_fp16_weights


ROLES = {"qkv": ["q", "k", "v"], "all-linear": "all-linear"}  # QLoRA recipes adapt every linear layer


@pytest.mark.parametrize("roles", ROLES)
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_trains_on_a_quantized_base(llama_folder, quantization, roles):
    model = _adapted(llama_folder, quantization, roles=ROLES[roles]).train()
    base = _projection(model).get_base_layer()
    assert isinstance(base, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and not base.weight.requires_grad
    batch = tiny.inputs("llama")
    before = model(**batch).logits.detach()
    optimizer = torch.optim.SGD(model.base_model.tenslora_tensors.parameters(), lr=0.5)
    for _ in range(2):  # the core starts at zero: the factors get gradients from the second step on
        optimizer.zero_grad()
        model(**batch, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
    grads = [p.grad for p in model.base_model.tenslora_tensors.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and all(g.abs().sum() > 0 for g in grads)
    assert not torch.allclose(model(**batch).logits, before)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():  # eval + no_grad: bitsandbytes repacks 4-bit weights for CPU inference where it can
        return model(**batch).logits


def _requantized(weight: torch.Tensor, like) -> torch.Tensor:
    """``weight`` quantized by bitsandbytes as the weight ``like`` is, and dequantized (fp32)."""
    if isinstance(like, bnb.nn.Params4bit):
        data, state = bnb.functional.quantize_4bit(weight, blocksize=like.blocksize, quant_type=like.quant_type,
                                                   compress_statistics=like.compress_statistics,
                                                   quant_storage=like.quant_storage)
        return bnb.functional.dequantize_4bit(data, state).float()
    data, scales, _ = bnb.functional.int8_vectorwise_quant(weight.half())
    return data.float() * scales.float()[:, None] / 127


def _realistic(model):
    """Scale each layer's update to ||delta W|| = 1e-3 ||W|| (Frobenius), as a trained one is on a real LLM: far
    below the quantization step of 4 bits, and of 8 bits."""
    for module in model.base_model.model.modules():
        if isinstance(module, TensLoraLayer):
            ratio = module.get_delta_weight("default").norm() / dense_weight(module.get_base_layer()).norm()
            module._scaling["default"] *= 1e-3 / ratio.item()
    return model


def _updates(model) -> dict:
    """For each adapted layer: (Q(W) as it computes with it, delta W, the quantized weight), all before merging."""
    return {name: (dense_weight(module.get_base_layer()), module.get_delta_weight("default").float(),
                   module.get_base_layer().weight)
            for name, module in model.base_model.model.named_modules() if isinstance(module, TensLoraLayer)}


@pytest.mark.parametrize("roles", ROLES)
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_merge_keeps_a_realistic_update_in_dense_layers(llama_folder, quantization, roles):
    # train mode: in eval mode bitsandbytes' CPU inference kernel for 4 bits rounds more than this update
    model = _realistic(_adapted(llama_folder, quantization, init_weights=False, roles=ROLES[roles])).train()
    batch = tiny.inputs("llama", batch=4)
    adapted = _logits(model, batch)
    with model.disable_adapter():
        base = _logits(model, batch)
    updates = _updates(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is rounded away, so there is nothing to warn about
        merged = model.merge_and_unload()
    modules = dict(merged.named_modules())
    for name, (weight, update, _) in updates.items():
        layer = modules[name]
        assert type(layer) is DequantizedLinear and layer.weight.dtype == torch.float32
        assert not layer.weight.requires_grad
        # measured: 2.5e-5 (requantizing: 1.07 for nf4, 1.06 for int8; fp16 would give 0.2, bf16 1.6)
        assert (layer.weight - weight - update).norm() / update.norm() < 1e-4
    if roles == "all-linear":  # every quantized layer was adapted: none is left
        assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, batch), adapted, atol=1e-6, rtol=1e-5)  # measured: 9e-8
    assert (adapted - base).abs().max() > 1e-4  # the update moved the outputs: the check above means something


@pytest.mark.parametrize("roles", ROLES)
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_requantizing_merge_is_opt_in_and_moves_the_output_to_the_adapted_one(llama_folder, quantization, roles):
    model = _adapted(llama_folder, quantization, init_weights=False, roles=ROLES[roles]).eval()
    batch = tiny.inputs("llama", batch=4)
    adapted = _logits(model, batch)
    with model.disable_adapter():
        base = _logits(model, batch)
    settings = _settings(_projection(model).get_base_layer().weight)
    updates = _updates(model)
    with pytest.warns(UserWarning, match=r"Requantizing the merge into \d+ bitsandbytes layer"):
        with requantizing_merge() as report:
            merged = model.merge_and_unload()
    assert report.layers == len(updates)
    modules = dict(merged.named_modules())
    for name, (weight, update, quantized_like) in updates.items():  # bitsandbytes' own rounding of W + dW, no other
        torch.testing.assert_close(dense_weight(modules[name]), _requantized(weight + update, quantized_like),
                                   atol=1e-7, rtol=0)
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) and _settings(layer.weight) == settings
    if roles == "all-linear":
        assert type(merged.model.layers[0].mlp.down_proj) is type(layer)
    if quantization != "int8":
        assert layer.weight.dtype == layer.weight.quant_storage
        assert layer.weight.quant_state.nested == layer.weight.compress_statistics
    error = (_logits(merged, batch) - adapted).norm() / (adapted - base).norm()
    # Measured: nf4 0.12, fp4 0.19, int8 0.006 (rounding of the merged weight to 4 or 8 bits).
    assert error < (0.05 if quantization == "int8" else 0.35), error


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_requantizing_merge_reports_a_realistic_update_rounded_away(llama_folder, quantization):
    model = _realistic(_adapted(llama_folder, quantization, init_weights=False)).eval()
    updates = _updates(model)
    with pytest.warns(UserWarning, match=r"/ \|\|dW\|\| = 1\.\d+, cosine"):
        with requantizing_merge() as report:
            model.merge_adapter()
    kept = torch.cat([(dense_weight(module.get_base_layer()) - updates[name][0]).flatten()
                      for name, module in model.base_model.model.named_modules() if isinstance(module, TensLoraLayer)])
    update = torch.cat([update.flatten() for _, update, _ in updates.values()])
    assert report.relative_error == pytest.approx(((kept - update).norm() / update.norm()).item(), rel=1e-4)
    assert report.cosine == pytest.approx(torch.nn.functional.cosine_similarity(kept, update, dim=0).item(), abs=1e-4)
    assert report.relative_error > 0.9 and report.cosine < 0.2  # measured: 1.07 / 1.06 and 0.04


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_merged_model_saves_and_reloads_with_its_dense_layers(llama_folder, tmp_path, quantization):
    """Dense (merged, and the head) and quantized layers side by side: the saved config names the dense ones, or
    from_pretrained would make them quantized layers without quantization state."""
    merged = _adapted(llama_folder, quantization, init_weights=False).merge_and_unload().train()
    batch = tiny.inputs("llama")
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, device_map="cpu").train()
    attention, quantized = reloaded.model.layers[0].self_attn, type(merged.model.layers[0].self_attn.o_proj)
    assert type(attention.q_proj) is nn.Linear and type(attention.o_proj) is quantized is not nn.Linear
    torch.testing.assert_close(_logits(reloaded, batch), _logits(merged, batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("requantize", [False, True], ids=["dense", "requantizing"])
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_unmerge_gives_the_quantized_weights_back_exactly(llama_folder, quantization, requantize):
    model = _adapted(llama_folder, quantization, init_weights=False).eval()
    batch = tiny.inputs("llama")
    adapted = _logits(model, batch)
    base = _projection(model).get_base_layer()
    original = dense_weight(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # merging and unmerging again and again must not drift
            with requantizing_merge() if requantize else contextlib.nullcontext():
                model.merge_adapter()
            assert not torch.equal(dense_weight(_projection(model).get_base_layer()), original)
            _logits(model, batch)
            model.unmerge_adapter()
            assert _projection(model).get_base_layer() is base and torch.equal(dense_weight(base), original)
    torch.testing.assert_close(_logits(model, batch), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_safe_merge_into_a_quantized_base_refuses_nan_and_keeps_it(llama_folder, quantization):
    model = _adapted(llama_folder, quantization, init_weights=False).eval()
    with torch.no_grad():
        for parameter in model.base_model.tenslora_tensors.parameters():
            parameter.view(-1)[0] = float("nan")
    weight = _projection(model).get_base_layer().weight
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    assert _projection(model).get_base_layer().weight is weight


def _plain_model_with_weight(weight: torch.Tensor):
    model = get_peft_model(tiny.llama(), TensLoraConfig(ranks=2, task_type="SEQ_CLS"))
    _projection(model).get_base_layer().weight = nn.Parameter(weight, requires_grad=False)
    return model


def test_merging_into_a_base_that_cannot_take_it_is_a_clear_error():
    int8 = _plain_model_with_weight(torch.zeros(32, 32, dtype=torch.int8))
    with pytest.raises(ValueError, match="Cannot merge .* dtype torch.int8.* unquantized copy"):
        int8.merge_and_unload()
    meta = _plain_model_with_weight(torch.empty(32, 32, device="meta"))
    with pytest.raises(ValueError, match="Cannot merge .* meta device"):
        meta.merge_adapter()


def test_an_8bit_weight_without_scales_is_a_clear_error(llama_folder):
    model = _adapted(llama_folder, "int8")
    base = _projection(model).get_base_layer()
    base.weight.SCB, base.state.SCB = None, None
    with pytest.raises(ValueError, match="Cannot merge .* Linear8bitLt .* no row scales"):
        model.merge_adapter()
