"""Every option validated before anything is loaded or written: one schema for Python, config files and flags.

The walks below are generated from the command's parser and from ``TrainOptions``' schema, so an option added
later is walked too: each wrong type and each value past a limit must end in exit code 2, one line on stderr
naming the option, no traceback, nothing loaded and nothing written.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import typing
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from pydantic import ValidationError

import tenslora
import tenslora.app.cli
import tenslora.app.modeling
import tenslora.app.sweep.run
import tenslora.app.train
import tiny
from tenslora.app.cli import build_parser, main
from tenslora.app.options import (
    PATH_OPTIONS,
    TrainOptions,
    adapter_config,
    default_threads,
    option_names,
    options_from_mapping,
    read_config_file,
)
from tiny_tasks import write_text_files

#: Options whose value is any non-empty text (a path, a column, a hub id): only "" is out of range for them.
FREE_TEXT = {*PATH_OPTIONS, "text_column", "text_pair_column", "label_column", "output_dir", "run_dir", "out_dir",
             "sweep_dir", "config"}


class Loaded(AssertionError):
    """Raised where a command would load data or a model: validation let a bad value through."""


def _refuse_loading(*args, **kwargs):
    raise Loaded("a bad value was accepted: the command went on to load data or a model")


@pytest.fixture(autouse=True)
def nothing_loads(monkeypatch):
    for module, name in ((tenslora.app.cli, "run_training"), (tenslora.app.sweep.run, "run_training"),
                         (tenslora.app.train, "load_trained_model"), (tenslora.app.cli, "load_model_config"),
                         (tenslora.app.cli, "merge_run")):
        monkeypatch.setattr(module, name, _refuse_loading, raising=False)


def _walk(annotation: Any) -> tuple[set[type], list[Any]]:
    """The plain types and the constraints (``Gt``, ``Le``...) inside ``Annotated``/``Optional``/``Union`` layers."""
    types, limits = set(), []
    if isinstance(annotation, type):
        types.add(annotation)
    origin = typing.get_origin(annotation)
    if isinstance(origin, type) and origin is not typing.Annotated:
        types.add(origin)
    for item in getattr(annotation, "__metadata__", ()):
        limits += [limit for limit in getattr(item, "metadata", [item])
                   if isinstance(limit, annotated_types.BaseMetadata)]
    for argument in typing.get_args(annotation):
        if origin is not typing.Annotated or argument is typing.get_args(annotation)[0]:
            inner_types, inner_limits = _walk(argument)
            types |= inner_types
            limits += inner_limits
    return types, limits


def _kind(name: str) -> str:
    field = TrainOptions.__pydantic_fields__[name]
    types = _walk(field.annotation)[0] - {type(None)}
    if types == {bool}:
        return "bool"
    return "number" if types and types <= {int, float} else "text"


def _bounds(name: str) -> list[Any]:
    """Values just past each limit the schema declares for ``name`` (and non-finite ones for floats)."""
    field = TrainOptions.__pydantic_fields__[name]
    types, limits = _walk(field.annotation)
    limits += [limit for limit in field.metadata if isinstance(limit, annotated_types.BaseMetadata)]
    values: list[Any] = []
    for limit in limits:
        if isinstance(limit, annotated_types.Gt):
            values.append(limit.gt)
        elif isinstance(limit, annotated_types.Ge):
            values.append(limit.ge - 1)
        elif isinstance(limit, annotated_types.Lt):
            values.append(limit.lt)
        elif isinstance(limit, annotated_types.Le):
            values.append(limit.le + 1)
    return values + (["nan", "inf", "-inf"] if float in types else ["1.5"])


def flag_values(name: str) -> list[str]:
    """Bad command-line values for option ``name``: a wrong type, then each limit crossed."""
    if name in FREE_TEXT:
        return [""]
    if _kind(name) == "number":
        return ["abc", *map(str, _bounds(name))]
    return ["", "bogus", "0"]  # names, ranks, budgets, roles: not one of the valid values


def config_values(name: str) -> list[Any]:
    """Bad config-file values: the flag values, a nested list (no option takes one) and per-type ones."""
    values: list[Any] = [[[1]]]
    if _kind(name) == "bool":
        return [*values, "maybe", 2, 0.5]
    if _kind(name) == "number":
        return [*values, True, *_bounds(name), *flag_values(name)]
    return [*values, *flag_values(name)]


def _value_actions(command: str) -> list[argparse.Action]:
    """The options of ``tenslora COMMAND`` that take a value."""
    parser = build_parser()
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return [action for action in sub.choices[command]._actions
            if action.option_strings and action.nargs != 0 and action.dest != "help"]


def _cli_cases() -> list[tuple[str, str, str, bool]]:
    """(command, flag, bad value, whether the message must name the option: TrainOptions' and choices' do)."""
    cases = []
    for command in ("train", "sweep", "eval", "params"):
        for action in _value_actions(command):
            name = action.dest
            if name in option_names():
                values = flag_values(name)
            elif action.choices:
                values = ["bogus"]
            elif name in FREE_TEXT:
                values = [""]
            else:  # a command's own option (a rank, a job count, a list): a wrong type and a negative number
                values = ["abc", "-1"]
            named = name in option_names() or bool(action.choices)
            cases += [(command, action.option_strings[-1], value, named) for value in values]
    return cases


def _assert_one_line_error(capsys, code: int, *names: str) -> str:
    """Exit code 2, one line on stderr, no traceback; the line names one of ``names`` (if any are given)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    normalized = lines[0].replace("-", "_")
    assert not names or any(name.strip("-").replace("-", "_") in normalized for name in names), lines[0]
    return lines[0]


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:  # argparse's own usage errors
        return exit_info.code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run's folder as `eval` reads it (no model needed: validation comes first)."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "run.json").write_text(json.dumps({"options": TrainOptions(task="glue-mrpc").identity(), "model": "m",
                                                 "modality": "text", "pooling": "mean", "labels": ["a", "b"]}))
    (folder / "metrics.json").write_text("{}")
    return folder


