"""mpt-edge exporter: backbone family adapters (how a prompt enters each family) and, later, ONNX export."""

__version__ = "0.1.0"
