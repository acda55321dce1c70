"""``run_training(options) -> metrics``: one fine-tuning run with ``transformers.Trainer``.

The Trainer brings the loop, checkpoints (every epoch), resuming, gradient accumulation, the
progress bar, logging and multi-process launch (``torchrun``/``accelerate launch``); this module
only builds what it trains and records what it measured. Files of our own are written by the
main process only, which holds the run folder's lock, and only once the options, the folder and
the data are known to be good: a refused command leaves the folder as it was.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from peft import get_peft_model
from torch import nn
from transformers import (
    DataCollatorWithPadding,
    PretrainedConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ..data import CAUSAL_LM_TASK, CausalLmCollator
from ..data.causal_lm import is_paired
from ..files import write_json
from ..tuner.budgets import count_parameters, resolved_ranks
from . import inputs
from .generation import exact_match
from .modeling import (
    build_causal_lm,
    build_classifier,
    default_model,
    load_model_config,
    load_preprocessor,
    load_trained_model,
    resolve_pooling,
)
from .options import DATA_SOURCE_KEYS, TrainOptions, adapter_config, default_threads, options_from_mapping
from .runs import (
    HISTORY_FILE,
    METRICS_FILE,
    RUN_FILE,
    HistoryCallback,
    check_not_busy,
    check_run_dir,
    check_same_labels,
    disk_errors,
    history_rows,
    last_checkpoint,
    read_json,
    read_run,
    resumable_checkpoint,
    run_lock,
)

HEAD_NAMES = ("classifier", "score")  # what transformers calls the head (and PEFT trains for SEQ_CLS)
#: By modality: PEFT's task type of the adapted model, and the new modules trained (and saved) beside the adapter.
ADAPTED: dict[str, tuple[str | None, list[str] | None]] = {
    "text": ("SEQ_CLS", None),  # PEFT knows the SEQ_CLS heads itself
    "image": (None, ["classifier"]),
    CAUSAL_LM_TASK: ("CAUSAL_LM", None),  # no new module: the model's own LM head stays frozen
}


@dataclass
class Prepared:
    """A model ready to train, with its data."""

    model: nn.Module
    preprocessor: Any
    data: inputs.TaskData
    run: dict[str, Any]  # the content of run.json


def default_output_dir(options: TrainOptions) -> str:
    """``runs/<task>-<method>-seed<seed>``: the same for every process of a distributed launch."""
    return os.path.join("runs", f"{options.task_name}-{options.method}-seed{options.seed}")


def has_accelerator() -> bool:
    """A GPU or another accelerator torch can train on (else the Trainer must be told ``use_cpu``)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator else torch.cuda.is_available()


def process_state() -> PartialState:
    """The processes of this launch (``torchrun``, ``accelerate launch``), as the Trainer will see them.

    Without ``cpu=True`` (which the Trainer passes only later), ``PartialState()`` sets up no process
    group on a machine without accelerator: every process would take itself for the main one.
    """
    return PartialState(cpu=not has_accelerator())


def end_process_group() -> None:
    """Tear down the process group of a multi-process launch (``torchrun``, ``accelerate launch``) once the run is
    done. Left to interpreter shutdown, gloo's threads can abort a process that has finished its work ("terminate
    called without an active exception"), failing the whole launch."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def use_bf16(option: bool | None) -> bool:
    """The ``bf16`` option, by default on where the hardware computes bfloat16 natively (1.6x faster on CPU)."""
    if option is not None:
        return option
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if has_accelerator():
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def freeze_all_but_head(model: nn.Module) -> None:
    """The head-only baseline: the pretrained model frozen, the classification head trained."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.split(".")[0] in HEAD_NAMES


