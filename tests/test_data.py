"""The data layer, offline: the shipped WordNet file, and small files, folders and tokenizers made in tmp_path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import transformers
from datasets import ClassLabel
from PIL import Image

from tenslora.data import (
    BUILTIN_TASKS,
    SUPERSENSES,
    DataError,
    compute_metrics,
    custom_image_task,
    custom_text_task,
    get_task,
    image_transform,
    load_task,
    load_wordnet_supersense,
    sources,
    tokenize_text_task,
)
from tenslora.data.splits import hash_fraction
from tenslora.data.wordnet import DATA_FILE, wordnet_splits

SPLITS = ["train", "validation", "test"]


def synset_ids(dataset) -> set[str]:
    return {pos + offset for pos, offset in zip(dataset["pos"][:], dataset["offset"][:], strict=True)}


def texts(data) -> dict[str, list[str]]:
    return {split: sorted(dataset["text"][:]) for split, dataset in data.items()}


def write_table(path: Path, rows: dict[str, list]) -> Path:
    """``rows`` as CSV, TSV, JSON lines or parquet, by the extension of ``path``."""
    frame = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    return path


def sentiment_rows(n: int, offset: int = 0) -> dict[str, list]:
    return {"text": [f"review number {offset + i} was {'good' if i % 2 else 'bad'}" for i in range(n)],
            "label": ["pos" if i % 2 else "neg" for i in range(n)]}


def write_png_folder(root: Path, classes: list[str], per_class: int) -> Path:
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), (20 * index, 10 * i, 90)).save(root / name / f"{i}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def wordnet():
    return wordnet_splits()


@pytest.fixture
def tokenizer(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "ran", ":", "animal"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))


# --- WordNet supersenses (shipped file) -------------------------------------------------------------------------


def test_wordnet_split_is_disjoint_complete_and_has_41_supersenses(wordnet):
    ids = {split: synset_ids(wordnet[split]) for split in SPLITS}
    assert sum(map(len, ids.values())) == sum(len(wordnet[split]) for split in SPLITS) == 95882
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    assert 0.78 < len(wordnet["train"]) / 95882 < 0.82
    feature = wordnet["train"].features["label"]
    assert isinstance(feature, ClassLabel) and feature.names == list(SUPERSENSES) and len(SUPERSENSES) == 41
    assert set(wordnet["train"].unique("label")) == set(range(41))
    assert wordnet["train"].features == wordnet["test"].features


def synset(wordnet, pos: str, offset: str) -> dict:
    for split in SPLITS:
        keys = list(zip(wordnet[split]["pos"][:], wordnet[split]["offset"][:], strict=True))
        if (pos, offset) in keys:
            return wordnet[split][keys.index((pos, offset))]
    raise KeyError(pos + offset)


def test_wordnet_examples_are_lemma_and_definition_without_examples(wordnet):
    breathe = synset(wordnet, "v", "00001740")
    assert breathe["text"] == "breathe: draw air into, and expel out of, the lungs"
    assert SUPERSENSES[breathe["label"]] == "verb.body"
    entity = synset(wordnet, "n", "00001740")
    assert entity["text"].startswith("entity: that which is perceived") and SUPERSENSES[entity["label"]] == "noun.Tops"


def test_wordnet_split_does_not_depend_on_seed_or_sizes(wordnet):
    small = load_wordnet_supersense(seed=3, max_train=50, max_validation=20, max_test=30)
    assert [len(small[split]) for split in SPLITS] == [50, 20, 30]
    for split in SPLITS:
        assert synset_ids(small[split]) <= synset_ids(wordnet[split])
    again = load_wordnet_supersense(seed=3, max_train=50, max_validation=20, max_test=30)
    assert all(small[split]["offset"][:] == again[split]["offset"][:] for split in SPLITS)


def test_wordnet_subsets_follow_the_seed_for_train_only_and_are_nested():
    seed0 = load_wordnet_supersense(seed=0, max_train=40, max_validation=30, max_test=30)
    seed1 = load_wordnet_supersense(seed=1, max_train=40, max_validation=30, max_test=30)
    larger = load_wordnet_supersense(seed=0, max_train=80, max_validation=60, max_test=60)
    assert synset_ids(seed0["train"]) != synset_ids(seed1["train"])
    assert seed0["validation"]["offset"][:] == seed1["validation"]["offset"][:]
    assert seed0["test"]["offset"][:] == seed1["test"]["offset"][:]
    for split in SPLITS:
        assert synset_ids(seed0[split]) <= synset_ids(larger[split])


def test_hash_is_the_same_on_every_machine():
    assert hash_fraction("n00001740") == pytest.approx(0.72057, abs=1e-5)


def test_default_task_is_wordnet_and_subset_sizes_apply():
    spec = get_task("wordnet-supersense")
    data = load_task(spec, max_train=30, max_validation=10, max_test=10)
    assert [len(data[split]) for split in SPLITS] == [30, 10, 10]
    assert spec.modality == "text" and spec.text_column == "text" and spec.metrics == ("accuracy",)


# --- Custom text files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_custom_files_of_each_format(tmp_path, extension):
    files = {split: write_table(tmp_path / f"{split}{extension}", sentiment_rows(n, offset))
             for split, n, offset in (("train", 12, 0), ("validation", 4, 100), ("test", 6, 200))}
    spec = custom_text_task(str(files["train"]), str(files["validation"]), str(files["test"]))
    data = load_task(spec)
    assert [len(data[split]) for split in SPLITS] == [12, 4, 6]
    for split in SPLITS:
        assert data[split].features["label"] == ClassLabel(names=["neg", "pos"])
    assert data["test"][1] == {"text": "review number 201 was good", "label": 1}


def test_custom_columns_and_text_pairs(tmp_path):
    rows = {"premise": ["a cat", "a dog"] * 5, "hypothesis": ["an animal", "the dog"] * 5, "gold": [3, 7] * 5,
            "label": ["ignored"] * 10}
    train = write_table(tmp_path / "train.csv", rows)
    spec = custom_text_task(str(train), str(train), str(train), text_column="premise", text_pair_column="hypothesis",
                            label_column="gold")
    data = load_task(spec)
    assert data["train"].features["label"].names == ["3", "7"]
    assert data["train"]["label"][:] == [0, 1] * 5
    assert (spec.text_column, spec.text_pair_column) == ("premise", "hypothesis")


def test_missing_validation_and_test_files_are_carved_from_train(tmp_path):
    train = write_table(tmp_path / "train.jsonl", sentiment_rows(200))
    first, second = (load_task(custom_text_task(str(train)), seed=seed) for seed in (0, 1))
    assert texts(first) == texts(second)
    sets = {split: set(first[split]["text"][:]) for split in SPLITS}
    assert sum(map(len, sets.values())) == 200 and not (sets["train"] & sets["validation"] or
                                                          sets["train"] & sets["test"] or
                                                          sets["validation"] & sets["test"])
    assert 10 <= len(sets["validation"]) <= 30 and 10 <= len(sets["test"]) <= 30

    with_test = load_task(custom_text_task(str(train), test_file=str(write_table(tmp_path / "test.csv",
                                                                                    sentiment_rows(8, 500)))))
    assert len(with_test["test"]) == 8 and len(with_test["train"]) + len(with_test["validation"]) == 200


# --- GLUE schema, local files -----------------------------------------------------------------------------------


def test_glue_cola_from_a_hub_style_parquet_folder(tmp_path):
    folder = tmp_path / "glue" / "cola"
    folder.mkdir(parents=True)
    sentences = [f"sentence {i} is {'fine' if i % 3 else 'odd'}" for i in range(60)]
    labels = [int(i % 3 != 0) for i in range(60)]
    write_table(folder / "train-00000-of-00001.parquet", {"sentence": sentences, "label": labels, "idx": range(60)})
    write_table(folder / "validation-00000-of-00001.parquet",
                {"sentence": sentences[:9], "label": labels[:9], "idx": range(9)})
    write_table(folder / "test-00000-of-00001.parquet",
                {"sentence": ["hidden"] * 5, "label": [-1] * 5, "idx": range(5)})

    spec = get_task("glue-cola", source=str(tmp_path / "glue"))
    data = load_task(spec)
    assert data["test"]["sentence"][:] == sentences[:9]  # GLUE's validation split is the test split
    assert len(data["train"]) + len(data["validation"]) == 60 and len(data["validation"]) > 0
    assert data["train"].features["label"].names == ["unacceptable", "acceptable"]
    scores = compute_metrics(spec, np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), [1, 0, 0, 0])
    assert scores == {"accuracy": 0.75, "matthews_correlation": pytest.approx(0.57735, abs=1e-5)}


def test_glue_mrpc_from_csv_train_and_dev_files(tmp_path):
    rows = {"sentence1": [f"s{i}" for i in range(30)], "sentence2": [f"t{i}" for i in range(30)],
            "label": [i % 2 for i in range(30)], "idx": list(range(30))}
    write_table(tmp_path / "train.csv", rows)
    write_table(tmp_path / "dev.csv", {key: values[:6] for key, values in rows.items()})
    spec = get_task("glue-mrpc", source=str(tmp_path))
    data = load_task(spec)
    assert len(data["test"]) == 6 and data["test"].features["label"].names == ["not_equivalent", "equivalent"]
    assert (spec.text_column, spec.text_pair_column) == ("sentence1", "sentence2")
    scores = compute_metrics(spec, [1, 1, 0, 0], [1, 0, 1, 0])
    assert scores == {"accuracy": 0.5, "f1": 0.5}


# --- Images -----------------------------------------------------------------------------------------------------


def test_eurosat_and_dtd_from_an_image_folder(tmp_path):
    root = write_png_folder(tmp_path / "eurosat", ["AnnualCrop", "Forest", "River"], per_class=10)
    for name in ("eurosat", "dtd"):
        spec = get_task(name, source=str(root))
        data = load_task(spec)
        assert sum(len(data[split]) for split in SPLITS) == 30 and all(len(data[split]) for split in SPLITS)
        assert data["train"].features["label"].names == ["AnnualCrop", "Forest", "River"]
        assert spec.modality == "image" and spec.image_column == "image"


def test_image_transform_gives_pixel_values(tmp_path):
    root = write_png_folder(tmp_path / "images", ["a", "b"], per_class=10)
    data = load_task(custom_image_task(str(root)))
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    example = data["train"].with_transform(image_transform(processor))[0]
    assert tuple(example["pixel_values"].shape) == (3, 32, 32) and example["label"] in (0, 1)


def test_image_folder_with_split_folders(tmp_path):
    for split, count in (("train", 4), ("validation", 2), ("test", 2)):
        write_png_folder(tmp_path / "root" / split, ["cat", "dog"], per_class=count)
    data = load_task(custom_image_task(str(tmp_path / "root")))
    assert [len(data[split]) for split in SPLITS] == [8, 4, 4]


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for stem, count in (("train", 40), ("t10k", 10)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    data = load_task(get_task("fashion-mnist", source=str(tmp_path)))
    assert len(data["test"]) == 10 and len(data["train"]) + len(data["validation"]) == 40
    assert data["test"][3]["label"] == 3 and data["test"][3]["image"].size == (28, 28)
    assert data["train"].features["label"].names[0] == "T-shirt/top"


# --- Preprocessing and metrics ----------------------------------------------------------------------------------


def test_tokenize_without_padding_keeps_only_label(tmp_path, tokenizer):
    rows = {"text": ["the cat sat", "a dog ran : the animal sat the cat", "a cat", "the dog"] * 3,
            "label": ["x", "y", "x", "y"] * 3}
    train = write_table(tmp_path / "train.csv", rows)
    spec = custom_text_task(str(train), str(train), str(train))
    tokens = tokenize_text_task(load_task(spec), tokenizer, spec, max_length=6)
    assert set(tokens["train"].column_names) == {"label", "input_ids", "attention_mask", "token_type_ids"}
    lengths = {len(ids) for ids in tokens["train"]["input_ids"][:]}
    assert max(lengths) == 6 and len(lengths) > 1  # truncated, not padded
    assert tokens["train"][0]["input_ids"] == tokenizer("the cat sat")["input_ids"]


def test_tokenize_text_pairs(tmp_path, tokenizer):
    rows = {"sentence1": ["the cat", "a dog"] * 4, "sentence2": ["sat", "ran"] * 4, "label": [0, 1] * 4}
    write_table(tmp_path / "train.csv", rows)
    write_table(tmp_path / "validation.csv", rows)
    spec = get_task("glue-rte", source=str(tmp_path))
    tokens = tokenize_text_task(load_task(spec), tokenizer, spec, max_length=32)
    ids = tokens["test"][0]["input_ids"]
    assert ids.count(tokenizer.sep_token_id) == 2 and 1 in tokens["test"][0]["token_type_ids"]


def test_metrics_take_logits_or_class_ids():
    spec = get_task("wordnet-supersense")
    assert compute_metrics(spec, np.eye(3)[[0, 1, 2, 2]], [0, 1, 2, 0]) == {"accuracy": 0.75}
    assert compute_metrics(spec, [0, 1], [0, 1]) == {"accuracy": 1.0}


# --- Errors -----------------------------------------------------------------------------------------------------


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, ValueError)
    return message


def test_unknown_task_lists_the_known_names():
    message = error_of(get_task, "glue-qqp")
    assert "glue-qqp" in message and all(name in message for name in BUILTIN_TASKS)


def test_missing_file_names_the_option(tmp_path):
    message = error_of(load_task, custom_text_task(str(tmp_path / "nope.csv")))
    assert "nope.csv not found" in message and "--train-file" in message
    train = write_table(tmp_path / "train.csv", sentiment_rows(4))
    message = error_of(load_task, custom_text_task(str(train), test_file=str(tmp_path / "t.csv")))
    assert "--test-file" in message


def test_missing_columns_name_the_existing_ones(tmp_path):
    train = write_table(tmp_path / "train.csv", {"sentence": ["a", "b"], "y": [0, 1]})
    message = error_of(load_task, custom_text_task(str(train)))
    assert "'text'" in message and "sentence, y" in message and "--text-column" in message
    message = error_of(load_task, custom_text_task(str(train), text_column="sentence"))
    assert "'label'" in message and "--label-column" in message
    message = error_of(load_task, get_task("glue-sst2", source=str(tmp_path)))  # no validation/dev file
    assert "validation" in message and "--data-dir" in message


def test_glue_files_with_wrong_columns(tmp_path):
    for split in ("train", "validation"):
        write_table(tmp_path / f"{split}.csv", {"text": ["a", "b"], "label": [0, 1]})
    message = error_of(load_task, get_task("glue-cola", source=str(tmp_path)))
    assert "'sentence'" in message and "text, label" in message


def test_evaluation_labels_unseen_in_training_are_named(tmp_path):
    train = write_table(tmp_path / "train.csv", {"text": ["a", "b"], "label": ["cat", "dog"]})
    test = write_table(tmp_path / "test.csv", {"text": ["c", "d", "e"], "label": ["cat", "emu", "yak"]})
    message = error_of(load_task, custom_text_task(str(train), str(train), str(test)))
    assert "['emu', 'yak']" in message and "test split" in message


def test_empty_and_unreadable_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    assert "empty" in error_of(load_task, custom_text_task(str(tmp_path / "empty.csv")))
    (tmp_path / "header.csv").write_text("text,label\n")
    assert "--train-file" in error_of(load_task, custom_text_task(str(tmp_path / "header.csv")))
    (tmp_path / "data.xlsx").write_text("x")
    assert ".csv" in error_of(load_task, custom_text_task(str(tmp_path / "data.xlsx")))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{not json\n')
    assert "bad.jsonl" in error_of(load_task, custom_text_task(str(tmp_path / "bad.jsonl")))


def test_header_only_non_utf8_folders_and_unreadable_files_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "header.csv").write_text("text,label\n")
    message = error_of(load_task, custom_text_task(str(tmp_path / "header.csv")))
    assert "header.csv has no rows" in message and "--train-file" in message
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9 cr\xe8me,1\n".encode("latin-1"))
    message = error_of(load_task, custom_text_task(str(tmp_path / "latin1.csv")))
    assert "latin1.csv" in message and "UTF" in message.upper().replace("-", "")
    (tmp_path / "folder.csv").mkdir()
    assert "folder.csv is a folder" in error_of(load_task, custom_text_task(str(tmp_path / "folder.csv")))
    train = write_table(tmp_path / "train.csv", sentiment_rows(4))
    test = write_table(tmp_path / "other.csv", {"sentence": ["a"], "label": ["pos"]})
    message = error_of(load_task, custom_text_task(str(train), test_file=str(test)))
    assert f"test split ({test})" in message and "'text'" in message

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(sources.Path, "open", refused)  # the tests may run as root, who reads any file
    message = error_of(load_task, custom_text_task(str(train)))
    assert "cannot read" in message and "train.csv" in message and "Permission denied" in message


def test_rows_without_labels_and_too_little_data(tmp_path):
    holes = write_table(tmp_path / "holes.csv", {"text": ["a", "b", "c"], "label": ["x", None, "y"]})
    assert "without a label" in error_of(load_task, custom_text_task(str(holes)))
    tiny = write_table(tmp_path / "tiny.csv", {"text": ["a", "b"], "label": ["x", "y"]})
    assert "split is empty" in error_of(load_task, custom_text_task(str(tiny)))


def test_empty_text_cells_fail_at_tokenization(tmp_path, tokenizer):
    train = write_table(tmp_path / "train.csv", {"text": ["the cat", None, "a dog"], "label": [0, 1, 0]})
    spec = custom_text_task(str(train), str(train), str(train))
    assert "empty 'text'" in error_of(tokenize_text_task, load_task(spec), tokenizer, spec, 8)


def test_bad_sizes_and_missing_sources(tmp_path):
    assert "train subset size" in error_of(load_wordnet_supersense, max_train=0)
    assert "dataset-fashion-mnist" in error_of(load_task, get_task("fashion-mnist", source=str(tmp_path)))
    assert "--image-root" in error_of(load_task, get_task("eurosat", source=str(tmp_path / "missing")))
    assert "build_wordnet_dataset" in error_of(load_task, get_task("wordnet-supersense", str(tmp_path / "x.gz")))


def test_hub_failures_suggest_local_data(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(sources, "load_dataset", offline)
    message = error_of(load_task, get_task("glue-cola"))
    assert "nyu-mll/glue" in message and "--data-dir" in message
    assert "--image-root" in error_of(load_task, get_task("dtd"))


def test_unlabelled_ids_are_rejected(tmp_path):
    write_table(tmp_path / "train.csv", {"sentence": ["a", "b", "c"], "label": [0, 1, -1]})
    write_table(tmp_path / "validation.csv", {"sentence": ["a"], "label": [0]})
    assert "['-1']" in error_of(load_task, get_task("glue-sst2", source=str(tmp_path)))


def test_shipped_file_is_small_and_licensed():
    assert DATA_FILE.stat().st_size < 5_000_000
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in DATA_FILE.with_name("WORDNET_LICENSE").read_text()
    with gzip.open(DATA_FILE, "rt") as lines:
        assert set(json.loads(next(lines))) == {"text", "label", "pos", "offset"}
