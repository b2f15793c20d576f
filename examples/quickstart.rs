//! rowlock in one screen: lock a row under each mode and watch what a second session sees.
//!
//! Runs on the server `DATABASE_URL` names, or on a throwaway PostgreSQL cluster started from
//! the installed server binaries (and deleted on exit) when it is unset:
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use rowlock::{BoxFuture, Lock, LockMode, LockableRow, Outcome, Transaction};
use rowlock_testing::{TestCluster, wait_for_blocked_by};

const SCHEMA: &str = "
    CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL);
    INSERT INTO accounts VALUES (1, 'ada', 100), (2, 'grace', 100);";

#[derive(Debug, LockableRow)]
#[rowlock(table = "accounts", key = "id")]
struct Account {
    id: i64,
    owner: String,
    balance: i64,
}

/// The read-check-write critical section: runs only while the row is locked.
fn withdraw(tx: &Transaction, account: Account) -> BoxFuture<'_, Result<i64, rowlock::Error>> {
    Box::pin(async move {
        let balance = account.balance - 10;
        tx.execute(
            "UPDATE accounts SET balance = $2 WHERE id = $1",
            &[&account.id, &balance],
        )
        .await?;
        Ok(balance)
    })
}

fn describe<T: std::fmt::Debug>(outcome: &Outcome<T>) -> String {
    match outcome {
        Outcome::Done(v) => format!("Done({v:?})"),
        Outcome::NotFound(_) => "NotFound".into(),
        Outcome::Skipped(_) => "Skipped".into(),
        Outcome::LockNotAvailable(e) => format!("LockNotAvailable: {e}"),
        Outcome::LockTimeout(e) => format!("LockTimeout: {e}"),
        other => format!("{other:?}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Owned (not `TestCluster::shared()`), so dropping it at the end of `main` stops the
    // throwaway server before the process exits.
    let cluster = Arc::new(TestCluster::from_env()?);
    let where_ = if cluster.is_embedded() {
        "a throwaway cluster (set DATABASE_URL to use your own server)"
    } else {
        "DATABASE_URL"
    };
    println!("rowlock quickstart on {where_}");
    let pg = cluster.create_database_owned().await?;
    let db = pg.db(4);
    let admin = pg.client().await?;
    admin.batch_execute(SCHEMA).await?;

    println!("\n1. Row free: every mode locks it and runs the closure");
    for mode in [LockMode::Wait, LockMode::NoWait, LockMode::SkipLocked] {
        let outcome = db
            .with_locked_row(&1, &Lock::new().mode(mode), withdraw)
            .await?;
        println!("   {:<10} -> {}", format!("{mode:?}"), describe(&outcome));
    }

    println!("\n2. Another session holds row 1 FOR UPDATE");
    let holder = pg.session().await?;
    holder
        .batch_execute("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE")
        .await?;

    let nowait = Lock::no_wait();
    let outcome = db.with_locked_row(&1, &nowait, withdraw).await?;
    println!("   NoWait     -> {}", describe(&outcome));

    let skip = Lock::skip_locked();
    let outcome = db.with_locked_row(&1, &skip, withdraw).await?;
    println!("   SkipLocked -> {}", describe(&outcome));

    let timeout = Lock::new().lock_timeout(Duration::from_millis(250));
    let started = Instant::now();
    let outcome = db.with_locked_row(&1, &timeout, withdraw).await?;
    println!(
        "   Wait 250ms -> {} (after {} ms)",
        describe(&outcome),
        started.elapsed().as_millis()
    );

    let waiter = tokio::spawn({
        let db = db.clone();
        async move { db.with_locked_row(&1, &Lock::new(), withdraw).await }
    });
    let blocked = wait_for_blocked_by(&admin, holder.pid(), 1, Duration::from_secs(30)).await?;
    println!(
        "   Wait       -> blocked (backend {blocked:?} waits for pid {})",
        holder.pid()
    );
    holder.batch_execute("COMMIT").await?;
    let outcome = waiter.await??;
    println!(
        "   Wait       -> {} once the holder committed",
        describe(&outcome)
    );

    println!("\n3. No such key: NotFound in every mode, distinct from Skipped");
    for mode in [LockMode::Wait, LockMode::NoWait, LockMode::SkipLocked] {
        let outcome = db
            .with_locked_row(&99, &Lock::new().mode(mode), withdraw)
            .await?;
        println!("   {:<10} -> {}", format!("{mode:?}"), describe(&outcome));
    }

    println!("\n4. Several rows, locked in key order (no deadlocks), all or nothing");
    let outcome = db
        .with_locked_rows(&[2, 1], &Lock::new(), |tx, accounts: Vec<Account>| {
            Box::pin(async move {
                let owners: Vec<String> = accounts.iter().map(|a| a.owner.clone()).collect();
                tx.execute("UPDATE accounts SET balance = balance + 1", &[])
                    .await?;
                Ok::<_, rowlock::Error>(owners)
            })
        })
        .await?;
    match &outcome {
        Outcome::Done(owners) => println!("   [2, 1]     -> Done({owners:?})"),
        other => println!("   [2, 1]     -> {other:?}"),
    }
    let outcome = db
        .with_locked_rows(&[1, 7], &Lock::new(), |_, _: Vec<Account>| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await?;
    println!("   [1, 7]     -> {outcome:?}");

    let rows = admin
        .query("SELECT id, balance FROM accounts ORDER BY id", &[])
        .await?;
    let balances: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    println!("\nFinal balances (id, balance): {balances:?}");
    drop((admin, holder, db, pg));
    drop(cluster); // stops and deletes a throwaway cluster
    Ok(())
}
