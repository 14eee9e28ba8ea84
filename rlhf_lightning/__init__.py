"""rlhf-lightning: preference data -> reward model -> PPO LoRA policy -> evaluation -> registry -> endpoint."""

import logging
import warnings

# Metaflow packages only .py files beside the flow file unless the library asks to be included.
METAFLOW_PACKAGE_POLICY = "include"

__version__ = "0.1.0"


class _DropLines(logging.Filter):
    """Drops the log records that start with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Lines every step printed that concern no run of this project (a filter sits on the logger that makes
# the record, so it is installed before those modules log, and holds whatever handlers are set later):
# - bitsandbytes, imported by peft whether or not anything is quantised, tries at import to fetch a
#   faster CPU 4-bit kernel from the Hugging Face kernels hub (not installed, and offline here) and
#   falls back to its own kernel, which the 4-bit path uses;
# - Lightning's advertisements for its cloud products ("Tip: ... litlogger / litmodels").
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropLines("Failed to load CPU gemm_4bit_forward"))
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLines("💡 Tip:"))
# transformers 5 deprecates a property that peft still reads whenever it wraps or loads an adapter.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
