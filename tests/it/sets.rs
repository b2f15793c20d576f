//! Locks across tables in one global order: overlapping sets written in opposite orders never
//! deadlock; outcomes per row.

use std::time::Duration;

use rowlock::tokio_postgres::{Error as PgError, Row};
use rowlock::{
    ErrorKind, Lock, LockMode, LockSet, LockableRow, LockedRows, Outcome, Table, TransactionOptions,
};

use crate::own_transaction::{User, Wallet, users_and_wallets};
use crate::support::WAIT;

/// Locks the set (built in the given order) and moves 1 cent, noting the user.
async fn transfer(db: &rowlock::Db, wallet_first: bool) -> Result<Outcome<()>, rowlock::Error> {
    let set = if wallet_first {
        LockSet::new().row::<Wallet>(&1)?.row::<User>(&1)?
    } else {
        LockSet::new().row::<User>(&1)?.row::<Wallet>(&1)?
    };
    // A lock timeout far above any wait these transactions cause, so a deadlock (detected
    // after deadlock_timeout, 1 s) would show as 40P01, not hang.
    let opts =
        Lock::new().transaction(TransactionOptions::new().lock_timeout(Duration::from_secs(30)));
    db.with_locked_set(&set, &opts, |tx, mut rows: LockedRows| {
        Box::pin(async move {
            let user: User = rows.take(&1).expect("locked");
            let wallet: &Wallet = rows.get(&1).expect("locked");
            tx.execute(
                "UPDATE wallets SET cents = $2 WHERE user_id = $1",
                &[&wallet.user_id, &(wallet.cents + 1)],
            )
            .await?;
            tx.execute(
                "UPDATE users SET last_paid = now() WHERE id = $1",
                &[&user.id],
            )
            .await?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
}

#[tokio::test]
async fn opposite_orders_never_deadlock_over_a_thousand_rounds() {
    let (pg, db) = users_and_wallets().await;
    let rounds = 1000;
    let mut deadlocks = 0;
    for _ in 0..rounds {
        let (a, b) = tokio::join!(transfer(&db, true), transfer(&db, false));
        for r in [a, b] {
            match r {
                Ok(Outcome::Done(())) => {}
                Err(e) if e.kind() == ErrorKind::Deadlock => deadlocks += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(deadlocks, 0);
    let cents: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT cents FROM wallets WHERE user_id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(cents, 500 + 2 * rounds, "every transfer committed once");
}

#[derive(Debug)]
struct AlsoUsers;

impl LockableRow for AlsoUsers {
    type Key = i64;
    const TABLE: Table = Table::new("users");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(_: &Row) -> Result<Self, PgError> {
        Ok(AlsoUsers)
    }
    fn key(&self) -> i64 {
        0
    }
}

fn never(
    _: &rowlock::Transaction,
    _: LockedRows,
) -> rowlock::BoxFuture<'_, Result<(), rowlock::Error>> {
    panic!("not every row was locked")
}

#[tokio::test]
async fn outcomes_per_row_and_bad_sets() {
    let (pg, db) = users_and_wallets().await;
    let set = LockSet::new()
        .rows::<User>(&[1, 2])
        .unwrap()
        .row::<Wallet>(&3)
        .unwrap();
    let outcome = db.with_locked_set(&set, &Lock::new(), never).await.unwrap();
    let Outcome::NotFound(missing) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(missing.len(), 1);
    assert_eq!(
        missing[0].to_string(),
        "users key 2",
        "the first table with a missing row"
    );

    let holder = pg.client().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM wallets WHERE user_id = 1 FOR UPDATE")
        .await
        .unwrap();
    let set = LockSet::new()
        .row::<Wallet>(&1)
        .unwrap()
        .row::<User>(&1)
        .unwrap();
    let nowait = Lock::no_wait();
    let outcome = db.with_locked_set(&set, &nowait, never).await.unwrap();
    assert!(
        matches!(outcome, Outcome::LockNotAvailable(_)),
        "{outcome:?}"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();

    let empty = db
        .with_locked_set(&LockSet::new(), &Lock::new(), never)
        .await
        .unwrap_err();
    assert!(empty.is_invalid_argument());
    let twice = LockSet::new()
        .row::<User>(&1)
        .unwrap()
        .row::<AlsoUsers>(&1)
        .unwrap();
    let err = db
        .with_locked_set(&twice, &Lock::new(), never)
        .await
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
}

/// The wallets table, spelled with its schema.
#[derive(Debug)]
struct QualifiedWallet(i64);

impl LockableRow for QualifiedWallet {
    type Key = i64;
    const TABLE: Table = Table::qualified("public", "wallets");
    const KEY_COLUMNS: &'static [&'static str] = &["user_id"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(QualifiedWallet(row.try_get("user_id")?))
    }
    fn key(&self) -> i64 {
        self.0
    }
}

/// Locks user 1 and wallet 1, the wallet spelled `wallets` or `public.wallets`.
async fn lock_user_and_wallet(
    db: &rowlock::Db,
    qualified: bool,
) -> Result<Outcome<()>, rowlock::Error> {
    let set = if qualified {
        LockSet::new().row::<QualifiedWallet>(&1)?.row::<User>(&1)?
    } else {
        LockSet::new().row::<Wallet>(&1)?.row::<User>(&1)?
    };
    let opts =
        Lock::new().transaction(TransactionOptions::new().lock_timeout(Duration::from_secs(30)));
    db.with_locked_set(&set, &opts, |tx, _| {
        Box::pin(async move {
            tx.execute(
                "UPDATE wallets SET cents = cents + 1 WHERE user_id = 1",
                &[],
            )
            .await?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
}

#[tokio::test]
async fn a_table_spelled_with_its_schema_keeps_its_place_in_the_order() {
    let (pg, db) = users_and_wallets().await;
    let observer = pg.client().await.unwrap();
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM users WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    // Spelled `"public"."wallets"`, the wallets table still comes after `users`: the call
    // waits for the user's row while holding nothing.
    let call = tokio::spawn({
        let db = db.clone();
        async move { lock_user_and_wallet(&db, true).await }
    });
    rowlock_testing::wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
        .await
        .unwrap();
    let wallet_free: i64 = observer
        .query_one(
            "SELECT count(*) FROM (SELECT FROM wallets WHERE user_id = 1 FOR UPDATE SKIP LOCKED) w",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wallet_free, 1, "the wallet was not locked before the user");
    holder.batch_execute("COMMIT").await.unwrap();
    assert!(matches!(call.await.unwrap(), Ok(Outcome::Done(()))));
}

#[tokio::test]
async fn two_spellings_of_one_table_never_deadlock() {
    let (_db, db) = users_and_wallets().await;
    let mut deadlocks = 0;
    for _ in 0..200 {
        let (a, b) = tokio::join!(
            lock_user_and_wallet(&db, false),
            lock_user_and_wallet(&db, true)
        );
        for r in [a, b] {
            match r {
                Ok(Outcome::Done(())) => {}
                Err(e) if e.kind() == ErrorKind::Deadlock => deadlocks += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(deadlocks, 0);
}

#[tokio::test]
async fn two_row_types_spelling_one_table_two_ways_are_refused() {
    let (pg, db) = users_and_wallets().await;
    let set = LockSet::new()
        .row::<Wallet>(&1)
        .unwrap()
        .row::<QualifiedWallet>(&1)
        .unwrap();
    let err = db
        .with_locked_set(&set, &Lock::new(), never)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("\"public\".\"wallets\""), "{err}");
    let observer = pg.client().await.unwrap();
    assert_eq!(crate::support::in_transaction(&observer).await, 0);
}

/// A room every booking passes through, and its slots.
#[derive(Debug, rowlock::LockableRow)]
#[rowlock(table = "rooms", key = "id")]
struct Room {
    id: i64,
}

#[derive(Debug, rowlock::LockableRow)]
#[rowlock(table = "slots", key = "id")]
struct Slot {
    id: i64,
    booked_by: Option<String>,
}

async fn rooms_and_slots(
    slots: i64,
    pool_size: usize,
) -> (rowlock_testing::TestDatabase, rowlock::Db) {
    let (pg, db) = crate::support::database(
        "CREATE TABLE rooms (id bigint PRIMARY KEY, bookings int NOT NULL DEFAULT 0);
         CREATE TABLE slots (id bigint PRIMARY KEY, room bigint NOT NULL REFERENCES rooms,
                             booked_by text);
         INSERT INTO rooms (id) VALUES (1);",
        pool_size,
    )
    .await;
    pg.client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO slots (id, room) SELECT g, 1 FROM generate_series(1, $1::int8) g",
            &[&slots],
        )
        .await
        .unwrap();
    (pg, db)
}

/// Books `slot`: waits for the room (the hot parent), but a slot someone else is booking is
/// busy at once.
async fn book(db: &rowlock::Db, slot: i64, who: &str) -> Result<Outcome<()>, rowlock::Error> {
    let set = LockSet::new()
        .row::<Room>(&1)?
        .row::<Slot>(&slot)?
        .mode::<Slot>(LockMode::NoWait)?;
    db.with_locked_set(&set, Lock::wait(), |tx, mut rows: LockedRows| {
        let who = who.to_owned();
        let slot: Slot = rows.take(&slot).expect("locked");
        Box::pin(async move {
            assert!(slot.booked_by.is_none(), "each slot is booked once");
            tx.execute(
                "UPDATE slots SET booked_by = $2 WHERE id = $1",
                &[&slot.id, &who],
            )
            .await?;
            tx.execute("UPDATE rooms SET bookings = bookings + 1 WHERE id = 1", &[])
                .await?;
            Ok::<_, rowlock::Error>(())
        })
    })
    .await
}

/// The booking shape: with one mode for the whole set, NoWait on the shared room turned
/// concurrent bookings of different slots into "busy". With Wait on the room and NoWait on
/// the slot, every booking of a free slot succeeds, however many arrive at once.
#[tokio::test]
async fn a_set_waits_for_the_parent_and_fails_fast_on_the_child() {
    let bookings = 200;
    let (pg, db) = rooms_and_slots(bookings, 16).await;
    let calls = (1..=bookings).map(|slot| {
        let db = db.clone();
        tokio::spawn(async move { book(&db, slot, &format!("guest {slot}")).await })
    });
    let mut done = 0;
    for call in futures_util::future::join_all(calls).await {
        match call.unwrap().unwrap() {
            Outcome::Done(()) => done += 1,
            other => panic!("a free slot was not booked: {other}"),
        }
    }
    assert_eq!(done, bookings);
    let booked: i32 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT bookings FROM rooms WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(i64::from(booked), bookings);
}

/// A slot held elsewhere is busy at once, and the outcome names it (table and key); the room
/// the call had locked is released.
#[tokio::test]
async fn a_busy_row_of_a_set_is_named() {
    let (pg, db) = rooms_and_slots(3, 2).await;
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM slots WHERE id = 2 FOR UPDATE")
        .await
        .unwrap();
    let outcome = book(&db, 2, "late").await.unwrap();
    let Outcome::LockNotAvailable(e) = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(e.rows(), [rowlock::RowRef::of::<Slot>(&2)]);
    assert!(e.to_string().contains("slots key 2"), "{e}");
    assert!(outcome.to_string().contains("slots key 2"), "{outcome}");
    // The room is free again: another slot books at once.
    assert!(book(&db, 3, "next").await.unwrap().is_done());
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(book(&db, 2, "late").await.unwrap().is_done());
}

#[tokio::test]
async fn a_mode_for_a_table_without_rows_is_refused() {
    let err = LockSet::new()
        .row::<Room>(&1)
        .unwrap()
        .mode::<Slot>(LockMode::NoWait)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("slots"), "{err}");
}

/// The same set inside the caller's own transaction: a busy slot is an outcome, and the
/// transaction goes on (the failed lock ran in a savepoint).
#[tokio::test]
async fn a_set_locked_inside_the_callers_transaction_leaves_it_usable() {
    let (pg, db) = rooms_and_slots(3, 2).await;
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM slots WHERE id = 2 FOR UPDATE")
        .await
        .unwrap();
    let set = LockSet::new()
        .row::<Room>(&1)
        .unwrap()
        .row::<Slot>(&2)
        .unwrap()
        .mode::<Slot>(LockMode::NoWait)
        .unwrap();
    let (busy, bookings) = db
        .with_transaction(TransactionOptions::new(), |tx| {
            let set = &set;
            Box::pin(async move {
                let busy = tx.lock_set(set, Lock::wait()).await?;
                // Usable after the refused lock: the write commits.
                tx.execute("UPDATE rooms SET bookings = bookings + 1 WHERE id = 1", &[])
                    .await?;
                let row = tx
                    .query_one("SELECT bookings FROM rooms WHERE id = 1", &[])
                    .await?;
                Ok::<_, rowlock::Error>((busy, row.get::<_, i32>(0)))
            })
        })
        .await
        .unwrap();
    let Outcome::LockNotAvailable(e) = &busy else {
        panic!("{busy:?}")
    };
    assert_eq!(e.rows(), [rowlock::RowRef::of::<Slot>(&2)]);
    assert_eq!(bookings, 1, "the transaction went on and committed");
    holder.batch_execute("ROLLBACK").await.unwrap();
    let tx = db.begin(TransactionOptions::new()).await.unwrap();
    let Outcome::Done(mut rows) = tx.lock_set(&set, Lock::wait()).await.unwrap() else {
        panic!("the slot is free now")
    };
    assert!(rows.take::<Slot>(&2).is_some());
    tx.commit().await.unwrap();
}

/// An event, through its partitioned table.
#[derive(Debug, rowlock::LockableRow)]
#[rowlock(table = "events", key = "id")]
struct Event {
    id: i64,
}

/// The same events, through the partition that holds them (named to sort after `users`).
#[derive(Debug, rowlock::LockableRow)]
#[rowlock(table = "zz_events_low", key = "id")]
struct LowEvent {
    id: i64,
}

/// A partition keeps its partitioned table's place in the order: a set that locks an event
/// through its partition and a user waits for the event while holding nothing, as one that
/// names the partitioned table does (by name, `zz_events_low` would come after `users`).
#[tokio::test]
async fn a_partition_keeps_its_partitioned_tables_place_in_the_order() {
    let (pg, db) = crate::support::database(
        "CREATE TABLE users (id bigint PRIMARY KEY);
         CREATE TABLE events (id bigint PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE zz_events_low PARTITION OF events FOR VALUES FROM (0) TO (100);
         INSERT INTO users VALUES (1); INSERT INTO events VALUES (1);",
        2,
    )
    .await;
    let observer = pg.client().await.unwrap();
    for through_partition in [false, true] {
        let holder = pg.session().await.unwrap();
        holder
            .batch_execute("BEGIN; SELECT * FROM events WHERE id = 1 FOR UPDATE")
            .await
            .unwrap();
        let set = if through_partition {
            LockSet::new().row::<LowEvent>(&1).unwrap()
        } else {
            LockSet::new().row::<Event>(&1).unwrap()
        }
        .row::<User>(&1)
        .unwrap();
        let call = tokio::spawn({
            let db = db.clone();
            async move {
                db.with_locked_set(&set, &Lock::new(), |_, _| {
                    Box::pin(async { Ok::<_, rowlock::Error>(()) })
                })
                .await
            }
        });
        rowlock_testing::wait_for_blocked_by(&observer, holder.pid(), 1, WAIT)
            .await
            .unwrap();
        let user_free: i64 = observer
            .query_one(
                "SELECT count(*) FROM (SELECT FROM users WHERE id = 1 FOR UPDATE SKIP LOCKED) u",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            user_free, 1,
            "through the partition: {through_partition}: the user was locked before the event"
        );
        holder.batch_execute("COMMIT").await.unwrap();
        assert!(matches!(call.await.unwrap(), Ok(Outcome::Done(()))));
    }
}
