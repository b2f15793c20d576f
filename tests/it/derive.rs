//! `#[derive(LockableRow)]`: plain, schema-qualified with a composite key and a renamed
//! column, UUID keys; only the columns the type reads are selected.

use chrono::NaiveDate;
use rowlock::{Claim, Compare, Direction, Lock, LockableRow, Outcome};
use uuid::Uuid;

#[derive(Debug, LockableRow)]
#[rowlock(table = "accounts", key = "id")]
struct Account {
    id: i64,
    balance: i64,
}

#[derive(Debug, LockableRow)]
#[rowlock(schema = "hr", table = "Shifts", key("worker", "day"))]
struct Shift {
    worker: Uuid,
    day: NaiveDate,
    #[rowlock(rename = "hours worked")]
    hours: i32,
}

#[derive(Debug, LockableRow)]
#[rowlock(table = "jobs", key = "id")]
struct Job {
    id: Uuid,
}

async fn setup() -> (rowlock_testing::TestDatabase, rowlock::Db) {
    crate::support::database(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts VALUES (1, 100), (2, 200);
             CREATE SCHEMA hr;
             CREATE TABLE hr.\"Shifts\" (worker uuid, day date, \"hours worked\" int NOT NULL,
                                       PRIMARY KEY (worker, day));
             INSERT INTO hr.\"Shifts\" VALUES
               ('00000000-0000-0000-0000-000000000002', '2026-11-02', 8),
               ('00000000-0000-0000-0000-000000000001', '2026-11-03', 6);
             CREATE TABLE jobs (id uuid PRIMARY KEY, priority int NOT NULL, done bool NOT NULL);
             INSERT INTO jobs VALUES ('00000000-0000-0000-0000-00000000000a', 1, false),
                                     ('00000000-0000-0000-0000-00000000000b', 9, false);",
        1,
    )
    .await
}

#[tokio::test]
async fn derived_rows_lock_read_their_columns_and_survive_unrelated_column_changes() {
    let (pg, db) = setup().await;
    let got = db
        .with_locked_row(&2, &Lock::new(), |_, a: Account| {
            Box::pin(async move { Ok::<_, rowlock::Error>(a.balance) })
        })
        .await
        .unwrap();
    assert!(matches!(got, Outcome::Done(200)));

    let keys = [
        (
            Uuid::from_u128(2),
            NaiveDate::from_ymd_opt(2026, 11, 2).unwrap(),
        ),
        (
            Uuid::from_u128(1),
            NaiveDate::from_ymd_opt(2026, 11, 3).unwrap(),
        ),
    ];
    let hours = db
        .with_locked_rows(&keys, &Lock::new(), |_, s: Vec<Shift>| {
            Box::pin(async move {
                Ok::<_, rowlock::Error>(s.iter().map(|s| s.hours).collect::<Vec<_>>())
            })
        })
        .await
        .unwrap();
    let Outcome::Done(hours) = hours else {
        panic!("{hours:?}")
    };
    assert_eq!(hours, [6, 8], "in key order: worker ...01 first");
    assert_eq!(Shift::KEY_COLUMNS, ["worker", "day"]);
    assert_eq!(Shift::COLUMNS, ["worker", "day", "hours worked"]);

    // Only the listed columns are selected: an added or retyped other column changes nothing.
    pg.client()
        .await
        .unwrap()
        .batch_execute(
            "ALTER TABLE accounts ADD COLUMN note text;
             ALTER TABLE accounts ALTER COLUMN note TYPE varchar(9)",
        )
        .await
        .unwrap();
    let got = db
        .with_locked_row(&1, &Lock::new(), |_, a: Account| {
            Box::pin(async move { Ok::<_, rowlock::Error>(a.balance) })
        })
        .await
        .unwrap();
    assert!(matches!(got, Outcome::Done(100)));

    // A claim ordered by a column the row type does not read.
    let claim = Claim::new()
        .filter("done", Compare::Eq, false)
        .order_by("priority", Direction::Desc)
        .order_by("id", Direction::Asc);
    let first = db
        .claim(&claim, 1, |_, jobs: Vec<Job>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(jobs[0].id) })
        })
        .await
        .unwrap();
    assert_eq!(first.done(), Some(Uuid::from_u128(0xb)));
}

#[derive(Debug, LockableRow)]
#[rowlock(table = "documents", key = "id")]
struct Document {
    id: i64,
    body: serde_json::Value,
}

/// A `jsonb` column, read and written through the `serde_json` feature.
#[tokio::test]
async fn a_jsonb_column_reads_as_a_serde_json_value() {
    let (_pg, db) = crate::support::database(
        r#"CREATE TABLE documents (id bigint PRIMARY KEY, body jsonb NOT NULL);
           INSERT INTO documents VALUES (1, '{"views": 1}');"#,
        2,
    )
    .await;
    let views = db
        .with_locked_row(&1, Lock::new(), |tx, doc: Document| {
            Box::pin(async move {
                let views = doc.body["views"].as_i64().unwrap_or(0) + 1;
                let body = serde_json::json!({ "views": views });
                tx.execute(
                    "UPDATE documents SET body = $2 WHERE id = $1",
                    &[&doc.id, &body],
                )
                .await?;
                Ok::<_, rowlock::Error>(views)
            })
        })
        .await
        .unwrap();
    assert_eq!(views, Outcome::Done(2));
}