def trainable_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def prepare(options: TrainOptions) -> Prepared:
    """Data, pre-processing and the model (with its adapter, or frozen for ``head_only``)."""
    with process_state().main_process_first():  # one process fills the datasets cache, the others read it
        data = inputs.load(options)
    model_name = options.model or default_model(data.modality)
    if data.modality == CAUSAL_LM_TASK:  # before its tokenizer, which an encoder's fails for want of end-of-text
        check_decoder(load_model_config(model_name, options.trust_remote_code), model_name)
    # first: it names a model that cannot be loaded
    preprocessor = load_preprocessor(model_name, data.modality, options.trust_remote_code)
    set_seed(options.seed)  # the head's and the adapter's initialization
    model, pooling = base_model(options, model_name, data, preprocessor)
    options.check_model_limits(model.config, preprocessor)  # max_length within the model's positions
    run = {"options": options.identity(), "model": model_name, "modality": data.modality, "pooling": pooling,
           "labels": list(data.labels)}
    if options.quantization:
        run["quantization"] = options.quantization  # how eval, merge and export-lora load the base again
    if options.head_only:
        freeze_all_but_head(model)
    else:
        task_type, modules_to_save = ADAPTED[data.modality]
        config = adapter_config(options, model.config, task_type, modules_to_save=modules_to_save)
        run["adapter_parameters"] = count_parameters(config, model.config)
        run["adapter"] = {"construction": config.construction, "factorization": config.factorization,
                          "ranks": resolved_ranks(config, model.config)}
        model = get_peft_model(model, config)
    run["trainable_parameters"] = trainable_parameters(model)
    with process_state().main_process_first():
        data = inputs.encode(data, preprocessor, options)
    return Prepared(model, preprocessor, data, run)


def base_model(options: TrainOptions, model_name: str, data: inputs.TaskData, preprocessor: Any,
               ) -> tuple[nn.Module, str | None]:
    """The model the adapter goes on, and its pooling: a causal LM with its own head (maybe quantized, computing
    in bfloat16 where the run trains in it), or a classifier with a new head over the data's classes."""
    if data.modality == CAUSAL_LM_TASK:
        compute_dtype = torch.bfloat16 if use_bf16(options.bf16) else torch.float32
        return build_causal_lm(model_name, options.quantization, compute_dtype, process_state().device,
                               options.trust_remote_code), None
    pooling = resolve_pooling(model_name, options.pooling) if data.modality == "text" else None
    return build_classifier(model_name, data.labels, data.modality, pooling,
                            pad_token_id=getattr(preprocessor, "pad_token_id", None),
                            trust_remote_code=options.trust_remote_code), pooling


def check_decoder(config: PretrainedConfig, model_name: str) -> None:
    """Refuse an encoder-only model (BERT, RoBERTa...) as a causal LM: transformers loads some of them with an LM
    head, but their attention sees the whole text, so "predicting" the next token is copying it. An encoder
    configured as a decoder (``is_decoder``, XLM's ``causal``) or the decoder of an encoder-decoder is one."""
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not (
        config.is_decoder or config.is_encoder_decoder or getattr(config, "causal", False))
    if encoder:
        raise ValueError(f"--model '{model_name}' is an encoder-only model ({config.model_type}): its attention "
                         f"sees the whole text, so it cannot learn to predict the next token. For --task "
                         f"{CAUSAL_LM_TASK} pass a decoder (a causal LM such as LLaMA, Qwen, GPT-2; without --model, "
                         "SmolLM2-135M-Instruct), or train this model on a classification task instead.")


