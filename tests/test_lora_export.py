"""Exact export to a plain PEFT LoRA adapter, loaded where tenslora is never imported; PEFT's own conversion."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import tenslora
from dense import expected_update, role_widths
from tenslora import TensLoraConfig, TensLoraLayer
from tenslora.app.cli import main
from tenslora.app.modeling import build_classifier, load_trained_model
from tenslora.app.runs import read_run
from tenslora.app.train import evaluate_run
from tenslora.files import new_folder
from test_all_linear import MODULES as ALL_LINEAR_MODULES
from test_train import tiny  # noqa: F401  (the session fixture of tiny models and data)
from tiny import bert, gpt2, inputs, llama

# name: (model builder, adapter options). Together: BERT with `o` (a transposed slice), LLaMA's grouped-query
# k/v (narrower slices), GPT-2's fused Conv1D `c_attn` with one role left out and with q, k, v sharing U_in,
# modules of different ranks (GPT-2's c_attn stacks three input factors, c_proj has one), Tucker and CP, the MLP
# projections (`down` transposed like `o`; LLaMA's d_ffn is not a multiple of anything), trained biases, and
# the block layout (a role's update made of several d-wide blocks, row blocks and column blocks).
CASES = {
    "bert-tucker-o": (bert, dict(construction="qkv_depth", factorization="tucker", roles=["q", "k", "v", "o"],
                                 ranks=3)),
    "bert-att-cp": (bert, dict(construction="att_qkv_depth", factorization="cp", roles=["q", "v", "o"], ranks=4)),
    "llama-gqa-cp": (llama, dict(construction="depth", factorization="cp", roles=["q", "k", "v", "o"], ranks=3)),
    "gpt2-qv-tucker": (gpt2, dict(construction="qkv", factorization="tucker", roles=["q", "v"], ranks=2)),
    "gpt2-depth-tucker": (gpt2, dict(construction="depth", factorization="tucker", roles=["q", "k", "v", "o"],
                                     ranks=2)),
    "llama-all-linear-tucker": (llama, dict(construction="qkv_depth", factorization="tucker", ranks=2,
                                           roles=["q", "k", "v", "o", "gate", "up", "down"])),
    "gpt2-mlp-cp": (gpt2, dict(construction="depth", factorization="cp", roles=["q", "v", "up", "down"], ranks=2)),
    "bert-bias-all": (bert, dict(construction="qkv", roles=["q", "v"], ranks=2, bias="all")),
    "gpt2-bias-adapted": (gpt2, dict(construction="qkv", roles=["q", "v", "o"], ranks=2, bias="tenslora_only")),
    # FacT's block layout: up/down cut into two d-wide blocks (d_ffn 37 on hidden 32: the second one padded).
    "bert-blocks-tucker": (bert, dict(construction="qkv_depth", roles="all-linear", layout="blocks", ranks=3)),
    "llama-blocks-tt": (llama, dict(construction="qkv_depth", factorization="tt", roles="all-linear",
                                    layout="blocks", ranks=2)),
    # Output ranks below r_in: exported at min(r_in, r_out); c_attn's three roles share U_in (min(4, 3 * 1) = 3).
    "bert-tucker-narrow-out": (bert, dict(construction="qkv_depth", roles=["q", "k", "v", "o"],
                                          ranks={"in": 4, "out": 2, "qkv": 4, "depth": 2})),
    "gpt2-qkv-narrow-out": (gpt2, dict(construction="qkv", roles=["q", "k", "v", "o"],
                                       ranks={"in": 4, "out": 1, "qkv": 4})),
}
WITHOUT_BIAS = [name for name, (_, options) in CASES.items() if "bias" not in options]


def _adapted(name: str) -> PeftModel:
    """A TensLoRA model whose update, head and trained biases are far from the base model's."""
    build, options = CASES[name]
    config = TensLoraConfig(task_type="SEQ_CLS", init_weights=False, scaling=3.0, **options)
    model = get_peft_model(build(), config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
                for parameter in module.modules_to_save["default"].parameters():
                    parameter.add_(0.1)
        for parameter_name, parameter in model.named_parameters():
            if parameter.requires_grad and parameter_name.endswith("bias") and "modules_to_save" not in parameter_name:
                parameter.add_(0.1)
    return model


_LOAD_WITHOUT_TENSLORA = """
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    for case in json.loads(sys.argv[1]):
        base = AutoModelForSequenceClassification.from_pretrained(case["base"]).eval()
        model = PeftModel.from_pretrained(base, case["lora"]).eval()
        with torch.no_grad():
            torch.save(model(**torch.load(case["inputs"])).logits, case["logits"])
    loaded = [name for name in sys.modules if name == "tenslora" or name.startswith("tenslora.")]
    assert not loaded, loaded
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict]:
    """Every case exported, then loaded in ONE fresh interpreter that never imports tenslora."""
    root = tmp_path_factory.mktemp("export")
    cases = {}
    for name, (build, _) in CASES.items():
        folder = root / name
        build().save_pretrained(folder / "base")  # the same seeded weights the adapter was built on
        model = _adapted(name)
        batch = inputs("bert")  # token ids (no padding), valid for every text model here
        torch.save(batch, folder / "inputs.pt")
        with torch.no_grad():
            expected = model(**batch).logits
            with model.disable_adapter():
                base_logits = model(**batch).logits
        tenslora.export_lora(model, folder / "lora")
        cases[name] = dict(model=model, expected=expected, base_logits=base_logits, folder=folder,
                           paths=dict(base=str(folder / "base"), lora=str(folder / "lora"),
                                      inputs=str(folder / "inputs.pt"), logits=str(folder / "logits.pt")))
    subprocess.run([sys.executable, "-c", textwrap.dedent(_LOAD_WITHOUT_TENSLORA),
                    json.dumps([case["paths"] for case in cases.values()])], check=True, cwd=root)
    return cases


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_without_tenslora_and_gives_the_same_outputs(exported, name):
    case = exported[name]
    got = torch.load(case["paths"]["logits"])
    assert (case["expected"] - case["base_logits"]).abs().max() > 1e-2  # the adapter and head matter
    torch.testing.assert_close(got, case["expected"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_exported_config_is_plain_lora(exported, name):
    case = exported[name]
    config = json.loads((case["folder"] / "lora" / "adapter_config.json").read_text())
    layers = {n: m for n, m in case["model"].base_model.model.named_modules() if isinstance(m, TensLoraLayer)}
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(layers)
    assert config["lora_alpha"] == config["r"] and config["modules_to_save"] and config["fan_in_fan_out"] == (
        name.startswith("gpt2"))
    assert config["bias"] == {"all": "all", "tenslora_only": "lora_only"}.get(CASES[name][1].get("bias"), "none")
    assert sorted(p.name for p in (case["folder"] / "lora").iterdir()) == ["adapter_config.json",
                                                                            "adapter_model.safetensors"]


def test_fused_module_stacks_distinct_input_factors(exported):
    """c_attn with q, k, v in their own tensors: rank 3 r_in; with q, v sharing U_in: r_in; c_proj (o): r_in."""
    depth = json.loads((exported["gpt2-depth-tucker"]["folder"] / "lora" / "adapter_config.json").read_text())
    assert depth["r"] == 6 and depth["alpha_pattern"] == depth["rank_pattern"]
    assert depth["rank_pattern"] == {f"transformer.h.{i}.attn.c_proj": 2 for i in range(2)}
    shared = json.loads((exported["gpt2-qv-tucker"]["folder"] / "lora" / "adapter_config.json").read_text())
    assert shared["r"] == 2 and shared["rank_pattern"] == {}


def _dense_updates(name: str, model: PeftModel) -> dict[str, torch.Tensor]:
    """scaling * Delta W of every adapted module (nn.Linear layout), by the tests' own dense reference (tensorly's
    full tensors, read by the tests' rules, blocks included); a fused module's roles in output order, zero where
    a role is not adapted."""
    family, options = name.split("-")[0], CASES[name][1]
    bank = model.base_model.tenslora_tensors["default"]
    roles, widths = bank.geometry.roles, role_widths(model.base_model.model.config)
    updates: dict[str, list[torch.Tensor]] = {}
    for layer in range(2):
        for role, module in ALL_LINEAR_MODULES[family].items():
            if role in roles:
                update = expected_update(bank, options["construction"], roles, role, layer, widths,
                                         layout=options.get("layout", "roles"))
            else:
                update = torch.zeros(widths[role], widths["o"])  # q, k, v of GPT-2's c_attn read the hidden size
            updates.setdefault(module.format(layer), []).append(update)
    adapted = {n for n, m in model.base_model.model.named_modules() if isinstance(m, TensLoraLayer)}
    return {module: 3.0 * torch.cat(parts) for module, parts in updates.items() if module in adapted}


@pytest.mark.parametrize("name", WITHOUT_BIAS)  # PEFT's conversion refuses adapters with trained biases
def test_exported_pair_and_peft_conversion_give_the_dense_update(exported, name):
    """The B A that export_lora wrote, and PEFT's convert_to_lora (an SVD of get_delta_weight), are the update of the
    tests' own dense reconstruction of the tensors."""
    model = exported[name]["model"]
    expected = _dense_updates(name, model)
    assert expected and min(update.abs().max() for update in expected.values()) > 1e-2
    written = load_file(exported[name]["folder"] / "lora" / "adapter_model.safetensors")
    rank = json.loads((exported[name]["folder"] / "lora" / "adapter_config.json").read_text())["r"]
    assert model.supports_lora_conversion()
    _, converted = peft.convert_to_lora(model, rank=rank)
    for module_name, update in expected.items():
        pair = written[f"base_model.model.{module_name}.lora_B.weight"] @ \
            written[f"base_model.model.{module_name}.lora_A.weight"]
        torch.testing.assert_close(pair, update, atol=1e-5, rtol=1e-4)
        peft_delta = converted[f"base_model.model.{module_name}.lora_B.weight"] @ \
            converted[f"base_model.model.{module_name}.lora_A.weight"]
        torch.testing.assert_close(peft_delta, update, atol=1e-5, rtol=1e-4)


def test_export_rank_is_the_smaller_of_the_input_and_output_ranks(exported):
    """r_in 4, r_out 2: rank 2. GPT-2's c_attn: q, k, v share U_in (4) and have r_out 1 each: rank 3; c_proj (o): 1."""
    narrow = json.loads((exported["bert-tucker-narrow-out"]["folder"] / "lora" / "adapter_config.json").read_text())
    assert narrow["r"] == 2 and narrow["rank_pattern"] == {}
    fused = json.loads((exported["gpt2-qkv-narrow-out"]["folder"] / "lora" / "adapter_config.json").read_text())
    assert fused["r"] == 3 and fused["rank_pattern"] == {f"transformer.h.{i}.attn.c_proj": 1 for i in range(2)}


def test_refusals(exported, tmp_path):
    model = exported["bert-tucker-o"]["model"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty folder"):
        tenslora.export_lora(model, tmp_path / "full")
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        tenslora.export_lora(model, tmp_path / "out", adapter_name="other")
    with pytest.raises(ValueError, match="PeftModel"):
        tenslora.export_lora(model.get_base_model(), tmp_path / "out")
    lora = get_peft_model(bert(), peft.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="not a TensLoRA one"):
        tenslora.export_lora(lora, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no staging folder left behind


_TRAIN = ["--task", "glue-mrpc", "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--lr", "1e-2",
          "--max-length", "32", "--no-bf16"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_export_lora_command(pooling, tiny, tmp_path):  # noqa: F811
    """`tenslora export-lora RUN OUT` writes an adapter that PEFT loads onto the run's base classifier."""
    run, out = tmp_path / "run", tmp_path / "lora"
    assert main(["train", *_TRAIN, "--data-dir", str(tiny / "mrpc"), "--output-dir", str(run), "--model",
                 str(tiny / "bert"), "--pooling", pooling, "--roles", "q,v,o"]) == 0
    assert main(["export-lora", str(run), str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    recorded = read_run(run)
    trained, tokenizer = load_trained_model(str(run), recorded)
    base = build_classifier(recorded["model"], recorded["labels"], "text", pooling)
    exported_model = PeftModel.from_pretrained(base, str(out)).eval()
    batch = tokenizer(["cat runs", "big red dog jumps"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported_model(**batch).logits, trained.eval()(**batch).logits,
                                   atol=1e-5, rtol=1e-5)
        lora_layers = dict(exported_model.named_modules())
        updates = {name: layer.get_delta_weight("default") for name, layer in trained.named_modules()
                   if isinstance(layer, TensLoraLayer)}
        assert len(updates) == 3 * 2 and max(update.abs().max() for update in updates.values()) > 1e-5
        for name, update in updates.items():  # the updates themselves, however little they move these logits
            torch.testing.assert_close(lora_layers[name].get_delta_weight("default"), update, atol=1e-6, rtol=1e-5)
    assert main(["export-lora", str(run), str(out)]) == 2  # never writes into a folder that holds files


def test_a_head_only_run_evaluates_and_merges_but_has_no_adapter_to_export(tiny, tmp_path, capsys):  # noqa: F811
    """The sentence-transformers checkpoint gives a mean-pooling head, whose class reads its config as given."""
    run = tmp_path / "run"
    assert main(["train", *_TRAIN, "--data-dir", str(tiny / "mrpc"), "--output-dir", str(run), "--model",
                 str(tiny / "bert"), "--head-only"]) == 0
    assert read_run(run)["pooling"] == "mean"
    test_accuracy = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
    assert evaluate_run(str(run))["test_accuracy"] == test_accuracy
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0 and (tmp_path / "merged" / "config.json").is_file()
    capsys.readouterr()
    assert main(["export-lora", str(run), str(tmp_path / "lora")]) == 2
    assert "no adapter to export" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()


def test_an_output_folder_gets_the_permissions_of_any_folder_its_user_creates(tmp_path):
    """merge, export-lora and compress write through ``new_folder``: a serving process of the user's group can read
    what they write, as it can read any folder the user makes (a private temporary folder renamed would not be)."""
    with new_folder(tmp_path / "out") as staging:
        (staging / "adapter_config.json").write_text("{}")
    (tmp_path / "made-by-hand").mkdir()
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "made-by-hand").stat().st_mode & 0o777
    assert sorted(path.name for path in tmp_path.iterdir()) == ["made-by-hand", "out"]
