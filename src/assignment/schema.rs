//! The schema, applied idempotently.

use crate::{Db, Error, TransactionOptions};

/// The partial unique index that allows at most one accepted proposal per project: the safety
/// net under the lock.
pub const ONE_ACCEPTED_INDEX: &str = "proposals_one_accepted";

/// Serialises concurrent `migrate` calls (`CREATE … IF NOT EXISTS` is not safe against a
/// concurrent creator).
const MIGRATE_LOCK: i64 = 0x726f_776c_6f63_6b01;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS projects (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title      text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    status     text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'assigned')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS proposals (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES projects (id),
    freelancer text NOT NULL CHECK (length(freelancer) BETWEEN 1 AND 100),
    status     text NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'accepted', 'rejected', 'withdrawn')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, freelancer)
);
CREATE UNIQUE INDEX IF NOT EXISTS proposals_one_accepted
    ON proposals (project_id) WHERE status = 'accepted';
";

/// Creates the tables, constraints and indexes if they do not exist. Safe to call at every
/// start-up and from several processes at once.
pub async fn migrate(db: &Db) -> Result<(), Error> {
    db.with_transaction(TransactionOptions::new(), |tx| {
        Box::pin(async move {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
                .await?;
            tx.batch_execute(SCHEMA).await
        })
    })
    .await
}
