"""Inference engine: paged KV cache, continuous batching, early exit (vLLM v1 style).

Small classes talking through plain data objects: `BlockPool` (physical blocks),
`KVCacheManager` (block tables), `Scheduler` (`SchedulerOutput`, and
`update_from_output` -> `EngineCoreOutput`), `ModelRunner` (packed forward with paged
attention, sampling; owns the CUDA-graph decoder), `EngineCore` (schedule -> execute ->
update), `OutputProcessor` (incremental detokenisation, stop strings), `LLMEngine` (the
two in one thread) and `AsyncEngine` (the core on its own thread, for the server). The
HTTP server lives in `autoglm.inference.server` (imported on demand: it needs FastAPI).
"""

from .block_pool import BlockPool, NoFreeBlocksError
from .engine import LLMEngine
from .engine_core import EngineConfig, EngineCore, EngineStats
from .kv_cache_manager import KVCacheBlocks, KVCacheManager
from .layout import LayoutBuilder, Segment, StepLayout
from .output_processor import IncrementalDetokenizer, OutputProcessor
from .paged_attention import PagedAttention, PagedKVCache
from .request import (EngineCoreOutput, FinishReason, InvalidRequestError, Request, RequestOutput, RequestStatus,
                      SamplingParams)
from .runner import ModelRunner, ModelRunnerOutput
from .sampling import apply_repetition_penalty, sample_token, top_k_filter, top_p_filter
from .scheduler import ScheduledRequest, Scheduler, SchedulerOutput

__all__ = [
    "BlockPool", "NoFreeBlocksError", "EngineConfig", "EngineCore", "EngineStats", "LLMEngine",
    "KVCacheBlocks", "KVCacheManager", "LayoutBuilder", "Segment", "StepLayout", "IncrementalDetokenizer",
    "OutputProcessor", "PagedAttention", "PagedKVCache", "EngineCoreOutput", "FinishReason", "InvalidRequestError",
    "Request", "RequestOutput", "RequestStatus", "SamplingParams", "ModelRunner", "ModelRunnerOutput",
    "apply_repetition_penalty", "sample_token", "top_k_filter", "top_p_filter", "ScheduledRequest", "Scheduler",
    "SchedulerOutput",
]
