"""WordNet supersense classification: the default task, read from a file shipped in the package (offline).

Each example is a noun or verb synset written as ``"<first lemma>: <definition>"``; its label is the synset's
lexicographer file ("supersense"), e.g. ``noun.animal`` or ``verb.motion``. The shipped file is derived from
WordNet 3.0 by ``scripts/build_wordnet_dataset.py`` (license: ``WORDNET_LICENSE`` beside it).
"""

from __future__ import annotations

from pathlib import Path

from datasets import ClassLabel, DatasetDict, Features, Value, load_dataset

from .errors import DataError
from .splits import hash_split, subsample

DATA_FILE = Path(__file__).with_name("wordnet_supersense.jsonl.gz")

LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
"""WordNet 3.0's lexicographer files, indexed by file number (lexnames(5WN); Debian ships no ``lexnames`` file)."""

SUPERSENSES = tuple(name for name in LEXNAMES if name.startswith(("noun.", "verb.")))
"""The 41 labels (26 noun, 15 verb). Adjective and adverb files are left out: their names mostly encode the part
of speech, not a meaning."""

SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}

FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=list(SUPERSENSES)),
                     "pos": Value("string"), "offset": Value("string")})


def wordnet_splits(path: str | None = None) -> DatasetDict:
    """All synsets split 80/10/10 by a hash of the synset id, so the split never depends on a seed or a size.

    ``path``: another file in the shipped file's format (default: the shipped file).
    """
    path = Path(path) if path else DATA_FILE
    if not path.is_file():
        raise DataError(f"WordNet supersense file {path} not found; check --data-dir, or rebuild the file with "
                        "scripts/build_wordnet_dataset.py")
    dataset = load_dataset("json", data_files=str(path), features=FEATURES, split="train")
    keys = [pos + offset for pos, offset in zip(dataset["pos"][:], dataset["offset"][:], strict=True)]
    return hash_split(dataset, keys, SHARES)


def load_wordnet_supersense(seed: int = 0, max_train: int | None = None, max_validation: int | None = None,
                            max_test: int | None = None, path: str | None = None) -> DatasetDict:
    """The train/validation/test splits, each cut to at most ``max_*`` rows (see ``subsample`` for how)."""
    return subsample(wordnet_splits(path), {"train": max_train, "validation": max_validation, "test": max_test},
                     seed)
