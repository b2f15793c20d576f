//! The guide: how rowlock behaves, chapter by chapter, with examples that compile. Start with
//! the [crate docs](crate) (the README), then read the chapter you need.
//!
//! | chapter | what it covers |
//! |---|---|
//! | [`handle`] | the [`Db`](crate::Db) handle, row types, closures that borrow |
//! | [`outcomes`] | the one [`Outcome`](crate::Outcome) vocabulary; every failure, its kind, whether it is retried; drops |
//! | [`retries`] | retry policies, what is retried, commits whose outcome is unknown |
//! | [`lock_sets`] | rows of several tables in one deadlock-free order, a mode per table |
//! | [`claims`] | `SKIP LOCKED` work claiming, marks, leases, advisory locks |
//! | [`transitions`] | one conditional statement when the decision is a predicate |
//! | [`savepoints`] | your own transaction, savepoints, repository functions |
//! | [`migrations`] | `ALTER TABLE` while connections are pooled |
//! | [`pgbouncer`] | PgBouncer in transaction pooling mode |
//! | [`high_availability`] | Patroni, etcd and HAProxy (and PgBouncer): settings and measured failovers; multi-host URLs; unknown commits |
//! | [`round_trips`] | what each call costs on the wire |
//! | [`testing`] | the test harness and deterministic interleavings |

#[doc = include_str!("../docs/guide/handle.md")]
pub mod handle {}
#[doc = include_str!("../docs/guide/outcomes.md")]
pub mod outcomes {}
#[doc = include_str!("../docs/guide/retries.md")]
pub mod retries {}
#[doc = include_str!("../docs/guide/lock_sets.md")]
pub mod lock_sets {}
#[doc = include_str!("../docs/guide/claims.md")]
pub mod claims {}
#[doc = include_str!("../docs/guide/transitions.md")]
pub mod transitions {}
#[doc = include_str!("../docs/guide/savepoints.md")]
pub mod savepoints {}
#[doc = include_str!("../docs/guide/migrations.md")]
pub mod migrations {}
#[doc = include_str!("../docs/guide/pgbouncer.md")]
pub mod pgbouncer {}
#[doc = include_str!("../docs/guide/high_availability.md")]
pub mod high_availability {}
#[doc = include_str!("../docs/guide/round_trips.md")]
pub mod round_trips {}
#[doc = include_str!("../docs/guide/testing.md")]
pub mod testing {}
