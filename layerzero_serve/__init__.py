"""layerzero_serve: a runtime library for serving decoder LLMs on GPUs."""

__version__ = "0.1.0"
