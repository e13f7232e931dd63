"""The abstract interface of every plugin kind (and of the non-transformers tokenizers loaders return)."""

from tessera.core.interfaces.attention import AttentionBackend, AttentionMetadata
from tessera.core.interfaces.guided import Grammar, GuidedConstraint, GuidedDecodingBackend
from tessera.core.interfaces.model import ModelArchitecture
from tessera.core.interfaces.platform import Platform
from tessera.core.interfaces.quantization import (
    EmbeddingMethod,
    GroupQuantKernel,
    LinearMethod,
    QuantizationMethod,
)
from tessera.core.interfaces.reasoning import ReasoningParser
from tessera.core.interfaces.tokenizer import Tokenizer
from tessera.core.interfaces.tool_parser import (
    DeltaToolCall,
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    ToolParserDelta,
)
from tessera.core.interfaces.weight_loader import LoadedModelFiles, WeightLoader

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "DeltaToolCall",
    "ExtractedToolCalls",
    "Grammar",
    "GuidedConstraint",
    "GuidedDecodingBackend",
    "EmbeddingMethod",
    "GroupQuantKernel",
    "LinearMethod",
    "LoadedModelFiles",
    "ModelArchitecture",
    "Platform",
    "QuantizationMethod",
    "ReasoningParser",
    "Tokenizer",
    "ToolCall",
    "ToolParser",
    "ToolParserDelta",
    "WeightLoader",
]
