"""Router entry point: upstream channels + usage publisher -> gateway -> serve."""

import redis.asyncio as redis

from mariana_common.channels import mesh_channel
from mariana_common.logs import configure_logging
from mariana_common.server import create_server, run, serve
from services.billing.events import UsageStreamSettings
from services.router.gateway import Gateway
from services.router.servicer import SERVICE_NAME, register
from services.router.settings import RouterSettings
from services.router.upstreams import GrpcInference, GrpcModeration
from services.router.usage import RedisUsagePublisher


async def main() -> None:
    settings = RouterSettings()  # type: ignore[call-arg]
    stream = UsageStreamSettings()
    configure_logging("router", settings.log_level)
    inference_channel = mesh_channel(settings.inference_target, settings)
    moderation_channel = mesh_channel(settings.moderation_target, settings)
    client = redis.Redis.from_url(stream.redis_url)
    usage = RedisUsagePublisher(client, stream.usage_stream)
    usage.start()
    gateway = Gateway(
        GrpcInference(inference_channel, settings.inference_timeout_s),
        GrpcModeration(moderation_channel, settings.moderation_timeout_s),
        usage,
        settings.output_window_chars,
    )
    server = create_server(settings, register(gateway), [SERVICE_NAME])
    try:
        await serve(server, settings)
    finally:
        await usage.close(settings.shutdown_grace_s)
        await inference_channel.close(None)
        await moderation_channel.close(None)
        await client.aclose()


if __name__ == "__main__":
    run(main)
