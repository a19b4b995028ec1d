"""mpt-edge runtime: serve every task of an exported bundle from one ONNX graph, with no torch.

    import mpt_edge_runtime as mer
    engine = mer.load("bundle/", device="auto")     # "cpu", "cuda" (an error if CUDA cannot be had), "auto"
    engine.classify("sentiment", ["great film"])     # [Prediction(task, label, score, probabilities)]
    engine.run([("sentiment", "great"), ("topic", "goal!")])
    engine.generate("answer", ["Q: 2 + 2?"], mer.SamplingParams(max_new_tokens=8, temperature=0.7, seed=0))
"""

from mpt_edge_runtime.classifier import Prediction
from mpt_edge_runtime.engine import Engine, load
from mpt_edge_runtime.errors import BundleError, DeviceError, InputError, MptEdgeRuntimeError, UnknownTaskError
from mpt_edge_runtime.manifest import Manifest
from mpt_edge_runtime.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["load", "Engine", "Prediction", "SamplingParams", "Manifest", "BundleError", "DeviceError", "InputError",
           "MptEdgeRuntimeError", "UnknownTaskError", "__version__"]
