"""The model as an op graph: recorded at the aten level from one (fake) forward pass."""
from .trace import Graph, OpNode, TensorNode, trace

__all__ = ["Graph", "OpNode", "TensorNode", "trace"]
