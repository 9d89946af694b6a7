"""Regiongate: a region-aware gateway for OpenAI-compatible model APIs."""

__version__ = "0.1.0"
