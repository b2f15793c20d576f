//! Keys of other crates' types: a UUID primary key and a (uuid, date) composite key, locked
//! one by one and several at once, in key order.

use chrono::NaiveDate;
use rowlock::tokio_postgres::{Error as PgError, Row};
use rowlock::{Lock, LockableRow, Outcome, RowRef, Table};
use uuid::Uuid;

#[derive(Debug)]
struct Order {
    id: Uuid,
    status: String,
}

impl LockableRow for Order {
    type Key = Uuid;
    const TABLE: Table = Table::new("orders");
    const KEY_COLUMNS: &'static [&'static str] = &["id"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Order {
            id: row.try_get("id")?,
            status: row.try_get("status")?,
        })
    }
    fn key(&self) -> Uuid {
        self.id
    }
}

#[derive(Debug)]
struct Shift {
    worker: Uuid,
    day: NaiveDate,
    hours: i32,
}

impl LockableRow for Shift {
    type Key = (Uuid, NaiveDate);
    const TABLE: Table = Table::new("shifts");
    const KEY_COLUMNS: &'static [&'static str] = &["worker", "day"];
    fn from_row(row: &Row) -> Result<Self, PgError> {
        Ok(Shift {
            worker: row.try_get("worker")?,
            day: row.try_get("day")?,
            hours: row.try_get("hours")?,
        })
    }
    fn key(&self) -> (Uuid, NaiveDate) {
        (self.worker, self.day)
    }
}

fn uuid(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn day(d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, d).unwrap()
}

async fn setup() -> (rowlock_testing::TestDatabase, rowlock::Db) {
    let pg = rowlock_testing::TestCluster::shared()
        .unwrap()
        .create_database()
        .await
        .unwrap();
    let client = pg.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE orders (id uuid PRIMARY KEY, status text NOT NULL);
             CREATE TABLE shifts (worker uuid, day date, hours int NOT NULL,
                                  PRIMARY KEY (worker, day));",
        )
        .await
        .unwrap();
    for n in [3_u128, 1, 2] {
        client
            .execute("INSERT INTO orders VALUES ($1, 'new')", &[&uuid(n)])
            .await
            .unwrap();
        for d in [2, 1] {
            client
                .execute(
                    "INSERT INTO shifts VALUES ($1, $2, 8)",
                    &[&uuid(n), &day(d)],
                )
                .await
                .unwrap();
        }
    }
    let db = pg.db(4);
    (pg, db)
}

#[tokio::test]
async fn a_uuid_primary_key_locks_and_reports_outcomes() {
    let (pg, db) = setup().await;
    let outcome = db
        .with_locked_row(&uuid(2), &Lock::new(), |tx, o: Order| {
            Box::pin(async move {
                tx.execute("UPDATE orders SET status = 'paid' WHERE id = $1", &[&o.id])
                    .await?;
                Ok::<_, rowlock::Error>(o.status)
            })
        })
        .await
        .unwrap();
    assert_eq!(outcome.done().as_deref(), Some("new"));
    let missing = db
        .with_locked_row(&uuid(99), &Lock::new(), |_, _: Order| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert!(matches!(missing, Outcome::NotFound(_)));

    let holder = pg.client().await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute("SELECT * FROM orders WHERE id = $1 FOR UPDATE", &[&uuid(3)])
        .await
        .unwrap();
    let nowait = Lock::no_wait();
    let busy = db
        .with_locked_rows(&[uuid(3), uuid(1)], &nowait, |_, _: Vec<Order>| {
            Box::pin(async { Ok::<_, rowlock::Error>(()) })
        })
        .await
        .unwrap();
    assert!(matches!(busy, Outcome::LockNotAvailable(_)), "{busy:?}");
}

#[tokio::test]
async fn a_uuid_and_date_composite_key_locks_several_rows_in_key_order() {
    let (_db, db) = setup().await;
    // Asked for out of order, with a duplicate: locked once each, handed over in key order.
    let keys = [
        (uuid(3), day(1)),
        (uuid(1), day(2)),
        (uuid(1), day(1)),
        (uuid(3), day(1)),
    ];
    let outcome = db
        .with_locked_rows(&keys, &Lock::new(), |tx, shifts: Vec<Shift>| {
            Box::pin(async move {
                for s in &shifts {
                    tx.execute(
                        "UPDATE shifts SET hours = $3 WHERE worker = $1 AND day = $2",
                        &[&s.worker, &s.day, &(s.hours + 1)],
                    )
                    .await?;
                }
                Ok::<_, rowlock::Error>(shifts.iter().map(Shift::key).collect::<Vec<_>>())
            })
        })
        .await
        .unwrap();
    let Outcome::Done(locked) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        locked,
        [(uuid(1), day(1)), (uuid(1), day(2)), (uuid(3), day(1))]
    );
    let missing = db
        .with_locked_rows(
            &[(uuid(2), day(9)), (uuid(2), day(1))],
            &Lock::new(),
            |_, _: Vec<Shift>| Box::pin(async { Ok::<_, rowlock::Error>(()) }),
        )
        .await
        .unwrap();
    assert_eq!(
        missing,
        Outcome::NotFound(vec![RowRef::of::<Shift>(&(uuid(2), day(9)))])
    );
}

