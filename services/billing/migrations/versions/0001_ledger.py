"""The ledger: usage debits, credits and adjustments, budgets per tenant and key.

Portable SQL (SQLite and PostgreSQL); money and token counts are BIGINT."""

from alembic import op

revision = "0001"
down_revision = None

TABLES = [
    """CREATE TABLE usage_entries (
        request_id        TEXT PRIMARY KEY,
        tenant_id         TEXT NOT NULL,
        key_id            TEXT NOT NULL,
        model             TEXT NOT NULL,
        prompt_tokens     BIGINT NOT NULL CHECK (prompt_tokens >= 0),
        completion_tokens BIGINT NOT NULL CHECK (completion_tokens >= 0),
        finish_reason     TEXT NOT NULL,
        completed_at      DOUBLE PRECISION NOT NULL,
        cost_micros       BIGINT NOT NULL CHECK (cost_micros >= 0)
    )""",
    "CREATE INDEX usage_by_tenant ON usage_entries (tenant_id, completed_at)",
    "CREATE INDEX usage_by_key ON usage_entries (tenant_id, key_id)",
    """CREATE TABLE credits (
        credit_id     TEXT PRIMARY KEY,
        tenant_id     TEXT NOT NULL,
        key_id        TEXT NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('credit', 'adjustment')),
        amount_micros BIGINT NOT NULL CHECK (kind = 'adjustment' OR amount_micros > 0),
        note          TEXT NOT NULL,
        created_at    DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX credits_by_tenant ON credits (tenant_id)",
    """CREATE TABLE budgets (
        tenant_id         TEXT NOT NULL,
        key_id            TEXT NOT NULL,
        hard_limit_micros BIGINT NOT NULL CHECK (hard_limit_micros >= 0),
        soft_limit_micros BIGINT NOT NULL CHECK (soft_limit_micros >= 0),
        soft_alerted      INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, key_id)
    )""",
]


def upgrade() -> None:
    for statement in TABLES:
        op.execute(statement)


def downgrade() -> None:
    for table in ("budgets", "credits", "usage_entries"):
        op.execute(f"DROP TABLE {table}")
