"""glotkit: adapt language models to low-resource languages from one YAML recipe."""

__version__ = "0.1.0"
