"""The forward pass: compiled (no graph break, eager's numbers) and the products it shares between
projections (x @ U_in, the B of a layer's roles) under checkpointing and autocast."""

import itertools
from collections import Counter

import pytest
import torch
import torch._dynamo as dynamo
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from peft import LoraConfig, get_peft_model
from torch import nn
from torch._functorch.aot_autograd import aot_module_simplified

from tenslora import CONSTRUCTIONS, TensLoraConfig
from tenslora.core.construction import Geometry
from tenslora.core.reuse import PassCache
from tenslora.core.tensors.cp import CPTensor
from tenslora.core.tensors.tucker import TuckerTensor
from tiny import bert, inputs, llama

CONFIGS = {  # model, adapter: separate q/k/v with o; grouped-query attention, CP, the head split
    "bert_tucker": (bert, TensLoraConfig(construction="qkv_depth", ranks=3, roles=["q", "k", "v", "o"],
                                         init_weights=False)),
    "llama_cp": (llama, TensLoraConfig(construction="att_qkv_depth", factorization="cp", ranks=3,
                                       roles=["q", "k", "v", "o"], init_weights=False)),
}
LABELS = torch.tensor([0, 1])


def _model(name: str) -> nn.Module:
    build, config = CONFIGS[name]
    return get_peft_model(build(), config)


def _loss_and_gradients(model: nn.Module, forward: nn.Module, name: str) -> tuple[torch.Tensor, dict]:
    model_name = "bert" if name.startswith("bert") else "llama"
    loss = forward(**inputs(model_name), labels=LABELS).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("adapter", ["tenslora", "peft_lora"])
def test_forward_pass_has_no_graph_break(adapter):
    """PEFT LoRA compiles a 2-layer BERT into one graph; so does TensLoRA (16 breaks before reuse.py)."""
    config = (CONFIGS["bert_tucker"][1] if adapter == "tenslora"
              else LoraConfig(r=3, target_modules=["query", "key", "value", "attention.output.dense"]))
    model = get_peft_model(bert(layers=2), config)
    dynamo.reset()
    explanation = dynamo.explain(model)(**inputs("bert"))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", CONFIGS)
def test_compiled_model_gives_eager_outputs_and_gradients(name):
    # ~4 s each: a real compilation (aot_eager, the cheapest backend that still traces the whole graph).
    eager, compiled = _model(name).train(), _model(name).train()
    for module in [*eager.modules(), *compiled.modules()]:
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # the same numbers: no random masks
    dynamo.reset()
    expected_loss, expected = _loss_and_gradients(eager, eager, name)
    loss, got = _loss_and_gradients(compiled, torch.compile(compiled, backend="aot_eager", fullgraph=True), name)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == expected.keys() and any("tenslora_tensors" in n for n in got)
    for parameter in expected:
        torch.testing.assert_close(got[parameter], expected[parameter], rtol=1e-5, atol=1e-5)


