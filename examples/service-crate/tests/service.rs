use rowlock::Outcome;
use rowlock_example_service::{Paid, SCHEMA, log_event, pay, work};
use rowlock_testing::TestCluster;
use uuid::Uuid;

async fn setup() -> (rowlock_testing::TestDatabase, rowlock::Db) {
    let pg = TestCluster::shared()
        .unwrap()
        .create_database()
        .await
        .unwrap();
    let client = pg.client().await.unwrap();
    client.batch_execute(SCHEMA).await.unwrap();
    client
        .batch_execute(
            "INSERT INTO customers VALUES (1, 100);
             INSERT INTO orders (id, customer, amount) VALUES
               ('00000000-0000-0000-0000-000000000001', 1, 60),
               ('00000000-0000-0000-0000-000000000002', 1, 60);
             INSERT INTO jobs (id, order_id) SELECT g, '00000000-0000-0000-0000-000000000001'
               FROM generate_series(1, 5) g;",
        )
        .await
        .unwrap();
    let db = pg.db(4);
    (pg, db)
}

#[tokio::test]
async fn orders_are_paid_once_and_never_overdraw() {
    let (pg, db) = setup().await;
    let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let actor = String::from("checkout");
    // Both orders at once, each paid twice: one order is paid, the other declined.
    let results = tokio::join!(
        pay(&db, a, 1, &actor),
        pay(&db, b, 1, &actor),
        pay(&db, a, 1, &actor),
        pay(&db, b, 1, &actor),
    );
    let mut outcomes = Vec::new();
    for r in [results.0, results.1, results.2, results.3] {
        match r.unwrap() {
            Outcome::Done(paid) => outcomes.push(paid),
            other => panic!("{other:?}"),
        }
    }
    let done = outcomes
        .iter()
        .filter(|p| matches!(p, Paid::Done { .. }))
        .count();
    assert_eq!(done, 1, "{outcomes:?}");
    let credit: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT credit FROM customers WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(credit, 40);

    // The same repository function outside any transaction: the handle runs it in a
    // transaction of its own.
    log_event(&db, a, "audited", "ops").await.unwrap();
    let missing = pay(&db, Uuid::from_u128(9), 1, "checkout").await.unwrap();
    assert!(matches!(missing, Outcome::NotFound(_)), "{missing:?}");
}

#[tokio::test]
async fn queued_jobs_are_worked_exactly_once() {
    let (pg, db) = setup().await;
    let mut total = 0;
    while let Outcome::Done(n) = work(&db, 2, "worker-1").await.unwrap() {
        total += n;
    }
    assert_eq!(total, 5);
    let shipped: i64 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM events WHERE what = 'shipped'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shipped, 5);
}
