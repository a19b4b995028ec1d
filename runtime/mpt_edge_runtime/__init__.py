"""mpt-edge runtime: serve every task of an exported bundle from one ONNX graph, with no torch.

    import mpt_edge_runtime as mer
    engine = mer.load("bundle/", device="auto")     # "cpu", "cuda" (an error if CUDA cannot be had), "auto"
    engine.classify("sentiment", ["great film"])     # [Prediction(task, label, score, probabilities)]
    engine.run([("sentiment", "great"), ("topic", "goal!")])
"""

from mpt_edge_runtime.engine import Engine, Prediction, load
from mpt_edge_runtime.errors import BundleError, DeviceError, InputError, MptEdgeRuntimeError, UnknownTaskError

__version__ = "0.1.0"
__all__ = ["load", "Engine", "Prediction", "BundleError", "DeviceError", "InputError", "MptEdgeRuntimeError",
           "UnknownTaskError", "__version__"]
