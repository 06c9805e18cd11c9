"""Running spend per key and per tenant (key_id '' for the tenant), kept in
the transaction that records usage: a budget check reads one row instead of
summing every usage row the tenant ever had (auth asks every few seconds, and
that sum grew with the ledger)."""

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.execute(
        """CREATE TABLE spend (
            tenant_id    TEXT NOT NULL,
            key_id       TEXT NOT NULL,
            spent_micros BIGINT NOT NULL CHECK (spent_micros >= 0),
            PRIMARY KEY (tenant_id, key_id)
        )"""
    )
    op.execute(
        "INSERT INTO spend (tenant_id, key_id, spent_micros) "
        "SELECT tenant_id, key_id, SUM(cost_micros) FROM usage_entries GROUP BY tenant_id, key_id"
    )
    op.execute(
        "INSERT INTO spend (tenant_id, key_id, spent_micros) "
        "SELECT tenant_id, '', SUM(cost_micros) FROM usage_entries GROUP BY tenant_id"
    )


def downgrade() -> None:
    op.execute("DROP TABLE spend")
