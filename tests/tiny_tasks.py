"""Tiny saved models and data files for the command-line tests: every path of `tenslora train`, in seconds.

Models are random (hidden 32, 2 layers, 4 heads), saved with a tokenizer or image processor the way a hub
checkpoint is; data files follow the schemas of the real tasks (GLUE's columns, an ImageFolder tree).
"""

from __future__ import annotations

import csv
import json
import random
import string
from pathlib import Path

import numpy as np
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = list(string.ascii_lowercase + string.digits)
WORDS = ["cat", "dog", "bird", "fish", "runs", "jumps", "swims", "flies", "red", "blue", "small", "big"]
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer over single characters: any lowercase text, ~80 ids."""
    vocab = {token: i for i, token in enumerate(SPECIAL + LETTERS + [f"##{c}" for c in LETTERS])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def save_text_model(folder: Path, model_type: str = "bert", sentence_transformers: bool = False) -> Path:
    """A random tiny BERT/RoBERTa/ELECTRA checkpoint (no head) with the char tokenizer.

    ``sentence_transformers`` adds the files that declare mean pooling (``modules.json``, ``1_Pooling``).
    """
    tokenizer = char_tokenizer()
    config_class = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
                    "electra": transformers.ElectraConfig}[model_type]
    extra = {"embedding_size": 32} if model_type == "electra" else {}
    config = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, type_vocab_size=2,
                          max_position_embeddings=80, **SIZES, **extra)
    transformers.set_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if sentence_transformers:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return folder


def save_image_model(folder: Path) -> Path:
    """A random tiny ViT (16x16 images, 8x8 patches) with its image processor."""
    config = transformers.ViTConfig(image_size=16, patch_size=8, **SIZES)
    transformers.set_seed(0)
    transformers.ViTModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))


def write_pair_task(folder: Path, train: int = 48, test: int = 16) -> Path:
    """GLUE MRPC's layout: ``train.csv`` and ``validation.csv`` (sentence1, sentence2, label 0/1).

    Label 1 when both sentences start with the same word (every other row): learnable, not trivial.
    """
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in (("train", train), ("validation", test)):
        with open(folder / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence1", "sentence2", "label"])
            for index in range(size):
                first, second = _sentence(rng), _sentence(rng).split()
                second[0] = first.split()[0] if index % 2 else rng.choice([w for w in WORDS if w != first.split()[0]])
                writer.writerow([first, " ".join(second), index % 2])
    return folder


def write_text_files(folder: Path, sizes: dict[str, int] | None = None, labels: tuple[str, ...] = ("animal", "other"),
                     ) -> dict[str, Path]:
    """Custom CSV files with a ``review`` text column and a string ``stars`` label; returns the path per split."""
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, size in (sizes or {"train": 40, "validation": 12, "test": 12}).items():
        paths[split] = folder / f"{split}.csv"
        with open(paths[split], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["review", "stars"])
            for index in range(size):
                writer.writerow([_sentence(rng), labels[index % len(labels)]])
    return paths


def write_image_folder(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """An ImageFolder tree ``root/<split>/<class>/<n>.png`` of 20x20 images, reddish or bluish."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    for split, count in (per_class or {"train": 8, "validation": 3, "test": 3}).items():
        for label, colour in colours.items():
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{index}.png")
    return root