/// A claim's order needs every key column, anywhere in it: shifts keyed by `(worker, day)`
/// are claimed by day first. An order that lacks a key column is refused and says which.
#[tokio::test]
async fn a_claim_orders_a_composite_key_in_any_column_order() {
    use rowlock::{Claim, Direction, ErrorKind};
    let (_db, db) = setup().await;
    let by_day = Claim::new()
        .order_by("day", Direction::Asc)
        .order_by("worker", Direction::Desc);
    let claimed = db
        .claim(&by_day, 4, |_, shifts: Vec<Shift>| {
            Box::pin(async move {
                Ok::<_, rowlock::Error>(shifts.iter().map(Shift::key).collect::<Vec<_>>())
            })
        })
        .await
        .unwrap();
    assert_eq!(
        claimed,
        Outcome::Done(vec![
            (uuid(3), day(1)),
            (uuid(2), day(1)),
            (uuid(1), day(1)),
            (uuid(3), day(2)),
        ])
    );
    let err = db
        .claim(
            &Claim::new().order_by("day", Direction::Asc),
            1,
            |_, _: Vec<Shift>| Box::pin(async { Ok::<_, rowlock::Error>(()) }),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains(r#"it lacks ["worker"]"#), "{err}");
}

/// A slot of a room: key columns of domain types (over `bigint` and `varchar`).
#[derive(rowlock::LockableRow, Debug, PartialEq)]
#[rowlock(table = "slots", key("room", "slot"))]
struct Slot {
    room: i64,
    slot: String,
}

/// A room: a key column of a domain type.
#[derive(rowlock::LockableRow, Debug, PartialEq)]
#[rowlock(table = "rooms", key = "id")]
struct Room {
    id: i64,
}

/// Key columns of domain types bind their base types' Rust values, one key or several, on
/// a key of one column and a composite key (several composite keys travel as arrays typed by
/// their columns: a domain's array would not take a `Vec<i64>`).
#[tokio::test]
async fn key_columns_of_domain_types_take_their_base_types_values() {
    let (_pg, db) = crate::support::database(
        "CREATE DOMAIN room_id AS bigint CHECK (VALUE > 0);
             CREATE DOMAIN slot_name AS varchar(10);
             CREATE TABLE rooms (id room_id PRIMARY KEY);
             CREATE TABLE slots (room room_id, slot slot_name, PRIMARY KEY (room, slot));
             INSERT INTO rooms VALUES (1), (2);
             INSERT INTO slots VALUES (1, 'a'), (1, 'b'), (2, 'a');",
        1,
    )
    .await;
    let slot = |room: i64, slot: &str| Slot {
        room,
        slot: slot.to_string(),
    };
    let keys = [
        (2, "a".to_string()),
        (1, "b".to_string()),
        (1, "z".to_string()),
    ];
    for (wanted, expected) in [
        (&keys[..1], Outcome::Done(vec![slot(2, "a")])),
        (&keys[..2], Outcome::Done(vec![slot(1, "b"), slot(2, "a")])),
        (
            &keys[..],
            Outcome::NotFound(vec![RowRef::of::<Slot>(&keys[2])]),
        ),
    ] {
        let outcome = db
            .with_locked_rows(wanted, &Lock::new(), |_, slots: Vec<Slot>| {
                Box::pin(async move { Ok::<_, rowlock::Error>(slots) })
            })
            .await
            .unwrap();
        assert_eq!(outcome, expected, "{wanted:?}");
    }
    let outcome = db
        .with_locked_rows(&[2, 1], &Lock::new(), |_, rooms: Vec<Room>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(rooms) })
        })
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Done(vec![Room { id: 1 }, Room { id: 2 }]));
}

