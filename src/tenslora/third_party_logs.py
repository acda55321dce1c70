"""Keep third-party notices that do not concern users out of their terminal.

Imported first by the package, before anything imports PEFT (which imports bitsandbytes when it is
installed). Each notice silenced here is about one library's use of another, which users can neither act
on nor avoid, and each extra line would break the command-line tool's promise of one-line errors:

- on CPUs with AVX512-BF16, bitsandbytes warns on every import that an optional accelerated-kernel package
  is missing. It works without it.
- PEFT's ``PeftModel``, wrapping any model, reads transformers' ``is_gradient_checkpointing``, which
  transformers 5 deprecates with a ``FutureWarning`` on every read: once per adapter a user creates or loads.
"""

import logging
import warnings


def _skip_optional_kernel_notice(record: logging.LogRecord) -> bool:
    return "from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_skip_optional_kernel_notice)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