@pytest.mark.parametrize(("command", "flag", "value", "named"), _cli_cases())
def test_every_flag_refuses_wrong_types_and_out_of_range_values(command, flag, value, named, run_dir, tmp_path,
                                                                 capsys):
    positional = {"train": [], "eval": [str(run_dir)], "params": [], "sweep": [str(tmp_path / "sweep")]}[command]
    out = ["--output-dir", str(tmp_path / "out")] if command == "train" and flag != "--output-dir" else []
    code = _run([command, *positional, *out, f"{flag}={value}"])
    _assert_one_line_error(capsys, code, *([flag] if named else []))
    assert not (tmp_path / "out").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(("name", "value"), [(name, value) for name in option_names() for value in config_values(name)])
def test_every_config_key_refuses_wrong_types_and_out_of_range_values(name, value, tmp_path, capsys):
    config = tmp_path / "options.json"
    config.write_text(json.dumps({name: value}))
    _assert_one_line_error(capsys, _run(["train", "--config", str(config)]), name)


def test_config_values_are_coerced_like_flags_and_python(tmp_path, monkeypatch):
    """Quoted booleans, numbers YAML reads as strings: the same options from all three."""
    seen = []
    monkeypatch.setattr(tenslora.app.cli, "run_training", lambda options: seen.append(options) or 1 / 0)
    config = tmp_path / "options.yaml"
    config.write_text('bf16: "false"\nresume: "no"\nhead_only: "0"\nlr: 1e-3\nmax_steps: "2"\ndropout: "0.1"\n'
                      'ranks: {in: "4", out: 4, qkv: full, depth: 2}\nroles: q,v\nbudget_free: 1\n')
    assert _run(["train", "--config", str(config)]) == 2  # the unknown key
    config.write_text(config.read_text().replace("budget_free: 1\n", ""))
    with pytest.raises(ZeroDivisionError):
        main(["train", "--config", str(config)])
    flags = ["--no-bf16", "--lr", "1e-3", "--max-steps", "2", "--dropout", "0.1",
             "--ranks", "in=4,out=4,qkv=full,depth=2", "--roles", "q,v"]
    with pytest.raises(ZeroDivisionError):
        main(["train", *flags])
    python = TrainOptions(bf16="false", resume="no", head_only=0, lr="1e-3", max_steps="2", dropout="0.1",
                          ranks={"in": 4, "out": "4", "qkv": "full", "depth": 2}, roles="q,v")
    assert seen[0] == seen[1] == python
    assert python.bf16 is False and python.lr == 1e-3 and python.max_steps == 2 and python.roles == ["q", "v"]