def test_compiled_graph_forms_shared_products_once_per_layer():
    """The compiler merges the q, k and v copies of x @ U_in (CSE): the reuse survives compilation."""
    forward_graphs: list[Counter] = []

    def counting_backend(graph_module, example_inputs):
        def forward_compiler(graph, _):
            forward_graphs.append(Counter(str(n.target) for n in graph.graph.nodes if n.op == "call_function"))
            return make_boxed_func(graph.forward)

        return aot_module_simplified(graph_module, example_inputs, fw_compiler=forward_compiler,
                                     bw_compiler=lambda graph, _: make_boxed_func(graph.forward),
                                     partition_fn=min_cut_rematerialization_partition)

    model = get_peft_model(bert(layers=2), TensLoraConfig(construction="qkv_depth", ranks=3, init_weights=False))
    dynamo.reset()
    torch.compile(model, backend=counting_backend, fullgraph=True)(**inputs("bert"), labels=LABELS).loss.backward()
    (graph,) = forward_graphs
    # Per layer: one x @ U_in and one (x U_in) @ B per role (the base linears are addmm, not mm).
    assert graph["aten.mm.default"] == 2 * (1 + 3)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_checkpointed_layers_get_the_gradients_of_plain_ones(name, reentrant):
    """A checkpointed layer's recomputation computes the products its first run computed (shared B, x U_in)."""
    def gradients(checkpointing: bool) -> dict:
        model = _model(name).train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.get_base_model().activation_checkpointing_enable({"use_reentrant": reentrant})
            model.enable_input_require_grads()
        return _loss_and_gradients(model, model, name)[1]

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any("tenslora_tensors" in n for n in plain)
    for parameter in plain:
        torch.testing.assert_close(checkpointed[parameter], plain[parameter], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_reuse_under_bf16_autocast_changes_no_number(name, monkeypatch):
    """Under autocast, the shared products give what each projection computing its own gives."""
    def bf16_step() -> tuple[torch.Tensor, dict]:
        model = _model(name).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss_and_gradients(model, model, name)

    torch.manual_seed(0)  # the same dropout masks in both runs
    loss, shared = bf16_step()
    monkeypatch.setattr(PassCache, "get", lambda self, key, sources, compute, consumer: compute())
    torch.manual_seed(0)
    expected_loss, own = bf16_step()
    assert torch.equal(loss, expected_loss) and shared.keys() == own.keys()
    for n in own:  # summing the three projections' gradients in another order: within bf16's rounding
        assert (shared[n] - own[n]).abs().max() <= 2 * 2**-8 * own[n].abs().max(), n


def _two_active_adapters() -> nn.Module:
    model = _model("bert_tucker")
    model.add_adapter("other", TensLoraConfig(construction="att_qkv", ranks=2, init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    return model


def _input_dropout() -> nn.Module:
    build, config = CONFIGS["bert_tucker"]
    return get_peft_model(build(), TensLoraConfig(**{**config.to_dict(), "dropout": 0.3}))


@pytest.mark.parametrize("build", [_two_active_adapters, _input_dropout])
def test_shared_products_change_no_number(build, monkeypatch):
    """Several active adapters, input dropout (each projection its own mask): as if nothing were shared."""
    def step() -> tuple[torch.Tensor, dict, set]:
        torch.manual_seed(0)
        model = build().train()
        trained = {n for n, p in model.named_parameters() if p.requires_grad and "tenslora_tensors" in n}
        return *_loss_and_gradients(model, model, "bert_tucker"), trained

    loss, shared, trained = step()
    monkeypatch.setattr(PassCache, "get", lambda self, key, sources, compute, consumer: compute())
    expected_loss, own, _ = step()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    assert shared.keys() == own.keys() and trained and trained <= own.keys()
    for name in own:
        torch.testing.assert_close(shared[name], own[name], rtol=1e-5, atol=1e-6)


GEOMETRY = Geometry(hidden_size=12, attention_width=8, num_layers=3, roles=("q", "k", "v"), num_heads=2)


@pytest.mark.parametrize(("construction", "factorization"),
                         [(c, f) for c in sorted(CONSTRUCTIONS) for f in ("tucker", "cp")])
def test_output_matrices_hold_the_output_matrix_of_every_slice(construction, factorization):
    """One contraction with free index modes gives, at each free index, that slice's own B."""
    sizes = GEOMETRY.mode_sizes(CONSTRUCTIONS[construction])
    tensor = (TuckerTensor(sizes, {m: min(3, n) for m, n in sizes.items()}) if factorization == "tucker"
              else CPTensor(sizes, 4))
    with torch.no_grad():
        for parameter in tensor.parameters():
            parameter.normal_()
    index_modes = tensor.index_modes
    for fixed_modes in itertools.chain.from_iterable(
            itertools.combinations(index_modes, n) for n in range(len(index_modes) + 1)):
        free = [m for m in index_modes if m not in fixed_modes]
        for fixed_values in itertools.product(*(range(sizes[m]) for m in fixed_modes)):
            fixed = dict(zip(fixed_modes, fixed_values, strict=True))
            group = tensor.output_matrices(fixed)
            assert group.shape == (*(sizes[m] for m in free), tensor.input_rank, tensor.output_size)
            for free_values in itertools.product(*(range(sizes[m]) for m in free)):
                index = {**fixed, **dict(zip(free, free_values, strict=True))}
                torch.testing.assert_close(group[free_values], tensor.output_matrix(index))
