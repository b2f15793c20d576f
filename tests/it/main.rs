//! Integration tests against real PostgreSQL: a throwaway cluster started by
//! `rowlock_testing`, or the server `DATABASE_URL` names. One binary, one cluster.

mod advisory;
mod assignment;
mod bad_input;
mod borrowing;
mod cancellation;
mod claim;
mod conflicts;
mod derive;
mod diagnostics;
mod errors;
mod executor;
mod failover;
mod faults;
mod handle;
mod harness;
mod keys;
mod leases;
mod locking;
mod migrations;
mod own_transaction;
mod pgbouncer;
mod pools;
mod proxy;
mod races;
mod retry;
mod savepoints;
mod sets;
#[cfg(feature = "tracing")] // run by CI with `--features tracing`
mod spans;
mod statements;
mod support;
mod tls;
mod transaction;
mod transitions;
