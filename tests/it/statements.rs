//! A bounded set of prepared statements: any number of keys of one column is one statement.

use rowlock::{LockMode, LockOptions, RowsOutcome, with_locked_rows};

use crate::support::{Account, accounts};

/// rowlock's statements prepared on the one connection of `pool`, seen from inside it.
async fn prepared_on(pool: &rowlock::deadpool_postgres::Pool) -> i64 {
    let conn = pool.get().await.unwrap();
    conn.simple_query("SELECT count(*) FROM pg_prepared_statements")
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            rowlock::tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn locking_one_to_a_thousand_keys_prepares_a_bounded_set_of_statements() {
    let (db, _) = accounts(1000).await;
    let pool = db.pool(1);
    let keys: Vec<i64> = (1..=1000).collect();
    for mode in [LockMode::Wait, LockMode::SkipLocked] {
        let options = LockOptions::new().mode(mode);
        for n in (1..=1000).step_by(7).chain([1000]) {
            // Every other call also asks for a key with no row, so that SkipLocked reads which
            // of the missing keys exist.
            let mut wanted = keys[..n].to_vec();
            if n % 2 == 0 {
                wanted.push(5000 + n as i64);
            }
            let outcome = with_locked_rows(&pool, &wanted, &options, |_, rows: Vec<Account>| {
                Box::pin(async move { Ok::<_, rowlock::Error>(rows.len()) })
            })
            .await
            .unwrap();
            match outcome {
                RowsOutcome::Done(got) => assert_eq!(got, n),
                RowsOutcome::NotFound(missing) => assert_eq!(missing, vec![5000 + n as i64]),
                other => panic!("{n} keys: {other:?}"),
            }
        }
    }
    // Per mode: the statement for one key and the one for any number of keys; the rows that
    // exist among missing keys (one key, any number); the table's columns (`Account` lists
    // none).
    let prepared = prepared_on(&pool).await;
    assert!(
        prepared <= 7,
        "{prepared} statements prepared on one connection"
    );
}

#[tokio::test]
async fn ten_thousand_distinct_filter_values_share_one_statement() {
    let (db, _) = accounts(3).await;
    let pool = db.pool(1);
    let mut claimed = 0;
    for value in 0..10_000_i64 {
        // Text, integers of either width: every value a parameter, never part of the SQL.
        let claim = rowlock::Claim::new()
            .filter("id", rowlock::Compare::Eq, value % 7)
            .filter("balance", rowlock::Compare::Ge, (value % 3) as i32)
            .order_by("id", rowlock::Direction::Asc);
        let got = rowlock::with_claimed_rows(&pool, &claim, 1, |_, rows: Vec<Account>| {
            Box::pin(async move { Ok::<_, rowlock::Error>(rows.len()) })
        })
        .await
        .unwrap();
        claimed += got.unwrap_or(0);
    }
    let expected = (0..10_000_i64)
        .filter(|v| (1..=3).contains(&(v % 7)))
        .count();
    assert_eq!(claimed, expected, "ids 1 to 3 exist");
    let prepared = prepared_on(&pool).await;
    assert!(
        prepared <= 2,
        "{prepared} statements prepared on one connection"
    );
}