#[derive(Debug, PartialEq, LockableRow)]
#[rowlock(table = "users", key = "email")]
struct User {
    email: String,
}

#[derive(Debug, PartialEq, LockableRow)]
#[rowlock(table = "members", key("org", "email"))]
struct Member {
    org: i32,
    email: String,
}

/// A key column whose equality is coarser than the key type's `Ord` (`citext`; a
/// nondeterministic collation alike): `ALICE@x.io` is the row `alice@x.io` to the server.
/// Which keys were found is the server's answer, not a comparison of keys in Rust: several
/// keys locked under another spelling are `Done` (they were `NotFound`, with the row locked),
/// a missing one is `NotFound` alone, and one held elsewhere is `Skipped` as asked for.
#[tokio::test]
async fn keys_the_server_compares_more_coarsely_are_found_as_it_finds_them() {
    let (pg, db) = crate::support::database(
        "CREATE EXTENSION IF NOT EXISTS citext;
         CREATE TABLE users (email citext PRIMARY KEY);
         CREATE TABLE members (org int, email citext, PRIMARY KEY (org, email));
         INSERT INTO users VALUES ('alice@x.io'), ('bob@x.io');
         INSERT INTO members VALUES (1, 'alice@x.io'), (2, 'bob@x.io');",
        2,
    )
    .await;
    let s = |v: &str| v.to_string();
    let user = |e: &str| User { email: s(e) };
    let emails = |keys: &[&str]| keys.iter().map(|k| s(k)).collect::<Vec<_>>();
    async fn lock<R: LockableRow>(
        db: &rowlock::Db,
        keys: &[R::Key],
        lock: Lock,
    ) -> Outcome<Vec<R>> {
        db.with_locked_rows(keys, lock, |_, rows: Vec<R>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(rows) })
        })
        .await
        .unwrap()
    }
    for mode in [Lock::new(), Lock::no_wait(), Lock::skip_locked()] {
        assert_eq!(
            lock::<User>(&db, &emails(&["ALICE@x.io", "bob@x.io"]), mode.clone()).await,
            Outcome::Done(vec![user("alice@x.io"), user("bob@x.io")]),
            "{mode:?}"
        );
        assert_eq!(
            lock::<User>(&db, &emails(&["ALICE@x.io", "alice@x.io"]), mode.clone()).await,
            Outcome::Done(vec![user("alice@x.io")]),
            "{mode:?}"
        );
        assert_eq!(
            lock::<User>(&db, &emails(&["ALICE@x.io", "carol@x.io"]), mode.clone()).await,
            Outcome::NotFound(vec![RowRef::of::<User>(&s("carol@x.io"))]),
            "{mode:?}"
        );
    }
    assert_eq!(
        lock::<Member>(
            &db,
            &[(2, s("BOB@x.io")), (1, s("Alice@X.io"))],
            Lock::new()
        )
        .await,
        Outcome::Done(vec![
            Member {
                org: 1,
                email: s("alice@x.io")
            },
            Member {
                org: 2,
                email: s("bob@x.io")
            }
        ])
    );

    // In a lock set, a row is got by the key it was added with, or by its own.
    let set = rowlock::LockSet::new()
        .row::<User>(&s("ALICE@x.io"))
        .unwrap()
        .row::<Member>(&(2, s("BOB@x.io")))
        .unwrap();
    let got = db
        .with_locked_set(&set, Lock::new(), |_, mut rows| {
            Box::pin(async move {
                let by_own = rows.get::<User>(&s("alice@x.io")).map(|u| u.email.clone());
                let alice = rows.take::<User>(&s("ALICE@x.io"));
                let bob = rows.take::<Member>(&(2, s("BOB@x.io")));
                Ok::<_, rowlock::Error>((by_own, alice, bob, rows.take_all::<User>()))
            })
        })
        .await
        .unwrap();
    assert_eq!(
        got,
        Outcome::Done((
            Some(s("alice@x.io")),
            Some(user("alice@x.io")),
            Some(Member {
                org: 2,
                email: s("bob@x.io")
            }),
            Vec::new()
        ))
    );

    // Bob held by another session: skipped under the spelling asked for.
    let holder = pg.session().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM users WHERE email = 'bob@x.io' FOR UPDATE")
        .await
        .unwrap();
    assert_eq!(
        lock::<User>(
            &db,
            &emails(&["ALICE@x.io", "BOB@x.io"]),
            Lock::skip_locked()
        )
        .await,
        Outcome::Skipped(vec![RowRef::of::<User>(&s("BOB@x.io"))])
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
}
