"""What a training run is: ``TrainOptions``, read from code, a config file or the command line.

One pydantic schema checks every option the same way from all three: types are coerced strictly
(numbers from numeric strings, booleans from true/false/yes/no/1/0, anything else an error naming
the option), ranges are checked against their limits, and contradictory options are refused before
any model or data is loaded. The defaults are the default run (``tenslora train`` with no argument):
a few minutes on two CPU cores. The paper's recipe for its benchmarks is in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from ..core.construction import read_ranks
from ..data import BUILTIN_TASKS, CAUSAL_LM_TASK, CUSTOM_TASK, DEFAULT_TASK, FILE_TASKS
from ..tuner.budgets import lora_parameter_count, match_budget
from ..tuner.config import TensLoraConfig
from ..tuner.quantized import check_bitsandbytes_installed
from .gguf import check_not_quantized


def _no_bool(value: Any) -> Any:
    """Refuse ``true`` where a number is expected (pydantic would read it as 1)."""
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


def _text(value: Any) -> Any:
    """Names and paths are text; a number is accepted (``budget: 5000``, a column named ``1``), a boolean not."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


Number = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
Integer = Annotated[int, BeforeValidator(_no_bool)]
Positive = Annotated[Integer, Field(gt=0)]
Text = Annotated[str, BeforeValidator(_text), Field(min_length=1)]

#: Options that may name local files or folders (``model`` may also be a hub id).
PATH_OPTIONS = ("data_dir", "train_file", "validation_file", "test_file", "image_root", "model")
#: The default run (no task and no data files given) trains on a subset of WordNet, to finish in minutes.
DEFAULT_RUN_SAMPLES = {"max_train_samples": 6000, "max_eval_samples": 2000}
#: The built-in causal-LM run (SmolLM2-135M-Instruct on WordNet chat): a few minutes on 2 cores.
DEFAULT_CAUSAL_LM_SAMPLES = {"max_train_samples": 480, "max_eval_samples": 200}
#: Defaults that depend on what is trained: a classifier from a small encoder, or a causal LM (all-linear, as
#: QLoRA and PEFT users adapt LLMs; a smaller batch of longer sequences). See docs/benchmarks.md and docs/llm.md.
DEFAULTS_BY_KIND: dict[str, dict[str, Any]] = {
    "classification": {"lr": 1e-2, "epochs": 2.0, "batch_size": 32, "roles": ["q", "k", "v"], "max_length": 128},
    "causal-lm": {"lr": 2e-2, "epochs": 1.0, "batch_size": 8, "roles": ["all-linear"], "max_length": 256},
}
#: The options that shape the adapter: meaningless (so refused) with ``head_only``.
ADAPTER_OPTIONS = ("construction", "factorization", "ranks", "budget", "max_input_rank", "scaling", "dropout", "roles",
                   "role_patterns", "layout")
#: Model types whose position ids start after the padding index (RoBERTa's scheme): fewer usable positions.
POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert", "longformer")
#: The largest seed numpy accepts.
MAX_SEED = 2**32 - 1
#: Every value of ``task``: the built-in tasks, and the objectives for the user's own files.
TASKS = (*BUILTIN_TASKS, *FILE_TASKS)
#: Options added after runs were first recorded: in a run's identity only when not at their default, so older
#: runs keep theirs.
RECORDED_WHEN_SET = ("trust_remote_code", "load_in_4bit", "load_in_8bit", "layout", "max_input_rank")
#: Options that mean nothing to a causal-LM run (it has no classes, no head, no built-in data).
CLASSIFICATION_OPTIONS = ("data_dir", "image_root", "text_pair_column", "label_column", "pooling", "head_only")


