"""Loads a Hugging Face checkpoint directory for one of the backends:

- `torch`: eager PyTorch.
- `deepspeed`: `deepspeed.init_inference`; with kernel injection (DeepSpeed's
  fused transformer kernels) and `tp_size`-way tensor parallelism on GPUs; on a
  CPU DeepSpeed wraps the module without kernels.
- `torch-int8`: eager PyTorch with every Linear layer dynamically quantized to
  int8 (CPU only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mariana_common.errors import Unavailable

log = structlog.get_logger()

Backend = Literal["torch", "deepspeed", "torch-int8"]


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM (possibly wrapped or quantized)
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


def _deepspeed(model: Any, dtype: torch.dtype, device: str, tp_size: int) -> Any:
    import deepspeed  # heavy import; only when asked for

    engine = deepspeed.init_inference(
        model,
        dtype=dtype,
        tensor_parallel={"tp_size": tp_size},
        # Fused kernels exist for GPUs only.
        replace_with_kernel_inject=device == "cuda",
    )
    return engine.module


def load_model(model_dir: Path, backend: Backend, tp_size: int = 1) -> LoadedModel:
    if not (model_dir / "config.json").exists():
        raise Unavailable(f"no model at {model_dir}: run `make model` to prepare it")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "torch-int8" and device != "cpu":
        raise ValueError("torch-int8 is a CPU backend")
    dtype = torch.float16 if device == "cuda" else torch.float32
    started = time.monotonic()
    log.info("loading model", model_dir=str(model_dir), backend=backend, device=device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    if backend == "deepspeed":
        model = _deepspeed(model, dtype, device, tp_size)
    elif backend == "torch-int8":
        model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    log.info("model loaded", seconds=round(time.monotonic() - started, 2), context_length=context)
    return LoadedModel(model, tokenizer, backend, device, context, _eos_ids(model, tokenizer))
