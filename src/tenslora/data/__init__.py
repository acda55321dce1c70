"""The data layer: task names or user files to checked train/validation/test splits for a Hugging Face Trainer.

    spec = get_task("glue-cola", source="glue/")        # or custom_text_task(...), custom_image_task(...)
    data = load_task(spec, max_train=4000, seed=0)      # DatasetDict with a ClassLabel "label" column
    data = tokenize_text_task(data, tokenizer, spec, max_length=128)
    scores = compute_metrics(spec, logits, labels)

Causal-LM data (``causal_lm.py``): ``causal_lm_task`` -> ``load_causal_lm_task`` -> ``tokenize_causal_lm``, padded by
``CausalLmCollator``.

Bad input raises ``DataError`` with a one-line message.
"""

from .causal_lm import CausalLmCollator, causal_lm_task, load_causal_lm_task, tokenize_causal_lm
from .custom import CUSTOM_TASK, custom_image_task, custom_text_task
from .errors import DataError
from .metrics import compute_metrics
from .preprocess import image_transform, tokenize_text_task
from .splits import complete_splits, subsample
from .tasks import BUILTIN_TASKS, CAUSAL_LM_TASK, DEFAULT_TASK, FILE_TASKS, TaskSpec, get_task, load_task
from .wordnet import SUPERSENSES, load_wordnet_supersense

__all__ = [
    "BUILTIN_TASKS",
    "CAUSAL_LM_TASK",
    "CUSTOM_TASK",
    "DEFAULT_TASK",
    "FILE_TASKS",
    "SUPERSENSES",
    "CausalLmCollator",
    "DataError",
    "TaskSpec",
    "causal_lm_task",
    "complete_splits",
    "compute_metrics",
    "custom_image_task",
    "custom_text_task",
    "get_task",
    "image_transform",
    "load_causal_lm_task",
    "load_task",
    "load_wordnet_supersense",
    "subsample",
    "tokenize_causal_lm",
    "tokenize_text_task",
]