@dataclass(config=ConfigDict(extra="forbid"))
class TrainOptions:
    """Everything that defines a run. Field names are the config-file keys and (with dashes) the flags."""

    # What to train on
    task: Optional[Text] = None  # a built-in task or causal-lm; default wordnet-supersense unless files are given
    data_dir: Optional[Text] = None  # local copy of a built-in task's data (GLUE files, Fashion-MNIST IDX files)
    train_file: Optional[Text] = None
    validation_file: Optional[Text] = None
    test_file: Optional[Text] = None
    text_column: Optional[Text] = None
    text_pair_column: Optional[Text] = None
    label_column: Optional[Text] = None
    image_root: Optional[Text] = None  # an image folder: the user's own task, or a built-in one's local copy
    max_train_samples: Optional[Positive] = None  # default: all (6000 in the default run)
    max_eval_samples: Optional[Positive] = None  # per evaluation split; default: all (2000 in the default run)
    # The model
    model: Optional[Text] = None  # default: all-MiniLM-L6-v2 (text) or google/vit-base-patch16-224 (images)
    pooling: Optional[Literal["mean", "cls"]] = None  # default: the checkpoint's own (mean for sentence-transformers)
    max_length: Optional[Positive] = None  # at most the model's positions (checked when its config is read)
    trust_remote_code: bool = False  # run code shipped in a model folder (its config's auto_map): only if you trust it
    load_in_4bit: bool = False  # QLoRA: the frozen base quantized by bitsandbytes (nf4, nested statistics); causal-lm
    load_in_8bit: bool = False  # the frozen base in bitsandbytes int8 (LLM.int8()); causal-lm
    # The adapter
    construction: Text = "qkv_depth"
    factorization: Optional[Text] = None
    ranks: Any = 8  # 8, [8, 8, 3, 4], {in: 8, ..., depth: full} or per family: checked by TensLoraConfig
    budget: Optional[Text] = None  # "lora:8" (LoRA rank 8's parameter count) or a number of parameters
    max_input_rank: Optional[Positive] = None  # with --budget: the rank that sets the cost per token, capped
    scaling: Number = 1.0
    dropout: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.0
    roles: Optional[list[Text]] = None  # default: q, k, v (classification); all-linear (causal-lm)
    role_patterns: Optional[dict[Text, Text]] = None  # for models TensLoRA does not know (config file only)
    layout: Literal["roles", "blocks"] = "roles"  # blocks: FacT's d x d blocks of every projection in one tensor
    head_only: bool = False  # the baseline: train the classification head only, no adapter
    # The optimization
    # Defaults by kind of run (DEFAULTS_BY_KIND): a zero-core Tucker adapter needs a large step on short runs.
    lr: Optional[Annotated[Number, Field(gt=0.0)]] = None
    epochs: Optional[Annotated[Number, Field(gt=0.0)]] = None
    max_steps: Optional[Positive] = None
    batch_size: Optional[Positive] = None
    gradient_accumulation: Positive = 1
    warmup_ratio: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.0
    weight_decay: Annotated[Number, Field(ge=0.0)] = 0.0
    seed: Annotated[Integer, Field(ge=0, le=MAX_SEED)] = 0
    bf16: Optional[bool] = None  # autocast in bfloat16; default: where the hardware computes it natively
    threads: Optional[Positive] = None  # torch CPU threads; default by kind of run (default_threads)
    eval_steps: Optional[Positive] = None  # evaluate every N steps (default: every epoch)
    save_steps: Optional[Positive] = None  # checkpoint every N steps (default: every epoch)
    # Where
    output_dir: Optional[Text] = None
    resume: bool = False

    @field_validator("ranks", mode="before")
    @classmethod
    def _parse_ranks(cls, value: Any) -> Any:
        return parse_ranks(value) if isinstance(value, str) else read_ranks(value)

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, value: Any) -> Any:
        return [role.strip() for role in value.split(",") if role.strip()] if isinstance(value, str) else value

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in TASKS:
            raise ValueError(f"unknown task '{value}'; choose one of {', '.join(TASKS)}")
        return value

    @field_validator("budget")
    @classmethod
    def _readable_budget(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            parse_budget(value)
        return value

    @field_validator("role_patterns")
    @classmethod
    def _compiling_patterns(cls, value: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        for role, pattern in (value or {}).items():
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"the pattern of role '{role}' is not a regular expression ({error}): "
                                 f"{pattern!r}") from None
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _check_given(cls, values: Any, handler: Any) -> TrainOptions:
        """Refuse contradictory options, counting those given a value other than their default."""
        options = handler(values)
        passed = (values.kwargs or {}) if hasattr(values, "kwargs") else dict(values)
        check_contradictions(options, {name for name in passed if getattr(options, name) != options.default(name)})
        return options

    def __post_init__(self) -> None:
        for name in PATH_OPTIONS:  # recorded absolute: a run can be evaluated or resumed from anywhere
            value = getattr(self, name)
            if value and os.path.exists(value):
                setattr(self, name, os.path.abspath(value))
        self._check_quantization()
        if self.task == CAUSAL_LM_TASK:
            self._check_causal_lm()
        for name, value in DEFAULTS_BY_KIND[self.kind].items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        if self.task == CAUSAL_LM_TASK and not self.train_file:  # the built-in LLM run: a few minutes on 2 cores
            for name, value in DEFAULT_CAUSAL_LM_SAMPLES.items():
                setattr(self, name, getattr(self, name) or value)
        if not (self.task or self.train_file or self.image_root):  # the default run: a few minutes on 2 cores
            self.task = DEFAULT_TASK
            self.max_train_samples = self.max_train_samples or DEFAULT_RUN_SAMPLES["max_train_samples"]
            self.max_eval_samples = self.max_eval_samples or DEFAULT_RUN_SAMPLES["max_eval_samples"]
        builtin_task = self.task if self.task in BUILTIN_TASKS else None
        if sum(bool(source) for source in (builtin_task, self.train_file, self.image_root and not self.task)) > 1:
            raise ValueError("Give one source of data: --task (with --data-dir or --image-root for local copies), "
                             "--train-file, or --image-root alone for your own image folder.")
        if self.data_dir and not self.task:
            raise ValueError("--data-dir is the local copy of a built-in task's data: give --task too.")
        file_options = ("validation_file", "test_file", "text_column", "text_pair_column", "label_column")
        given = [f"--{name.replace('_', '-')}" for name in file_options if getattr(self, name)]
        if given and not self.train_file:
            raise ValueError(f"{', '.join(given)} describe your own files: give --train-file too (built-in tasks "
                             "know their columns).")
        if not self.head_only:
            self._check_adapter()

    def _check_quantization(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit are two ways to quantize the base: give one of them.")
        if self.quantization and self.task != CAUSAL_LM_TASK:
            raise ValueError(f"--load-in-{self.quantization} quantizes the base of a causal-LM run: give --task "
                             f"{CAUSAL_LM_TASK} (classification runs train on an unquantized base).")
        if self.quantization:
            check_not_quantized(self.model or "", self.quantization)
            check_bitsandbytes_installed(self.quantization)

    def _check_causal_lm(self) -> None:
        """A causal-LM run has no classes and no head (its data: --train-file, else the built-in WordNet chat)."""
        given = [f"--{name.replace('_', '-')}" for name in CLASSIFICATION_OPTIONS if getattr(self, name)]
        if given:
            raise ValueError(f"--task {CAUSAL_LM_TASK} has no classes and no head: drop {', '.join(given)}.")

    def default(self, name: str) -> Any:
        """The default of option ``name`` for this kind of run (``DEFAULTS_BY_KIND``, else the field's own)."""
        return DEFAULTS_BY_KIND[self.kind].get(name, default_value(name))

    @property
    def kind(self) -> str:
        """``causal-lm`` or ``classification``: what the run trains, which sets its defaults."""
        return "causal-lm" if self.task == CAUSAL_LM_TASK else "classification"

    def _check_adapter(self) -> None:
        """Construction, ranks, roles... checked by ``TensLoraConfig`` itself (no model needed); its message is
        completed with the adapter options set here, since it may not name the one at fault."""
        try:
            adapter_config(self, model_config=None, task_type=None)
        except ValueError as error:
            changed = [f"--{name.replace('_', '-')}" for name in ADAPTER_OPTIONS
                       if getattr(self, name) != self.default(name)]
            given = f" (adapter options set: {', '.join(changed)})" if changed else ""
            raise ValueError(f"{error}{given}") from None

    @property
    def task_name(self) -> str:
        """A short name of the data: the built-in task's, else ``custom``."""
        return self.task or CUSTOM_TASK

    @property
    def quantization(self) -> Optional[str]:
        """How the base is quantized: ``"4bit"``, ``"8bit"`` or None."""
        return "4bit" if self.load_in_4bit else "8bit" if self.load_in_8bit else None

    @property
    def method(self) -> str:
        """A short name of the adapter, for default output folders and reports."""
        if self.head_only:
            return "head-only"
        return self.construction if self.factorization is None else f"{self.construction}-{self.factorization}"

    def identity(self) -> dict[str, Any]:
        """The options that make two runs different (not where they are written, nor how fast they run).

        Options added later (``RECORDED_WHEN_SET``) are recorded only when not at their default, so older runs keep
        their identity.
        """
        data = dataclasses.asdict(self)
        for key in ("output_dir", "resume", "threads", "eval_steps", "save_steps"):
            data.pop(key)
        for key in RECORDED_WHEN_SET:
            if data[key] == default_value(key):
                data.pop(key)
        return json.loads(json.dumps(data))  # the JSON form, as recorded in run.json

    def check_model_limits(self, model_config: Any, preprocessor: Any = None) -> None:
        """The options checked against the model once its config is read, before training: ``max_length``
        within its positions (and within its tokenizer's limit, when the tokenizer states one)."""
        limits = [getattr(model_config, "max_position_embeddings", None),
                  getattr(preprocessor, "model_max_length", None)]
        if limits[0] and getattr(model_config, "model_type", "") in POSITIONS_AFTER_PADDING:
            limits[0] -= (model_config.pad_token_id or 0) + 1
        known = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 10**7]  # tokenizers say 1e30
        if known and self.max_length > min(known):
            raise ValueError(f"--max-length {self.max_length} is more than the model's {min(known)} positions; "
                             f"use --max-length {min(known)} or less.")


def default_threads(kind: str, processes: int = 1) -> int:
    """torch CPU threads when ``threads`` is not given: 1 for a classifier (its small matrices run fastest on one
    core when cores are shared), the cores left to each of ``processes`` runs for a causal LM (on 2 cores a
    SmolLM2 step takes 0.53x the time on two threads; see docs/performance.md)."""
    if kind != "causal-lm":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // processes)


def option_names() -> list[str]:
    """Every option, in declaration order: the config-file keys."""
    return [field.name for field in dataclasses.fields(TrainOptions)]


def default_value(name: str) -> Any:
    """The default of option ``name``."""
    return TrainOptions.__pydantic_fields__[name].get_default(call_default_factory=True)


def check_contradictions(options: TrainOptions, given: Iterable[str]) -> None:
    """Refuse options that another option would silently override; ``given`` are the options set explicitly."""
    given = set(given)
    if options.budget is not None and "ranks" in given:
        raise ValueError("--budget chooses the ranks itself: give --budget or --ranks, not both.")
    if options.max_input_rank is not None and options.budget is None:
        raise ValueError("--max-input-rank bounds the ranks --budget chooses: give --budget too (with --ranks, set "
                         "the 'in' rank itself).")
    if options.head_only:
        adapter = [f"--{name.replace('_', '-')}" for name in ADAPTER_OPTIONS if name in given]
        if adapter:
            raise ValueError(f"--head-only trains no adapter, but adapter options were given ({', '.join(adapter)}); "
                             "drop them or drop --head-only.")


#: The options that say where the data comes from: a new source replaces all of them.
DATA_SOURCE_KEYS = ("task", "data_dir", "train_file", "validation_file", "test_file", "text_column",
                    "text_pair_column", "label_column", "image_root")


def options_from_mapping(values: Mapping[str, Any], typed: bool = False) -> TrainOptions:
    """``TrainOptions`` from a dict whose keys are field names (dashes allowed); unknown keys are an error.

    ``typed``: the keys were typed by the user (flags, a config file), so each counts as given, even with
    its default value (``--budget lora:8 --ranks 8`` is refused). A run's recorded options are not typed.
    """
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(option_names()))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown}; see `tenslora train --help` for the valid ones.")
    options = TrainOptions(**values)
    if typed:
        check_contradictions(options, values)
    return options


