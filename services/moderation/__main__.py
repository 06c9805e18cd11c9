"""Moderation service entry point: settings -> dependencies -> serve."""

from mariana_common.logs import start_telemetry
from mariana_common.server import create_server, run, serve
from services.moderation.moderator import Moderator
from services.moderation.policy import reloading_policy
from services.moderation.servicer import SERVICE_NAME, register
from services.moderation.settings import ModerationSettings
from services.moderation.toxicity import ToxicityModel


async def main() -> None:
    settings = ModerationSettings()  # type: ignore[call-arg]
    start_telemetry("moderation", settings)
    moderator = Moderator(
        ToxicityModel.load(settings.toxicity_model), reloading_policy(settings.policy_file), settings.blocklist
    )
    server = create_server(settings, register(moderator), [SERVICE_NAME])
    await serve(server, settings)


if __name__ == "__main__":
    run(main)
