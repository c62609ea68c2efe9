"""slim: FP8-static and W4A8 post-training quantization for giant Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
