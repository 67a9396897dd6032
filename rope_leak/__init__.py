"""rope_leak: where does absolute position come from in RoPE language models?"""

__version__ = "0.1.0"