@pytest.mark.parametrize(("options", "words"), [
    ({"lr": 0}, ["lr", "greater than 0"]),
    ({"lr": math.inf}, ["lr", "finite"]),
    ({"weight_decay": -0.1}, ["weight_decay", "greater than or equal to 0"]),
    ({"threads": 0}, ["threads", "greater than 0"]),
    ({"max_length": 0}, ["max_length", "greater than 0"]),
    ({"gradient_accumulation": 0}, ["gradient_accumulation", "greater than 0"]),
    ({"epochs": math.nan}, ["epochs", "finite"]),
    ({"dropout": 1.0}, ["dropout", "less than 1"]),
    ({"seed": -1}, ["seed", "greater than or equal to 0"]),
    ({"max_steps": True}, ["max_steps", "not a boolean"]),
    ({"bf16": "maybe"}, ["bf16", "boolean"]),
    ({"roles": "q,z"}, ["roles", "'z'"]),
    ({"role_patterns": {"q": "attn.(q"}}, ["role_patterns", "not a regular expression"]),
    ({"budget": "lora:x"}, ["budget", "lora:8"]),
    ({"budget": "lora:8", "ranks": 4}, ["--budget", "--ranks"]),
    ({"head_only": True, "dropout": 0.1}, ["--head-only", "--dropout"]),
])
def test_python_options_name_the_option_and_the_limit(options, words):
    with pytest.raises(ValidationError) as caught:
        TrainOptions(**options)
    message = tenslora.app.cli.user_error_message(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_given_options_are_told_from_defaults(tmp_path, capsys):
    """A budget with the default ranks (a recorded run, a sweep's copy) is fine; typed together, refused."""
    assert TrainOptions(budget="lora:8").budget == "lora:8"
    recorded = TrainOptions(budget="lora:8", head_only=False).identity()
    assert options_from_mapping(recorded).budget == "lora:8"  # eval and resume read run.json like this
    for argv, flags in ((["--budget", "lora:8", "--ranks", "8"], ("--budget", "--ranks")),
                        (["--head-only", "--construction", "qkv_depth"], ("--head-only", "--construction"))):
        line = _assert_one_line_error(capsys, _run(["train", *argv]), flags[0])
        assert all(flag in line for flag in flags)


def test_run_json_keeps_its_form():
    identity = TrainOptions().identity()
    assert list(identity) == [name for name in option_names()
                              if name not in ("output_dir", "resume", "threads", "eval_steps", "save_steps",
                                              "trust_remote_code", "load_in_4bit", "load_in_8bit", "layout",
                                              "max_input_rank")]
    assert TrainOptions(trust_remote_code=True).identity()["trust_remote_code"] is True
    assert TrainOptions(layout="blocks", roles="all-linear").identity()["layout"] == "blocks"
    assert identity["ranks"] == 8 and identity["roles"] == ["q", "k", "v"] and identity["max_train_samples"] == 6000
    assert (identity["lr"], identity["epochs"], identity["batch_size"]) == (1e-2, 2.0, 32)  # as recorded before


def test_max_length_is_checked_against_the_model():
    bert = argparse.Namespace(max_position_embeddings=80, model_type="bert", pad_token_id=0)
    TrainOptions(max_length=80).check_model_limits(bert)
    with pytest.raises(ValueError, match="more than the model's 80 positions"):
        TrainOptions(max_length=81).check_model_limits(bert)
    roberta = argparse.Namespace(max_position_embeddings=514, model_type="roberta", pad_token_id=1)
    with pytest.raises(ValueError, match="512 positions"):
        TrainOptions(max_length=513).check_model_limits(roberta, argparse.Namespace(model_max_length=10**30))


def custom_code_model(folder: Path) -> Path:
    """A model folder whose config asks for its own code; the code, if ever run, leaves a marker file."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tenslora-test-remote", "hidden_size": 32,
        "auto_map": {"AutoConfig": "remote.RemoteConfig", "AutoModel": "remote.RemoteModel",
                     "AutoModelForSequenceClassification": "remote.RemoteModel"}}))
    (folder / "remote.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').close()\n")
    return folder


def test_model_code_is_never_run_without_trust_remote_code(tmp_path, capsys, monkeypatch):
    model = custom_code_model(tmp_path / "model")
    data = write_text_files(tmp_path / "data", labels=("a", "b"))
    monkeypatch.setattr(tenslora.app.cli, "run_training", tenslora.app.train.run_training)
    monkeypatch.setattr("sys.stdin", None)  # a prompt would fail loudly
    code = main(["train", "--train-file", str(data["train"]), "--text-column", "review", "--label-column", "stars",
                 "--model", str(model), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err  # datasets' progress bars, then the error
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and line.startswith("tenslora train: error:")
    assert "--trust-remote-code" in line and "auto_map" in line and not (model / "RAN").exists()
    assert not (tmp_path / "out" / "run.json").exists()
    calls = []

    def tokenizer(name, **kwargs):  # stands in for the model's own code, which this test does not run
        calls.append(kwargs.get("trust_remote_code"))
        raise ValueError("stopped after the tokenizer")

    monkeypatch.setattr(tenslora.app.modeling.AutoTokenizer, "from_pretrained", tokenizer)
    assert main(["train", "--train-file", str(data["train"]), "--text-column", "review", "--label-column", "stars",
                 "--model", str(model), "--output-dir", str(tmp_path / "out"), "--trust-remote-code"]) == 2
    assert calls == [True] and "stopped after the tokenizer" in capsys.readouterr().err


def test_trust_remote_code_reaches_the_loaders(tmp_path, monkeypatch):
    model = custom_code_model(tmp_path / "model")
    calls = []

    def record(name, **kwargs):
        calls.append(kwargs.get("trust_remote_code"))
        return argparse.Namespace()

    monkeypatch.setattr(tenslora.app.modeling.AutoConfig, "from_pretrained", record)
    tenslora.app.modeling.load_model_config(str(model), trust_remote_code=True)
    tenslora.app.modeling.load_model_config(str(tmp_path))  # a folder without custom code: explicitly False
    assert calls == [True, False] and not (model / "RAN").exists()


@pytest.mark.parametrize(("error", "words"), [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/run.json"), ["/runs/x/run.json", "free some space"]),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), ["/runs/x", "permissions"]),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/train.csv"), ["/data/train.csv", "not a folder"]),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/file/x"), ["/runs/file/x", "folder"]),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), ["UTF-8", "invalid start byte"]),
])
def test_file_system_errors_are_one_line_naming_the_path(error, words, monkeypatch, capsys):
    def fail(options):
        raise error

    monkeypatch.setattr(tenslora.app.cli, "run_training", fail)
    line = _assert_one_line_error(capsys, main(["train"]))
    assert all(word in line for word in words), line


def test_bugs_keep_their_traceback(monkeypatch):
    def bug(options):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(tenslora.app.cli, "run_training", bug)
    with pytest.raises(TypeError):
        main(["train"])
    monkeypatch.setattr(tenslora.app.cli, "run_training", lambda options: (_ for _ in ()).throw(ConnectionError("x")))
    with pytest.raises(ConnectionError):  # an OSError, but not a file's: not the user's to fix here
        main(["train"])


def test_config_files_that_cannot_be_read(tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_bytes("lr: 0,01 # caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _assert_one_line_error(capsys, _run(["train", "--config", str(config)]), "options.yaml")
    config.write_text("- lr\n- 1e-3\n")
    assert "mapping" in _assert_one_line_error(capsys, _run(["train", "--config", str(config)]), "options.yaml")
    assert "not found" in _assert_one_line_error(capsys, _run(["train", "--config", str(tmp_path)]), "--config")


def test_options_read_ranks_by_the_config_rule():
    """One rank rule (resolve_ranks): the options take what TensLoraConfig takes ('full' in a list too) and refuse the
    rest with its message, which names the construction's modes."""
    assert TrainOptions(ranks=["4", 4, "full", 2]).ranks == [4, 4, "full", 2] == \
        tenslora.TensLoraConfig(construction="qkv_depth", ranks=["4", 4, "full", 2]).ranks
    with pytest.raises(ValidationError, match=r"'qkv_depth' construction has 4 modes \['in', 'out', 'qkv', 'depth'\]"):
        TrainOptions(ranks=[4, 4])


def test_ranks_per_family_and_the_block_layout_reach_the_adapter(tmp_path):
    """A config file gives each family its own ranks; --layout blocks with a budget matches it over the block tensor."""
    (tmp_path / "options.yaml").write_text("roles: all-linear\nranks:\n  attention: 4\n  mlp: {in: 2, out: '3', "
                                           "qkv: 2, depth: full}\n")
    options = options_from_mapping(read_config_file(str(tmp_path / "options.yaml")), typed=True)
    assert adapter_config(options, None, None).ranks == {"attention": 4,
                                                         "mlp": {"in": 2, "out": 3, "qkv": 2, "depth": "full"}}
    with pytest.raises(ValidationError, match="ranks"):
        TrainOptions(ranks={"attention": "many"})
    model_config = tiny.bert().config
    blocks = TrainOptions(roles="all-linear", layout="blocks", budget="lora:2")
    config = adapter_config(blocks, model_config, None)
    assert config.layout == "blocks"
    budget = tenslora.lora_parameter_count(2, model_config, roles="all-linear")
    assert budget / 2 <= tenslora.count_parameters(config, model_config) <= budget * 2
    with pytest.raises(ValidationError, match="layout"):
        TrainOptions(layout="tiles")


def test_threads_default_to_one_for_a_classifier_and_to_the_cores_shared_out_for_a_causal_lm(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert default_threads("classification") == 1
    assert default_threads("causal-lm") == 6
    assert default_threads("causal-lm", processes=2) == 3
    assert default_threads("causal-lm", processes=8) == 1