def training_arguments(options: TrainOptions, output_dir: str) -> TrainingArguments:
    """The Trainer's settings: evaluation and a checkpoint every epoch, cosine schedule, tqdm, no reporting."""
    arguments = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=2 * options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation,
        learning_rate=options.lr,
        weight_decay=options.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=options.warmup_ratio,  # below 1: a share of the steps (transformers >= 5, pyproject's floor)
        num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1,
        eval_strategy="steps" if options.eval_steps else "epoch",
        eval_steps=options.eval_steps,
        save_strategy="steps" if options.save_steps else "epoch",
        save_steps=options.save_steps,
        save_total_limit=2,
        logging_strategy="steps",
        logging_steps=0.1,
        bf16=use_bf16(options.bf16),
        use_cpu=not has_accelerator(),
        seed=options.seed,
        report_to="none",
        remove_unused_columns=False,  # the encoded datasets hold the model's inputs only
        ddp_find_unused_parameters=False,  # every trained tensor is used in every step: skip DDP's graph search
        disable_tqdm=False,
    )
    if arguments.n_gpu > 1:
        raise ValueError(
            f"This process sees {arguments.n_gpu} GPUs: the Trainer would run it under nn.DataParallel, whose "
            "replicas cannot reach an adapter's shared tensors. Run one process per GPU (torchrun --standalone "
            f"--nproc-per-node {arguments.n_gpu} -m tenslora ..., or accelerate launch), or use one GPU "
            "(CUDA_VISIBLE_DEVICES=0)."
        )
    return arguments


