"""Inference engine: paged KV cache, continuous batching, early exit (vLLM v1 style).

Small classes talking through plain data objects: `BlockPool` (physical blocks),
`KVCacheManager` (block tables), `Scheduler` (`SchedulerOutput`), `ModelRunner` (packed
forward with paged attention), `LLMEngine` (requests in, streamed tokens out). The HTTP
server lives in `autoglm.inference.server` (imported on demand: it needs FastAPI).
"""

from .block_pool import BlockPool, NoFreeBlocksError
from .early_exit import EarlyExitObjective
from .engine import EngineConfig, EngineStats, LLMEngine
from .kv_cache_manager import KVCacheBlocks, KVCacheManager
from .request import FinishReason, Request, RequestOutput, RequestStatus, SamplingParams
from .runner import ModelRunner, PagedAttention, PagedKVCache
from .sampling import apply_repetition_penalty, sample_token, top_k_filter, top_p_filter
from .scheduler import ScheduledRequest, Scheduler, SchedulerOutput

__all__ = [
    "BlockPool", "NoFreeBlocksError", "EarlyExitObjective", "EngineConfig", "EngineStats", "LLMEngine", "KVCacheBlocks",
    "KVCacheManager", "FinishReason", "Request", "RequestOutput", "RequestStatus", "SamplingParams",
    "ModelRunner", "PagedAttention", "PagedKVCache", "apply_repetition_penalty", "sample_token",
    "top_k_filter", "top_p_filter", "ScheduledRequest", "Scheduler", "SchedulerOutput",
]
