"""rlhf-lightning: preference data -> reward model -> PPO LoRA policy -> evaluation -> registry -> endpoint."""

# Metaflow packages only .py files beside the flow file unless the library asks to be included.
METAFLOW_PACKAGE_POLICY = "include"

__version__ = "0.1.0"
