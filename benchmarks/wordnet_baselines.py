"""Non-neural baselines for WordNet supersense classification, on the split and subsets the CLI trains on.

Prints the test accuracy of the majority class and of TF-IDF features (word 1-2-grams, optionally with character
2-5-grams) under a linear SVM (scikit-learn defaults, C=1). Fine-tuned adapters should beat these.

    python benchmarks/wordnet_baselines.py                    # full split: 76,501 train / 9,708 test synsets
    python benchmarks/wordnet_baselines.py --max-train 6000 --max-test 2000   # the default run's subsets
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import Pipeline, make_pipeline, make_union
from sklearn.svm import LinearSVC

from tenslora.data import load_wordnet_supersense


def word_features() -> TfidfVectorizer:
    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)


def char_features() -> TfidfVectorizer:
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)


MODELS = {
    "tfidf-words+svm": lambda: make_pipeline(word_features(), LinearSVC(C=1.0)),
    "tfidf-words+chars+svm": lambda: make_pipeline(make_union(word_features(), char_features()), LinearSVC(C=1.0)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="chooses the training subset")
    args = parser.parse_args()

    data = load_wordnet_supersense(seed=args.seed, max_train=args.max_train, max_test=args.max_test)
    train, test = data["train"], data["test"]
    print(f"WordNet supersenses: {len(train)} train, {len(test)} test, "
          f"{train.features['label'].num_classes} classes")

    majority = Counter(train["label"]).most_common(1)[0][0]
    print(f"{'majority-class':24s} test accuracy {sum(label == majority for label in test['label']) / len(test):.4f}")
    for name, build in MODELS.items():
        start = time.perf_counter()
        model: Pipeline = build().fit(train["text"], train["label"])
        accuracy = model.score(test["text"], test["label"])
        print(f"{name:24s} test accuracy {accuracy:.4f}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
