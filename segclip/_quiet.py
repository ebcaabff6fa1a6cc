"""Log records segclip's own commands drop (``segclip``, ``python -m segclip.bench``, the scripts in
benchmarks/). A leaf module: the CLI and the bench engine both call it, neither through the other.
"""

from __future__ import annotations

import logging


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." record, and only that one.

    NOTE: [CUDA_HOME notice] torch.utils.cpp_extension logs it at import whenever a CUDA toolkit is
    installed but no GPU is visible. segclip never compiles at run time, yet the module gets imported
    by torch.utils.benchmark (segclip bench, the demo's timers) and by torch.compile's C++ builder;
    on a CPU machine with a toolkit the line reads like a problem with segclip's CUDA kernels. A
    filter on that logger keeps every other record torch logs there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def silence_cuda_home_notice() -> None:
    """Installs the filter of note [CUDA_HOME notice] (idempotent); segclip's commands call it."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())
