"""LLM and transformer pruning with calibration, block by block: magnitude, Wanda, SparseGPT, OWL."""
from .blocks import BlockLayout, find_blocks
from .engine import (
                     METHODS,
                     BlockInputs,
                     LayerReport,
                     LLMConfig,
                     LLMPlan,
                     capture_inputs,
                     prune_block,
                     prune_llm,
                     run_block,
)
from .pipeline import CheckpointOptions, prune_checkpoint, prune_hf_model

__all__ = ["BlockLayout", "find_blocks", "BlockInputs", "capture_inputs", "run_block", "prune_block",
           "LLMConfig", "LayerReport", "LLMPlan", "prune_llm", "METHODS",
           "CheckpointOptions", "prune_checkpoint", "prune_hf_model"]