def describe_validation_error(error: ValidationError) -> str:
    """A pydantic error as one line: each problem with the option it concerns and the value given."""
    problems = []
    for item in error.errors(include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        location = [str(part) for part in item["loc"]]
        if not location:  # a check across options: its message names them
            problems.append(message)
            continue
        name = location[0]
        where = f"option {name} (--{name.replace('_', '-')})" + "".join(f"[{part}]" for part in location[1:])
        given = "" if item["type"] == "value_error" else f", got {item['input']!r}"  # our messages name the value
        problems.append(f"{where}: {message}{given}")
    return "; ".join(problems)


def read_config_file(path: str) -> dict[str, Any]:
    """The options in a YAML or JSON file (a mapping of option names to values)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Config file '{path}' not found; check the --config path.")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except UnicodeDecodeError:
        raise ValueError(f"Config file '{path}' is not UTF-8 text; save it as UTF-8 YAML or JSON.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"Config file '{path}' is not valid YAML/JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"Config file '{path}' must hold a mapping of option names to values.")
    return values


def parse_ranks(ranks: str) -> Union[int, list, dict]:
    """``"8"`` -> 8; ``"8,8,3,4"`` -> [8, 8, 3, 4]; ``"in=8,out=8,qkv=3,depth=full"`` -> a dict by mode."""
    try:
        parts = [part.strip() for part in ranks.split(",") if part.strip()]
        if parts and all("=" in part for part in parts):
            pairs = (part.split("=", 1) for part in parts)
            return {mode.strip(): value.strip() if value.strip() == "full" else int(value) for mode, value in pairs}
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"Cannot read ranks '{ranks}': use 8, 8,8,3,4 or in=8,out=8,qkv=3,depth=4.")
    return values[0] if len(values) == 1 else values


def parse_budget(budget: str) -> tuple[Optional[int], Optional[int]]:
    """``"lora:8"`` -> (8, None): LoRA rank 8's count; ``"5000"`` -> (None, 5000) parameters."""
    text = str(budget).strip()
    try:
        value = int(text[len("lora:"):] if text.startswith("lora:") else text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"Cannot read budget '{budget}': use lora:8 (LoRA rank 8's count) or a positive number of "
                         "parameters.")
    return (value, None) if text.startswith("lora:") else (None, value)


def budget_parameters(budget: str, model_config: Any, config: TensLoraConfig) -> int:
    """A budget as a parameter count: ``lora:8`` is the count of LoRA rank 8 on the modules ``config`` adapts."""
    lora_rank, parameters = parse_budget(budget)
    if lora_rank is None:
        return parameters
    return lora_parameter_count(lora_rank, model_config, config.roles, config.layers_to_transform,
                                config.role_patterns)


def adapter_config(options: TrainOptions, model_config: Any, task_type: Optional[str],
                   modules_to_save: Optional[list[str]] = None) -> TensLoraConfig:
    """The ``TensLoraConfig`` of a run; with a budget, the ranks are the isoparameter ones (``match_budget``).

    A preset keeps its rank rule under a budget: LoTR's depth mode stays full, only the shared ranks move.
    Without ``model_config`` the budget is left unresolved: the config then only checks the options.
    """
    config = TensLoraConfig(construction=options.construction, factorization=options.factorization,
                            ranks=options.ranks, scaling=options.scaling, dropout=options.dropout,
                            roles=options.roles, role_patterns=options.role_patterns, layout=options.layout,
                            task_type=task_type, modules_to_save=modules_to_save)
    if options.budget is not None and model_config is not None:
        budget = budget_parameters(options.budget, model_config, config)
        config.ranks = match_budget(options.construction, options.factorization, budget, model_config,
                                    roles=config.roles, layout=config.layout, role_patterns=config.role_patterns,
                                    max_input_rank=options.max_input_rank)
    return config

