"""Router entry point: catalog + upstream channels + cache + usage publisher
-> model router -> gateway -> serve."""

from mariana_common.channels import mesh_channel
from mariana_common.logs import start_telemetry
from mariana_common.redis_client import redis_client
from mariana_common.server import create_server, run, serve
from services.billing.events import UsageStreamSettings
from services.billing.prices import load_prices
from services.billing.reservations import Reservations
from services.moderation.settings import EngineSettings
from services.router.admission import Admission, PromptCounter
from services.router.cache import ResponseCache
from services.router.catalog import PoolConfig, reloading_catalog
from services.router.domain import Inference, Moderation
from services.router.gateway import Gateway
from services.router.moderation_in_process import InProcessModeration
from services.router.remote import OpenAICompatiblePool, read_key
from services.router.routing import ModelRouter, pool_clients
from services.router.servicer import SERVICE_NAME, register
from services.router.settings import RouterSettings
from services.router.spool import Spool
from services.router.upstreams import GrpcInference, GrpcModeration
from services.router.usage import RedisUsagePublisher


async def main() -> None:
    settings = RouterSettings()  # type: ignore[call-arg]
    stream = UsageStreamSettings()
    start_telemetry("router", settings)
    catalog = reloading_catalog(settings.catalog_file)
    channels = {name: mesh_channel(target, settings) for name, target in settings.upstreams.items()}
    upstreams = {name: GrpcInference(channel, settings.inference_timeout_s) for name, channel in channels.items()}
    moderation_channel = mesh_channel(settings.moderation_target, settings) if settings.moderation_target else None
    service = GrpcModeration(moderation_channel, settings.moderation_timeout_s) if moderation_channel else None
    moderation: Moderation
    if settings.moderation == "service" and service is not None:  # the settings make sure it has a target
        moderation = service
    else:
        moderation = InProcessModeration(EngineSettings().moderator())
    client = redis_client(stream.redis_url)
    reservations = Reservations(client)
    usage = RedisUsagePublisher(
        client, stream.usage_stream, reservations, Spool(settings.spool_file), linger_s=settings.usage_linger_s
    )
    usage.start()

    def remote(config: PoolConfig) -> Inference:
        assert config.base_url is not None
        key = read_key(config.api_key_env, config.api_key_file)
        return OpenAICompatiblePool(config.base_url, key, settings.inference_timeout_s)

    gateway = Gateway(
        ModelRouter(catalog, pool_clients(upstreams, remote)),
        upstreams[settings.default_upstream],
        moderation,
        usage,
        settings.output_window_chars,
        ResponseCache(client, lambda: catalog().cache),
        Admission(
            reservations,
            load_prices(settings.prices_file),
            PromptCounter(settings.tokenizer_dir),
            settings.reservation_lease_s,
            fail_open=settings.reservation_failure == "open",
        ),
        settings.default_max_tokens,
        moderation_api=service,
    )
    server = create_server(settings, register(gateway), [SERVICE_NAME])
    try:
        await serve(server, settings)
    finally:
        await usage.close(settings.shutdown_grace_s)
        for channel in channels.values():
            await channel.close(None)
        if moderation_channel is not None:
            await moderation_channel.close(None)
        await client.aclose()


if __name__ == "__main__":
    run(main)
