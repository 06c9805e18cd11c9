"""Inference service entry point: settings -> model -> warm-up -> serve.
Health turns SERVING only after the model is loaded and has generated once."""

import asyncio

import structlog
import torch

from mariana_common.logs import configure_logging
from mariana_common.server import create_server, run, serve
from services.inference.engine import Engine, GenerationInput, Sampling
from services.inference.loader import load_model
from services.inference.servicer import SERVICE_NAME, register
from services.inference.settings import InferenceSettings


async def warm_up(engine: Engine) -> None:
    request = GenerationInput(engine.model_id, prompt="Hello", sampling=Sampling(max_tokens=2, temperature=0))
    async for _ in engine.generate(request):
        pass


async def main() -> None:
    settings = InferenceSettings()  # type: ignore[call-arg]
    configure_logging("inference", settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    loaded = await asyncio.to_thread(load_model, settings.model_dir, settings.backend)
    engine = Engine(settings.served_model_id(), loaded, settings.default_max_tokens)
    await warm_up(engine)
    structlog.get_logger().info("warmed up", model=engine.model_id)
    server = create_server(settings, register(engine), [SERVICE_NAME])
    try:
        await serve(server, settings)
    finally:
        engine.close()


if __name__ == "__main__":
    run(main)