class TrainingDiverged(ValueError):
    """A run's weights became non-finite at optimizer step ``step``: its learning rate is too large."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class DivergenceCheck(TrainerCallback):
    """Stops a run whose trained weights are no longer finite, or (a causal LM) whose training loss is far
    worse than a uniform guess over the vocabulary, before it is checkpointed or saved.

    A non-finite loss (a learning rate far too large, bad inputs) gives non-finite gradients and then
    non-finite weights: the check after every optimizer step is one reduction over the trained tensors.
    A language model whose logged loss passes ``loss_ceiling`` (twice a uniform guess's) has unlearnt its
    language: training on would only spend the run's time (its learning rate is too large).
    """

    def __init__(self, loss_ceiling: float | None = None) -> None:
        self.loss_ceiling = loss_ceiling

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A parameter sharded by FSDP2 (a DTensor) is checked by each process on its own shard.
        self.trained = [parameter.to_local() if hasattr(parameter, "to_local") else parameter
                        for parameter in model.parameters() if parameter.requires_grad]

    def on_step_end(self, args, state, control, **kwargs):
        total = torch.stack([parameter.detach().sum(dtype=torch.float32) for parameter in self.trained]).sum()
        if not torch.isfinite(total):
            self._stop(args, state, "the loss is no longer finite (NaN or inf weights after the update)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if self.loss_ceiling is not None and loss is not None and loss > self.loss_ceiling:
            self._stop(args, state, f"the training loss, {loss:.3g}, is above twice that of a uniform guess "
                                    f"over the vocabulary ({self.loss_ceiling:.3g})")

    @staticmethod
    def _stop(args: TrainingArguments, state: Any, why: str) -> None:
        kept = last_checkpoint(args.output_dir)
        raise TrainingDiverged(
            f"Training diverged at step {state.global_step}: {why}. Lower --lr (it is {args.learning_rate:g}) and "
            "train in a new --output-dir; "
            + (f"the last good checkpoint, '{kept}', is kept." if kept else "nothing of this run was saved."),
            state.global_step)


def loss_ceiling(prepared: Prepared) -> float | None:
    """A causal LM's highest believable training loss: twice a uniform guess's over its vocabulary,
    ``2 ln(vocab_size)``. A pretrained model starts far below ln(vocab_size), a randomly initialised one at it;
    a fine-tune past twice that has unlearnt the language (``DivergenceCheck``). None for a classifier, whose
    few classes leave no such margin."""
    if prepared.data.modality != CAUSAL_LM_TASK:
        return None
    return 2 * math.log(prepared.model.get_output_embeddings().weight.shape[0])


def perplexity(loss: float) -> float:
    """``exp(loss)``: the number of equally likely tokens the model hesitates between, on average (inf past
    what a float holds)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class CausalLmTrainer(Trainer):
    """The Trainer of a causal LM: an evaluation gathers the loss alone (not vocabulary-sized logits for every
    token of the split), and reports the perplexity, ``exp(loss)``, beside it (in history.csv and metrics.json)."""

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = perplexity(loss)
        return output


def make_trainer(prepared: Prepared, arguments: TrainingArguments, callbacks: list | None = None) -> Trainer:
    shared = dict(model=prepared.model, args=arguments, train_dataset=prepared.data.splits["train"],
                  eval_dataset=prepared.data.splits["validation"], processing_class=prepared.preprocessor,
                  callbacks=callbacks)
    if prepared.data.modality == CAUSAL_LM_TASK:
        # A causal LM's loss takes the Trainer's token count (num_items_in_batch): its loss accounting stays on.
        return CausalLmTrainer(**shared, data_collator=CausalLmCollator(prepared.preprocessor.pad_token_id))
    collator = (DataCollatorWithPadding(prepared.preprocessor) if prepared.data.modality == "text"
                else default_data_collator)
    trainer = Trainer(**shared, data_collator=collator, compute_metrics=prepared.data.compute_metrics)
    # Every head here returns the mean loss of its batch. Seeing `**kwargs` in `forward`, the Trainer would
    # assume a loss summed over `num_items_in_batch`: it would multiply the loss by the number of processes
    # and not divide it by the gradient-accumulation steps (2x the gradient on 2 processes or with 2 steps).
    trainer.model_accepts_loss_kwargs = False
    return trainer


def run_training(options: TrainOptions, base_test_exact_match: float | None = None) -> dict[str, Any]:
    """Train, evaluate on the test split, save the adapter; return what ``metrics.json`` holds.

    ``base_test_exact_match``: the base model's score on the run's test split when it is already known (a
    sweep's runs share it); a causal LM trained on prompts and completions otherwise generates it.

    With ``options.resume`` an interrupted run continues from its last complete checkpoint, and a
    finished one is returned as recorded. Writes ``run.json`` at the start, ``history.csv`` after
    every epoch, the adapter and ``metrics.json`` at the end, all in ``options.output_dir``.
    """
    start = time.monotonic()
    output_dir = options.output_dir or default_output_dir(options)
    state = process_state()
    torch.set_num_threads(options.threads or default_threads(options.kind, state.num_processes))
    if state.is_main_process:
        check_not_busy(output_dir)  # first: a second writer is refused at once, whatever the folder holds
    if check_run_dir(output_dir, options.identity(), options.resume):
        return read_json(os.path.join(output_dir, METRICS_FILE), required=("test", "validation"))
    prepared = prepare(options)
    check_same_labels(output_dir, prepared.run["labels"])
    arguments = training_arguments(options, output_dir)
    state.wait_for_everyone()  # every process has checked the folder before the main one writes to it
    with disk_errors(output_dir), run_lock(output_dir, hold=state.is_main_process):
        if state.is_main_process:
            _claim(output_dir, options, prepared.run)
        return _train(options, prepared, arguments, output_dir, start, base_test_exact_match)


def _claim(output_dir: str, options: TrainOptions, run: dict[str, Any]) -> None:
    """Under the lock: check the folder again (another process may have written a run there since the first
    check) and record the run, unless it is being resumed."""
    if check_run_dir(output_dir, options.identity(), options.resume):
        raise ValueError(f"Another process finished the run in '{output_dir}' meanwhile; run the same command "
                         "again to print its results.")
    check_same_labels(output_dir, run["labels"])
    if not os.path.exists(os.path.join(output_dir, RUN_FILE)):
        write_json(os.path.join(output_dir, RUN_FILE), run)


def _train(options: TrainOptions, prepared: Prepared, arguments: TrainingArguments, output_dir: str,
           start: float, base_test_exact_match: float | None) -> dict[str, Any]:
    trainer = make_trainer(prepared, arguments,
                           callbacks=[HistoryCallback(os.path.join(output_dir, HISTORY_FILE)),
                                      DivergenceCheck(loss_ceiling(prepared))])
    checkpoint = resumable_checkpoint(output_dir) if options.resume else None
    trained = trainer.train(resume_from_checkpoint=checkpoint)
    history = history_rows(trainer.state.log_history)
    if not history or history[-1]["step"] != trainer.state.global_step:  # max_steps stopped mid-epoch
        trainer.evaluate()
        history = history_rows(trainer.state.log_history)
    test = _strip(trainer.evaluate(prepared.data.splits["test"], metric_key_prefix="test"), "test_")
    validation = _strip(history[-1], "eval_")
    generated = (generation_scores(prepared, trainer.args.bf16, base_test_exact_match)
                 if _scores_generation(prepared) else {})
    for split, scores in (("test", test), ("validation", validation)):
        if split in generated:
            scores["exact_match"] = generated[split]
    trainer.save_model(output_dir)
    metrics = {
        "task": options.task_name,
        "method": options.method,
        "test": test,
        "validation": validation,
        "trainable_parameters": prepared.run["trainable_parameters"],
        "adapter_parameters": prepared.run.get("adapter_parameters", 0),
        "adapter": prepared.run.get("adapter"),
        "seed": options.seed,
        "bf16": trainer.args.bf16,
        "epochs": trainer.state.epoch,
        "steps": trainer.state.global_step,
        "train_samples": len(prepared.data.splits["train"]),
        "train_runtime_s": trained.metrics.get("train_runtime"),
        "wall_time_s": round(time.monotonic() - start, 1),
        "resumed_from": checkpoint,
        "model": prepared.run["model"],
        "output_dir": output_dir,
        "options": options.identity(),
    }
    if "base_test" in generated:
        metrics["base_test_exact_match"] = generated["base_test"]
    if trainer.is_world_process_zero():
        write_json(os.path.join(output_dir, METRICS_FILE), metrics)
    return metrics


def _scores_generation(prepared: Prepared) -> bool:
    """A causal LM trained on prompts and completions (or conversations) is scored on what it generates too."""
    texts = prepared.data.texts
    return texts is not None and is_paired(texts["train"])


def generation_scores(prepared: Prepared, bf16: bool, base_test: float | None = None) -> dict[str, float]:
    """Exact match of greedy answers on the validation and test splits, and the base model's on the test split
    (the adapter switched off: the zero-shot score the fine-tune is measured against) unless ``base_test`` gives
    it, decoded in the run's precision."""
    model, texts, tokenizer = prepared.model, prepared.data.texts, prepared.preprocessor
    scores = {split: exact_match(model, tokenizer, texts[split], split, bf16=bf16) for split in ("validation", "test")}
    if base_test is None:
        with model.disable_adapter():
            base_test = exact_match(model, tokenizer, texts["test"], "test", bf16=bf16)
    return {**scores, "base_test": base_test}


def evaluate_run(run_dir: str, split: str = "test", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scores of a trained run on ``split`` of its own data, or of the data ``overrides`` name.

    The data must have the run's classes, in the same order (the head's outputs follow it). The model's own code
    runs only with ``trust_remote_code`` in ``overrides``: the caller's permission, never the run folder's.
    """
    run = read_run(run_dir)
    overrides = dict(overrides or {})
    recorded = {key: value for key, value in run["options"].items() if key != "trust_remote_code"}
    if any(key in overrides for key in DATA_SOURCE_KEYS):
        for key in DATA_SOURCE_KEYS:
            recorded.pop(key, None)
        if run["modality"] == CAUSAL_LM_TASK:  # other files, the same objective
            overrides.setdefault("task", CAUSAL_LM_TASK)
    options = options_from_mapping({**recorded, **overrides})
    torch.set_num_threads(options.threads or default_threads(options.kind))
    model, preprocessor = load_trained_model(run_dir, run, trust_remote_code=bool(options.trust_remote_code))
    task = inputs.load(options)
    if task.labels != run["labels"]:
        raise ValueError(f"The data's classes {task.labels[:5]}... differ from the run's {run['labels'][:5]}...; "
                         "evaluate on data with the classes the run was trained on.")
    task = inputs.encode(task, preprocessor, options)
    prepared = Prepared(model, preprocessor, task, run)
    trainer = make_trainer(prepared, training_arguments(options, run_dir))
    return trainer.evaluate(task.splits[split], metric_key_prefix=split)


def _strip(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}
