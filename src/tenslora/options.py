"""What a training run is: ``TrainOptions``, read from code, a config file or the command line.

The defaults are the default run (``tenslora train`` with no argument): a few minutes on two CPU
cores. The paper's recipe for its benchmarks is in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .api import lora_parameter_count, match_budget
from .config import TensLoraConfig
from .construction import PRESETS
from .data import CUSTOM_TASK, DEFAULT_TASK

Ranks = Union[int, list, dict, str]


#: Options that may name local files or folders (``model`` may also be a hub id).
PATH_OPTIONS = ("data_dir", "train_file", "validation_file", "test_file", "image_root", "model")
#: The default run (no task and no data files given) trains on a subset of WordNet, to finish in minutes.
DEFAULT_RUN_SAMPLES = {"max_train_samples": 6000, "max_eval_samples": 2000}


@dataclass
class TrainOptions:
    """Everything that defines a run. Field names are the config-file keys and (with dashes) the flags."""

    # What to train on
    task: Optional[str] = None  # a built-in task; default wordnet-supersense unless files are given
    data_dir: Optional[str] = None  # local copy of a built-in task's data (GLUE files, Fashion-MNIST IDX files)
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    image_root: Optional[str] = None  # an image folder: the user's own task, or a built-in one's local copy
    max_train_samples: Optional[int] = None  # default: all (6000 in the default run)
    max_eval_samples: Optional[int] = None  # per evaluation split; default: all (2000 in the default run)
    # The model
    model: Optional[str] = None  # default: all-MiniLM-L6-v2 (text) or google/vit-base-patch16-224 (images)
    pooling: Optional[str] = None  # mean | cls; default: the checkpoint's own (mean for sentence-transformers)
    max_length: int = 128
    # The adapter
    construction: str = "qkv_depth"
    factorization: Optional[str] = None
    ranks: Ranks = 8
    budget: Optional[str] = None  # "lora:8" (LoRA rank 8's parameter count) or a number of parameters
    scaling: float = 1.0
    dropout: float = 0.0
    roles: list = field(default_factory=lambda: ["q", "k", "v"])
    role_patterns: Optional[dict] = None  # for models TensLoRA does not know (config file only)
    head_only: bool = False  # the baseline: train the classification head only, no adapter
    # The optimization
    lr: float = 1e-2  # for short runs: a zero-core Tucker adapter needs a large step to start (see docs)
    epochs: float = 2.0
    max_steps: Optional[int] = None
    batch_size: int = 32
    gradient_accumulation: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    bf16: Optional[bool] = None  # autocast in bfloat16; default: where the hardware computes it natively
    threads: Optional[int] = None  # torch CPU threads; default 1 (fastest when cores are shared)
    # Where
    output_dir: Optional[str] = None
    resume: bool = False

    def __post_init__(self) -> None:
        for name in PATH_OPTIONS:  # recorded absolute: a run can be evaluated or resumed from anywhere
            value = getattr(self, name)
            if value and os.path.exists(value):
                setattr(self, name, os.path.abspath(value))
        if not (self.task or self.train_file or self.image_root):  # the default run: a few minutes on 2 cores
            self.task = DEFAULT_TASK
            self.max_train_samples = self.max_train_samples or DEFAULT_RUN_SAMPLES["max_train_samples"]
            self.max_eval_samples = self.max_eval_samples or DEFAULT_RUN_SAMPLES["max_eval_samples"]
        self.ranks = parse_ranks(self.ranks)
        if isinstance(self.roles, str):
            self.roles = [role.strip() for role in self.roles.split(",")]
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}.")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}.")
        if sum(bool(source) for source in (self.task, self.train_file, self.image_root and not self.task)) > 1:
            raise ValueError("Give one source of data: --task (with --data-dir or --image-root for local copies), "
                             "--train-file, or --image-root alone for your own image folder.")
        if self.data_dir and not self.task:
            raise ValueError("--data-dir is the local copy of a built-in task's data: give --task too.")
        file_options = ("validation_file", "test_file", "text_column", "text_pair_column", "label_column")
        given = [f"--{name.replace('_', '-')}" for name in file_options if getattr(self, name)]
        if given and not self.train_file:
            raise ValueError(f"{', '.join(given)} describe your own files: give --train-file too (built-in tasks "
                             "know their columns).")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio is a share of the training steps, in [0, 1); got {self.warmup_ratio}.")

    @property
    def task_name(self) -> str:
        """A short name of the data: the built-in task's, else ``custom``."""
        return self.task or CUSTOM_TASK

    @property
    def method(self) -> str:
        """A short name of the adapter, for default output folders and reports."""
        if self.head_only:
            return "head-only"
        return self.construction if self.factorization is None else f"{self.construction}-{self.factorization}"

    def identity(self) -> dict[str, Any]:
        """The options that make two runs different (not where they are written, nor how fast they run)."""
        data = dataclasses.asdict(self)
        for key in ("output_dir", "resume", "threads"):
            data.pop(key)
        return json.loads(json.dumps(data))  # the JSON form, as recorded in run.json


