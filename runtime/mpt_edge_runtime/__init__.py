"""mpt-edge runtime: torch-free serving of exported bundles (numpy, onnxruntime, tokenizers, safetensors)."""

__version__ = "0.1.0"
