//! Orders paid from a customer's credit, and a job queue: rowlock used from a crate of its own,
//! the way a service uses it.

use rowlock::Db;
use rowlock::{
    Claim, Compare, Direction, Executor, Lock, LockSet, LockableRow, LockedRows, Outcome,
};
use uuid::Uuid;

/// The schema this service runs on.
pub const SCHEMA: &str = "
CREATE TYPE job_status AS ENUM ('queued', 'done');
CREATE TABLE customers (id bigint PRIMARY KEY, credit bigint NOT NULL);
CREATE TABLE orders (id uuid PRIMARY KEY, customer bigint NOT NULL REFERENCES customers,
                     amount bigint NOT NULL, paid boolean NOT NULL DEFAULT false);
CREATE TABLE events (order_id uuid, what text NOT NULL, actor text NOT NULL);
CREATE TABLE jobs (id bigint PRIMARY KEY, status job_status NOT NULL DEFAULT 'queued',
                   order_id uuid NOT NULL);
CREATE INDEX jobs_queued ON jobs (id) WHERE status = 'queued';
";

#[derive(Debug, LockableRow)]
#[rowlock(table = "orders", key = "id")]
pub struct Order {
    pub id: Uuid,
    pub customer: i64,
    pub amount: i64,
    pub paid: bool,
}

#[derive(Debug, LockableRow)]
#[rowlock(table = "customers", key = "id")]
pub struct Customer {
    pub id: i64,
    pub credit: i64,
}

#[derive(Debug, LockableRow)]
#[rowlock(table = "jobs", key = "id")]
pub struct Job {
    pub id: i64,
    pub order_id: Uuid,
}

/// What paying an order came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Paid {
    Done { credit_left: i64 },
    AlreadyPaid,
    InsufficientCredit,
}

/// A repository function: used inside the locked calls below and outside any transaction.
pub async fn log_event(
    pg: &impl Executor,
    order: Uuid,
    what: &str,
    actor: &str,
) -> Result<(), rowlock::Error> {
    pg.execute(
        "INSERT INTO events (order_id, what, actor) VALUES ($1, $2, $3)",
        &[&order, &what, &actor],
    )
    .await
    .map(|_| ())
}

/// Pays `order` from its customer's credit. The customer and the order are locked together,
/// in rowlock's global order, whatever order other code locks them in. `actor` is borrowed.
pub async fn pay(
    db: &Db,
    order: Uuid,
    customer: i64,
    actor: &str,
) -> Result<Outcome<Paid>, rowlock::Error> {
    let set = LockSet::new()
        .row::<Order>(&order)?
        .row::<Customer>(&customer)?;
    db.with_locked_set(&set, &Lock::new(), |tx, mut rows: LockedRows| {
        Box::pin(async move {
            let order: Order = rows.take(&order).expect("locked");
            let customer: Customer = rows.take(&customer).expect("locked");
            if order.paid {
                return Ok(Paid::AlreadyPaid);
            }
            if customer.credit < order.amount {
                log_event(tx, order.id, "declined", actor).await?;
                return Ok(Paid::InsufficientCredit);
            }
            let left = customer.credit - order.amount;
            tx.execute(
                "UPDATE customers SET credit = $2 WHERE id = $1",
                &[&customer.id, &left],
            )
            .await?;
            tx.execute("UPDATE orders SET paid = true WHERE id = $1", &[&order.id])
                .await?;
            log_event(tx, order.id, "paid", actor).await?;
            Ok(Paid::Done { credit_left: left })
        })
    })
    .await
}

/// Claims up to `n` queued jobs (an enum column), marks them done and logs each; `Outcome::NotFound` when
/// nothing is queued.
pub async fn work(db: &Db, n: usize, worker: &str) -> Result<Outcome<usize>, rowlock::Error> {
    let claim = Claim::new()
        .filter("status", Compare::Eq, "queued")
        .order_by("id", Direction::Asc);
    db.claim(&claim, n, |tx, jobs: Vec<Job>| {
        Box::pin(async move {
            let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
            tx.execute(
                "UPDATE jobs SET status = 'done' WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
            for job in &jobs {
                log_event(tx, job.order_id, "shipped", worker).await?;
            }
            Ok(jobs.len())
        })
    })
    .await
}
