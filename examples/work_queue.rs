//! A work queue drained by concurrent workers with `SKIP LOCKED` claims.
//!
//! N workers claim batches of pending tasks, mark them done in the same transaction, and stop
//! when nothing is left. The program then checks that every task was processed exactly once.
//!
//! ```text
//! cargo run --release --example work_queue -- --workers 8 --tasks 10000 --batch 50
//! ```
//!
//! Runs on `DATABASE_URL`, or on a throwaway cluster when it is unset.

use std::sync::Arc;
use std::time::Instant;

use rowlock::{Claim, Compare, Direction, LockableRow, Outcome};
use rowlock_testing::TestCluster;

const SCHEMA: &str = "
    CREATE TABLE tasks (
        id bigint PRIMARY KEY,
        status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done')),
        processed_by int,
        processed_count int NOT NULL DEFAULT 0
    );
    -- The claim's filter is status = 'pending' and its order is id: this index makes the
    -- claim an index scan that stops after `batch` unlocked rows.
    CREATE INDEX tasks_pending ON tasks (id) WHERE status = 'pending';";

const MARK_DONE: &str = "UPDATE tasks SET status = 'done', processed_by = $2, \
                         processed_count = processed_count + 1 WHERE id = ANY($1)";

#[derive(LockableRow)]
#[rowlock(table = "tasks", key = "id")]
struct Task {
    id: i64,
}

struct Args {
    workers: usize,
    tasks: i64,
    batch: usize,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        workers: 8,
        tasks: 10_000,
        batch: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.clone(), None),
        };
        let mut value = || -> Result<String, Box<dyn std::error::Error>> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value").into())
        };
        match name.as_str() {
            "--workers" => args.workers = value()?.parse()?,
            "--tasks" => args.tasks = value()?.parse()?,
            "--batch" => args.batch = value()?.parse()?,
            "--help" | "-h" => {
                println!("usage: work_queue [--workers N] [--tasks M] [--batch B]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}; try --help").into()),
        }
    }
    if args.workers == 0 || args.batch == 0 || args.tasks < 0 {
        return Err("--workers and --batch must be at least 1, --tasks at least 0".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let cluster = Arc::new(TestCluster::from_env()?);
    let pg = cluster.create_database_owned().await?;
    let admin = pg.client().await?;
    admin.batch_execute(SCHEMA).await?;
    admin
        .execute(
            "INSERT INTO tasks (id) SELECT g FROM generate_series(1, $1::int8) g",
            &[&args.tasks],
        )
        .await?;
    admin.batch_execute("ANALYZE tasks").await?;
    println!(
        "{} workers draining {} tasks in batches of {}",
        args.workers, args.tasks, args.batch
    );

    let db = pg.db(args.workers);
    let claim = Arc::new(
        Claim::new()
            .filter("status", Compare::Eq, "pending")
            .order_by("id", Direction::Asc),
    );
    let started = Instant::now();
    let workers: Vec<_> = (0..args.workers)
        .map(|w| {
            let (db, claim, batch) = (db.clone(), claim.clone(), args.batch);
            tokio::spawn(async move {
                let worker = w as i32;
                let mut processed = 0_usize;
                while let Outcome::Done(n) = db
                    .claim(&claim, batch, |tx, tasks: Vec<Task>| {
                        Box::pin(async move {
                            let ids: Vec<i64> = tasks.iter().map(|t| t.id).collect();
                            let n = ids.len();
                            // Sent together with COMMIT: one round trip for both.
                            let done = tx.prepare_cached(MARK_DONE).await?;
                            tx.execute_on_commit(&done, &[&ids, &worker]).await?;
                            Ok::<_, rowlock::Error>(n)
                        })
                    })
                    .await?
                {
                    processed += n;
                }
                Ok::<_, rowlock::Error>(processed)
            })
        })
        .collect();
    let mut counts = Vec::with_capacity(workers.len());
    for worker in workers {
        counts.push(worker.await??);
    }
    let elapsed = started.elapsed();

    println!("\n| worker | tasks |\n|---:|---:|");
    for (w, n) in counts.iter().enumerate() {
        println!("| {w} | {n} |");
    }
    let total: usize = counts.iter().sum();
    println!(
        "\n{total} tasks in {:.2} s: {:.0} tasks/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );

    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'done'),
                    count(*) FILTER (WHERE processed_count <> 1),
                    count(*)
             FROM tasks",
            &[],
        )
        .await?;
    let (done, not_once, all): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let passed = done == all && not_once == 0 && total as i64 == all;
    println!(
        "exactly-once check: {} ({done} of {all} done, {not_once} processed other than once, \
         workers reported {total})",
        if passed { "passed" } else { "FAILED" }
    );
    drop((admin, db, pg));
    drop(cluster);
    if !passed {
        return Err("the exactly-once check failed".into());
    }
    Ok(())
}
