"""Moderation service entry point: settings -> dependencies -> serve."""

from mariana_common.logs import start_telemetry
from mariana_common.server import create_server, run, serve
from services.moderation.servicer import SERVICE_NAME, register
from services.moderation.settings import ModerationSettings


async def main() -> None:
    settings = ModerationSettings()  # type: ignore[call-arg]
    start_telemetry("moderation", settings)
    server = create_server(settings, register(settings.moderator()), [SERVICE_NAME])
    await serve(server, settings)


if __name__ == "__main__":
    run(main)
