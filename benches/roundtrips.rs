//! Single-client lock-and-update throughput: rowlock against hand-written tokio-postgres, in
//! the same run on the same server, printed as ratios.
//!
//! The workload: lock a random account row `FOR UPDATE`, compute, update it, commit.
//! - `hand 4 trips`: BEGIN, SELECT … FOR UPDATE, UPDATE, COMMIT, each awaited in turn.
//! - `hand 2 trips`: BEGIN + SELECT in one flush, UPDATE + COMMIT in one flush (the fastest
//!   form tokio-postgres allows).
//! - `rowlock`: `with_locked_row` with the UPDATE queued by `execute_on_commit` (2 trips), on
//!   a pool of one connection.
//!
//! The three run in short slices, alternating and rotating which goes first, so drift on a
//! shared machine hits all of them alike; the table gives median tps and the median of the
//! per-round ratios.
//!
//! ```text
//! cargo bench --bench roundtrips            # 15 rounds of 0.4 s slices
//! ROWLOCK_BENCH_SECS=0.1 ROWLOCK_BENCH_ROUNDS=2 cargo bench --bench roundtrips   # smoke
//! ```
//! Uses `DATABASE_URL` if set, else a throwaway cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join;
use rowlock::testing::TestCluster;
use rowlock::tokio_postgres::{Client, Error as PgError, Row, Statement};
use rowlock::{LockOptions, LockableRow, Outcome, Table, with_locked_row};

const ROWS: i64 = 10_000;
const LOCK_SQL: &str = "SELECT * FROM accounts WHERE id = $1 FOR UPDATE";
const UPDATE_SQL: &str = "UPDATE accounts SET balance = $2 WHERE id = $1";

struct Account {
    id: i64,
    balance: i64,
}

impl LockableRow for Account {
    type Key = i64;
    const TABLE: Table = Table::new("accounts");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Account {
            id: row.try_get("id")?,
            balance: row.try_get("balance")?,
        })
    }
    fn key(&self) -> i64 {
        self.id
    }
}

/// xorshift64*: a dependency-free, seeded key generator (same sequence for every run).
struct Keys(u64);
impl Keys {
    fn next(&mut self) -> i64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % ROWS as u64) as i64 + 1
    }
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn hand_four_trips(
    c: &Client,
    lock: &Statement,
    update: &Statement,
    id: i64,
) -> Result<(), PgError> {
    c.batch_execute("BEGIN").await?;
    let row = c.query_one(lock, &[&id]).await?;
    let balance: i64 = row.get("balance");
    c.execute(update, &[&id, &(balance + 1)]).await?;
    c.batch_execute("COMMIT").await
}

async fn hand_two_trips(
    c: &Client,
    lock: &Statement,
    update: &Statement,
    id: i64,
) -> Result<(), PgError> {
    let (begin, row) = join(c.batch_execute("BEGIN"), c.query_one(lock, &[&id])).await;
    begin?;
    let balance: i64 = row?.get("balance");
    let (updated, commit) = join(
        c.execute(update, &[&id, &(balance + 1)]),
        c.batch_execute("COMMIT"),
    )
    .await;
    updated?;
    commit
}

async fn with_rowlock(
    pool: &rowlock::deadpool_postgres::Pool,
    id: i64,
) -> Result<(), rowlock::Error> {
    let outcome = with_locked_row(pool, &id, &LockOptions::new(), |tx, acc: Account| {
        Box::pin(async move {
            let update = tx.prepare_cached(UPDATE_SQL).await?;
            tx.execute_on_commit(&update, vec![Box::new(acc.id), Box::new(acc.balance + 1)]);
            Ok::<_, rowlock::Error>(())
        })
    })
    .await?;
    match outcome {
        Outcome::Done(()) => Ok(()),
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Impl {
    HandFour,
    HandTwo,
    Rowlock,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::HandFour => "hand-written, 4 round trips",
            Impl::HandTwo => "hand-written, 2 round trips",
            Impl::Rowlock => "rowlock with_locked_row",
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let secs = env_f64("ROWLOCK_BENCH_SECS", 0.4);
    let rounds = (env_f64("ROWLOCK_BENCH_ROUNDS", 15.0) as usize).max(1);
    let duration = Duration::from_secs_f64(secs);
    let cluster = Arc::new(TestCluster::from_env()?);
    let db = cluster.create_database_owned().await?;
    let admin = db.client().await?;
    admin
        .batch_execute(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, 0 FROM generate_series(1, 10000) g;",
        )
        .await?;
    admin.batch_execute("VACUUM ANALYZE accounts").await?;
    let client = db.client().await?;
    let lock = client.prepare(LOCK_SQL).await?;
    let update = client.prepare(UPDATE_SQL).await?;
    let pool = db.pool(1);

    let impls = [Impl::HandFour, Impl::HandTwo, Impl::Rowlock];
    // ROWLOCK_BENCH_ONLY=0|1|2 runs one implementation alone (for profiling).
    let only: Option<usize> = std::env::var("ROWLOCK_BENCH_ONLY")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); impls.len()];
    let mut committed = 0_i64;
    let mut keys = Keys(0x9E37_79B9_7F4A_7C15);
    // Warm up: prepare statements on the pooled connection, fill caches.
    for _ in 0..200 {
        with_rowlock(&pool, keys.next()).await?;
        hand_two_trips(&client, &lock, &update, keys.next()).await?;
        committed += 2;
    }
    for round in 0..rounds {
        for k in 0..impls.len() {
            let i = (round + k) % impls.len();
            let which = &impls[i];
            if only.is_some_and(|o| o != i) {
                tps[i].push(f64::NAN);
                continue;
            }
            let started = Instant::now();
            let mut n = 0_u64;
            while started.elapsed() < duration {
                let id = keys.next();
                match which {
                    Impl::HandFour => hand_four_trips(&client, &lock, &update, id).await?,
                    Impl::HandTwo => hand_two_trips(&client, &lock, &update, id).await?,
                    Impl::Rowlock => with_rowlock(&pool, id).await?,
                }
                n += 1;
            }
            committed += n as i64;
            tps[i].push(n as f64 / started.elapsed().as_secs_f64());
        }
    }
    let total: i64 = admin
        .query_one("SELECT sum(balance)::int8 FROM accounts", &[])
        .await?
        .get(0);
    let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let median = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "\nlock + update + commit, 1 client, PostgreSQL {version}, {} cores, {rounds} round(s) of {secs} s slices",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("\n| implementation | tps (median) | rowlock / this (median of per-round ratios) |");
    println!("|---|---:|---:|");
    for (i, which) in impls.iter().enumerate() {
        let ratios: Vec<f64> = tps[2].iter().zip(&tps[i]).map(|(r, t)| r / t).collect();
        println!(
            "| {} | {:.0} | {:.2} |",
            which.name(),
            median(&tps[i]),
            median(&ratios)
        );
    }
    println!(
        "\ncheck: sum of balances {total} = committed transactions {committed}: {}",
        if total == committed { "ok" } else { "MISMATCH" }
    );
    drop((client, admin, pool, db));
    drop(cluster);
    if total != committed {
        return Err("correctness check failed".into());
    }
    Ok(())
}
