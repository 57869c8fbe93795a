"""ftflow: a Prefect-orchestrated fine-tuning pipeline for Hugging Face causal LMs."""

__version__ = "0.1.0"