#: The options that say where the data comes from: a new source replaces all of them.
DATA_SOURCE_KEYS = ("task", "data_dir", "train_file", "validation_file", "test_file", "text_column",
                    "text_pair_column", "label_column", "image_root")


def options_from_mapping(values: Mapping[str, Any]) -> TrainOptions:
    """``TrainOptions`` from a dict whose keys are field names (dashes allowed); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown}; see `tenslora train --help` for the valid ones.")
    return TrainOptions(**values)


def read_config_file(path: str) -> dict[str, Any]:
    """The options in a YAML or JSON file (a mapping of option names to values)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Config file '{path}' not found; check the --config path.")
    try:
        values = yaml.safe_load(file.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as error:
        raise ValueError(f"Config file '{path}' is not valid YAML/JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"Config file '{path}' must hold a mapping of option names to values.")
    return values


def parse_ranks(ranks: Ranks) -> Union[int, list, dict]:
    """``8`` -> 8; ``"8,8,3,4"`` -> [8, 8, 3, 4]; ``"in=8,out=8,qkv=3,depth=full"`` -> a dict by mode."""
    if not isinstance(ranks, str):
        return ranks
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


def budget_parameters(budget: str | int, model_config: Any, roles: list[str]) -> int:
    """A budget as a parameter count: ``lora:8`` is the count of LoRA rank 8 on ``roles``."""
    text = str(budget).strip()
    try:
        if text.startswith("lora:"):
            return lora_parameter_count(int(text[len("lora:"):]), model_config, roles)
        return int(text)
    except ValueError:
        raise ValueError(f"Cannot read budget '{budget}': use lora:8 (LoRA rank 8's count) or a number of "
                         "parameters.") from None


def adapter_config(options: TrainOptions, model_config: Any, task_type: Optional[str],
                   modules_to_save: Optional[list[str]] = None) -> TensLoraConfig:
    """The ``TensLoraConfig`` of a run; with a budget, the ranks are the isoparameter ones (``match_budget``).

    A preset keeps its rank rule under a budget: LoTR's depth mode stays full, only the shared ranks move.
    """
    config = TensLoraConfig(construction=options.construction, factorization=options.factorization,
                            ranks=options.ranks, scaling=options.scaling, dropout=options.dropout,
                            roles=options.roles, role_patterns=options.role_patterns, task_type=task_type,
                            modules_to_save=modules_to_save)
    if options.budget is not None:
        rules = PRESETS[options.construction].tucker_ranks if options.construction in PRESETS else None
        fixed = {mode: "full" for mode, rule in (rules or {}).items() if rule == "full"} or None
        budget = budget_parameters(options.budget, model_config, config.roles)
        config.ranks = match_budget(config.construction, config.factorization, budget, model_config,
                                    roles=config.roles, fixed=fixed)
    return config
