"""SAFFU language models: explicit (closed-form) solution, fine-tuning and evaluation."""

__version__ = "0.1.0"
