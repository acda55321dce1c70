"""TRL's SFTTrainer takes a TensLoraConfig as its ``peft_config``, as it takes a LoraConfig."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

import tenslora
import tiny_llm


def _trainer(tmp_path, dataset: Dataset, config: tenslora.TensLoraConfig) -> SFTTrainer:
    arguments = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                          learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", max_length=16,
                          logging_steps=1, disable_tqdm=True, seed=0, bf16=False)  # fp32: reloads compare exactly
    return SFTTrainer(model=tiny_llm.llama_causal_lm(), args=arguments, train_dataset=dataset,
                      processing_class=tiny_llm.tokenizer(), peft_config=config)


@pytest.mark.parametrize("construction", ["qkv_depth", "lorta"])
def test_sft_trainer_trains_saves_and_reloads_a_tensor_adapter(tmp_path, construction):
    config = tenslora.TensLoraConfig(construction=construction, ranks=4, task_type="CAUSAL_LM")
    trainer = _trainer(tmp_path, Dataset.from_dict({"text": tiny_llm.sentences(12)}), config)
    model = trainer.model
    assert isinstance(model, PeftModel) and isinstance(model.base_model, tenslora.TensLoraModel)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("tenslora_tensors" in name for name in trainable)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer.train()
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed and changed <= trainable

    trainer.save_model(str(tmp_path / "adapter"))
    ids = tiny_llm.tokenizer()(tiny_llm.sentences(2, seed=5), return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(tiny_llm.llama_causal_lm(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_sft_trainer_on_prompt_completion_pairs(tmp_path):
    """TRL's default for prompt/completion data: the loss is on the completion only. Every example's prompt is
    masked from the labels, and the training moves the adapter and lowers the loss on the completions."""
    prompts = tiny_llm.sentences(12, seed=1, length=4)
    completions = [" " + text for text in tiny_llm.sentences(12, seed=2, length=4)]
    config = tenslora.TensLoraConfig(construction="qkv_depth", ranks=4, task_type="CAUSAL_LM")
    trainer = _trainer(tmp_path, Dataset.from_dict({"prompt": prompts, "completion": completions}), config)
    examples = list(trainer.train_dataset)
    assert len(examples) == 12
    for example in examples:  # 4 prompt words, then the completion (4 words and end-of-text) learnt as they are
        assert example["labels"] == [-100] * 4 + example["input_ids"][4:] and len(example["input_ids"]) == 9
    batch = trainer.data_collator(examples)
    model = trainer.model

    def completion_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    tensors = dict(model.base_model.tenslora_tensors.named_parameters())
    before = {name: tensor.detach().clone() for name, tensor in tensors.items()}
    loss_before = completion_loss()
    trainer.args.max_steps, trainer.args.learning_rate = 15, 5e-2  # 5 epochs: the completions' loss falls by 0.08
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 15 and all(torch.isfinite(torch.tensor(losses)))
    assert [name for name, tensor in tensors.items() if torch.equal(tensor, before[name])] == []
    assert completion_loss() < loss_before - 0.05


def test_sft_trainer_qlora_recipe_all_linear_on_a_4bit_base(tmp_path):
    """docs/llm.md's recipe: a 4-bit base, every linear layer adapted, SFTTrainer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training

    folder = tiny_llm.save_model_folder(tmp_path / "base", hidden_size=64, intermediate_size=128)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                              device_map="cpu")
    model = prepare_model_for_kbit_training(model)
    arguments = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4,
                          learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", max_length=16,
                          logging_steps=1, disable_tqdm=True, seed=0, bf16=False)
    config = tenslora.TensLoraConfig(construction="qkv_depth", ranks=4, roles="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=arguments, train_dataset=Dataset.from_dict({"text": tiny_llm.sentences(8)}),
                         processing_class=tiny_llm.tokenizer(), peft_config=config)
    adapted = {name.rsplit(".", 1)[-1] for name, module in trainer.model.named_modules()
               if isinstance(module, tenslora.TensLoraLayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    tensors = dict(trainer.model.base_model.tenslora_tensors.named_parameters())
    before = {name: tensor.detach().clone() for name, tensor in tensors.items()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    unmoved = [name for name, tensor in tensors.items() if torch.equal(tensor, before[name])]
    assert not unmoved, f"adapter tensors the 4-bit training left as they were: {unmoved}"
