"""Keep third-party import-time notices that do not concern users out of their terminal.

Imported first by the package, before anything imports PEFT (which imports bitsandbytes when it is
installed): on CPUs with AVX512-BF16, bitsandbytes warns on every import that an optional
accelerated-kernel package is missing. It works without it, and the extra line would break the
command-line tool's promise of one-line errors.
"""

import logging


def _skip_optional_kernel_notice(record: logging.LogRecord) -> bool:
    return "from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_skip_optional_kernel_notice)
