"""loraxs: LoRA-XS and LoRA-SB adapters for Hugging Face transformers models."""

__version__ = "0.1.0"
