"""LLM and transformer pruning with calibration, block by block: magnitude, Wanda, SparseGPT, RIA, ALPS, OWL, DSnoT, N:M permutation."""
# the method modules register themselves with the engine (engine.METHODS) as they are imported
from . import alps, dsnot, magnitude, ria, sparsegpt, wanda  # noqa: F401
from .blocks import BlockLayout, find_block_layout
from .engine import (
                     METHODS,
                     BlockInputs,
                     LayerReport,
                     LLMConfig,
                     LLMPlan,
                     capture_inputs,
                     prune_block,
                     register_method,
                     run_block,
)
from .pipeline import CheckpointOptions, prune_checkpoint, prune_hf_model
from .sequential import prune_llm

find_blocks = find_block_layout  # the name before 0.2; secateurs.blocks.find_blocks is the residual probe

__all__ = ["BlockLayout", "find_block_layout", "find_blocks", "BlockInputs", "capture_inputs", "run_block",
           "prune_block", "LLMConfig", "LayerReport", "LLMPlan", "prune_llm", "METHODS", "register_method",
           "CheckpointOptions", "prune_checkpoint", "prune_hf_model"]
