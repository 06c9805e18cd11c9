from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from mariana_common.settings import ServiceSettings
from services.inference.loader import Backend


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIANA_INFERENCE_", extra="ignore", frozen=True)

    model_dir: Path = Field(..., description="A Hugging Face checkpoint directory (config + safetensors + tokenizer).")
    extra_model_dirs: list[Path] = Field(
        default_factory=list, description="More chat models served by this process (JSON list); each is its own engine."
    )
    model_id: str | None = Field(None, description="Public name of model_dir's model; default: the folder's name.")
    backend: Backend | Literal["echo"] = Field(
        "deepspeed",
        description="deepspeed (init_inference; kernel injection on GPU), torch (eager) or torch-int8 (CPU); "
        "echo answers without a model, for measuring the platform only.",
    )
    echo_completion_tokens: int = Field(16, gt=0, description="echo backend: completion tokens per answer.")
    echo_chunk_tokens: int = Field(4, gt=0, description="echo backend: tokens per streamed chunk.")
    echo_chunk_interval_s: float = Field(0.0, ge=0, description="echo backend: pause before each chunk.")
    tp_size: int = Field(1, ge=1, description="Tensor-parallel degree for the deepspeed backend on GPUs.")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens when a request names none.")
    max_batch: int = Field(32, gt=0, description="Sequences decoded together at most (batch slots).")
    max_waiting: int = Field(128, ge=0, description="Admitted requests waiting for a slot, at most.")
    kv_budget_tokens: int = Field(
        65_536, gt=0, description="KV cache budget: prompt + max_tokens summed over admitted requests."
    )
    prefill_chunk: int = Field(512, gt=0, description="Prompt tokens (padded) prefilled per scheduler iteration.")
    embedding_model_dir: Path | None = Field(
        None, description="Encoder checkpoint for /v1/embeddings; default: the packaged all-MiniLM-L6-v2."
    )
    embedding_model_id: str = Field("all-minilm-l6-v2", description="Public name of the embedding model.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")

    def served_model_id(self) -> str:
        return self.model_id or self.model_dir.name
