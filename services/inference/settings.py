from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from mariana_common.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MARIANA_INFERENCE_", extra="ignore", frozen=True)

    model_dir: Path = Field(..., description="A Hugging Face checkpoint directory (config + safetensors + tokenizer).")
    model_id: str | None = Field(None, description="Public name the model is served under; default: the folder's name.")
    backend: Literal["deepspeed", "torch"] = Field(
        "deepspeed",
        description="deepspeed: deepspeed.init_inference (kernel injection on GPU only); torch: plain eager.",
    )
    default_max_tokens: int = Field(256, gt=0, description="max_tokens when a request names none.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")

    def served_model_id(self) -> str:
        return self.model_id or self.model_dir.name
