"""Loads a Hugging Face checkpoint directory and wraps it for the configured
backend."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mariana_common.errors import Unavailable

log = structlog.get_logger()


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, or the module DeepSpeed wraps
    tokenizer: PreTrainedTokenizerBase
    backend: str
    device: str
    context_length: int
    eos_token_ids: frozenset[int]


def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_model(model_dir: Path, backend: str) -> LoadedModel:
    if not (model_dir / "config.json").exists():
        raise Unavailable(f"no model at {model_dir}: run `make model` to prepare it")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    started = time.monotonic()
    log.info("loading model", model_dir=str(model_dir), backend=backend, device=device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    if backend == "deepspeed":
        import deepspeed  # heavy import; only when asked for

        engine = deepspeed.init_inference(
            model,
            dtype=dtype,
            # Fused kernels exist for GPUs only; on CPU DeepSpeed runs the module as is.
            replace_with_kernel_inject=device == "cuda",
        )
        model = engine.module
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    log.info("model loaded", seconds=round(time.monotonic() - started, 2), context_length=context)
    return LoadedModel(model, tokenizer, backend, device, context, _eos_ids(model, tokenizer))
