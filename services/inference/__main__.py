"""Inference service entry point: settings -> models -> warm-up -> serve.
Health turns SERVING only after every model is loaded and has generated once;
on SIGTERM new requests are refused and admitted ones finish (within the grace)."""

import asyncio
from pathlib import Path

import structlog
import torch

from mariana_common.logs import configure_logging
from mariana_common.server import create_server, run, serve
from services.inference.embedder import Embedder, packaged_minilm
from services.inference.engine import Engine, GenerationInput, Sampling
from services.inference.loader import load_model
from services.inference.scheduler import Limits
from services.inference.servicer import SERVICE_NAME, register
from services.inference.settings import InferenceSettings

log = structlog.get_logger()


async def warm_up(engine: Engine) -> None:
    request = GenerationInput(engine.model_id, prompt="Hello", sampling=Sampling(max_tokens=2, temperature=0))
    async for _ in engine.generate(request):
        pass


async def main() -> None:
    settings = InferenceSettings()  # type: ignore[call-arg]
    configure_logging("inference", settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    limits = Limits(settings.max_batch, settings.max_waiting, settings.kv_budget_tokens, settings.prefill_chunk)
    engines: dict[str, Engine] = {}
    for model_dir in [settings.model_dir, *settings.extra_model_dirs]:
        model_id = settings.served_model_id() if model_dir == settings.model_dir else Path(model_dir).name
        loaded = await asyncio.to_thread(load_model, model_dir, settings.backend, settings.tp_size)
        engines[model_id] = Engine(model_id, loaded, settings.default_max_tokens, limits)
        await warm_up(engines[model_id])
        log.info("warmed up", model=model_id, backend=settings.backend)
    embedder = None
    if settings.embedding_model_id:
        directory = settings.embedding_model_dir or packaged_minilm()
        embedder = await asyncio.to_thread(Embedder, settings.embedding_model_id, directory)

    async def drain() -> None:
        results = await asyncio.gather(*(e.drain(settings.shutdown_grace_s) for e in engines.values()))
        log.info("drained", all_finished=all(results))

    server = create_server(settings, register(engines, embedder), [SERVICE_NAME])
    try:
        await serve(server, settings, before_stop=drain)
    finally:
        for engine in engines.values():
            engine.close()
        if embedder is not None:
            embedder.close()


if __name__ == "__main__":
    run(main)
