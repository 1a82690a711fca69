"""Models: the built-in registry, loading any local/hub model, and LoRA adapters."""
