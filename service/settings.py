"""Every setting of the service, read once from `ATTENTION_`-prefixed environment variables."""

from functools import cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Access lines wait at most this long to be written, in one batch per interval (see
# service.observability.log_request).
ACCESS_LOG_FLUSH_SECONDS = 0.05

MIB = 2**20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATTENTION_", frozen=True)

    # Limits: a request beyond one is refused, before any work, with the setting named.
    max_body_bytes: int = Field(128 * MIB, ge=1, description="request body size")
    max_tokens: int = Field(4096, ge=1, description="tokens (rows) per input sequence")
    max_batch_size: int = Field(64, ge=1, description="sequences in one batch")
    max_dim: int = Field(
        1024, ge=1, description="d_in, d_out, embedding_dim and the wrapper's concatenated width"
    )
    max_heads: int = Field(64, ge=1, description="attention heads")
    max_context_length: int = Field(8192, ge=1, description="rows of the positional table")
    max_text_chars: int = Field(
        200_000, ge=1, description="characters of text input, all texts of a list together"
    )
    max_attention_floats: int = Field(
        32 * MIB,
        ge=1,
        description="floats in the batch x heads x T x T weights, when they are returned or "
        "dropout needs them (the fused path without weights never holds them)",
    )

    max_answer_floats: int = Field(
        64 * MIB,
        ge=1,
        description="numbers in one answer (weights and context vectors): ~10 bytes of JSON each",
    )
    max_concurrent_computations: int = Field(
        2, ge=1, description="large computations running at once, each on a worker thread"
    )
    max_queued_computations: int = Field(
        16, ge=0, description="large computations waiting for a slot; beyond them, a 503"
    )

    # Caches of seeded modules and of embedding tables (50257 x embedding_dim floats each).
    module_cache_size: int = Field(32, ge=0)
    embedding_cache_size: int = Field(4, ge=0)

    # The inference protocol over gRPC, beside the REST app (service.grpc_server).
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="port of the gRPC inference service; 0 turns it off"
    )
    grpc_host: str = Field(
        "127.0.0.1", description="address the gRPC service listens on (0.0.0.0: every one)"
    )

    # Execution.
    torch_threads: int = Field(0, ge=0, description="intra-op threads; 0 keeps torch's default")
    log_level: str = Field("info", description="level of the service's JSON logs")
    access_log: bool = Field(
        True,
        description="one JSON log line per request, written in batches within "
        f"{ACCESS_LOG_FLUSH_SECONDS * 1000:g} ms",
    )
    inline_work_limit: int = Field(
        200_000,
        ge=0,
        description="multiply-adds below which a request is computed on the event loop; "
        "larger ones go to a worker thread so the loop stays responsive",
    )


@cache
def get_settings() -> Settings:
    return Settings()
