"""Moderation service entry point: settings -> dependencies -> serve."""

from mariana_common.logs import configure_logging
from mariana_common.server import create_server, run, serve
from services.moderation.moderator import Moderator
from services.moderation.servicer import SERVICE_NAME, register
from services.moderation.settings import ModerationSettings


async def main() -> None:
    settings = ModerationSettings()  # type: ignore[call-arg]
    configure_logging("moderation", settings.log_level)
    server = create_server(settings, register(Moderator(settings.blocklist)), [SERVICE_NAME])
    await serve(server, settings)


if __name__ == "__main__":
    run(main)
