//! The race rowlock exists for, shown and fixed.
//!
//! K managers click "Accept" at the same instant, each on a different proposal of the same
//! project, for P projects. Three strategies, each on a fresh database:
//!
//! - `flawed`: read, check, write without a lock (the wrong way; see `common/flawed.rs`),
//!   run WITHOUT the safety-net unique index, so double acceptances show;
//! - `locked Wait`: `accept_proposal` with `LockMode::Wait`: losers wait, then see "already
//!   assigned";
//! - `locked NoWait+retry`: `LockMode::NoWait`, retrying a busy project a few times;
//! - `one statement`: `accept_proposal_in_one_statement`, a transition of the project: no lock
//!   held across a round trip.
//!
//! ```text
//! cargo run --release --example accept_race -- --managers 8 --projects 500 --concurrency 4
//! # rounds × K managers on one project, a barrier per round (attempts/s comparable with a
//! # web framework's view raced the same way):
//! cargo run --release --example accept_race -- --rounds 500 --managers 2
//! ```
//!
//! Runs on `DATABASE_URL`, or on a throwaway cluster when it is unset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rowlock::assignment::{
    AssignmentError, ONE_ACCEPTED_INDEX, ProposalStatus, accept_proposal,
    accept_proposal_in_one_statement, migrate,
};
use rowlock::{Db, Lock};
use rowlock_testing::TestCluster;
use tokio::sync::Barrier;

#[path = "common/flawed.rs"]
mod flawed;

#[derive(Clone, Copy, PartialEq)]
enum Strategy {
    Flawed,
    Wait,
    NoWaitRetry,
    OneStatement,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Flawed => "flawed (no lock, no index)",
            Strategy::Wait => "locked Wait",
            Strategy::NoWaitRetry => "locked NoWait+retry",
            Strategy::OneStatement => "one statement (transition)",
        }
    }
}

/// What one manager's click came to.
enum Click {
    Accepted,
    AlreadyAssigned,
    Busy,
}

struct Args {
    managers: i64,
    projects: i64,
    concurrency: i64,
}

fn parse_args() -> Result<Args, Box<dyn std::error::Error>> {
    let mut args = Args {
        managers: 8,
        projects: 500,
        concurrency: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.clone(), None),
        };
        let mut value = || -> Result<i64, Box<dyn std::error::Error>> {
            let v = inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))?;
            Ok(v.parse()?)
        };
        match name.as_str() {
            "--managers" => args.managers = value()?,
            "--projects" => args.projects = value()?,
            "--concurrency" => args.concurrency = value()?,
            // The race shape of one project per round: a barrier per round of K clicks.
            "--rounds" => {
                args.projects = value()?;
                args.concurrency = 1;
            }
            "--help" | "-h" => {
                println!(
                    "usage: accept_race [--managers K] [--projects P] [--concurrency C] | [--rounds R]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}; try --help").into()),
        }
    }
    if args.managers < 2 || args.projects < 1 || args.concurrency < 1 {
        return Err("need --managers >= 2, --projects >= 1, --concurrency >= 1".into());
    }
    Ok(args)
}

async fn click(
    db: &Db,
    strategy: Strategy,
    project: i64,
    proposal: i64,
) -> Result<Click, Box<dyn std::error::Error + Send + Sync>> {
    let result = match strategy {
        Strategy::Flawed => {
            let conn = db.pool().get().await?;
            return Ok(if flawed::accept(&conn, proposal).await? {
                Click::Accepted
            } else {
                Click::AlreadyAssigned
            });
        }
        Strategy::Wait => accept_proposal(db, proposal, Lock::wait()).await,
        Strategy::NoWaitRetry => {
            // Busy at once, tried 4 times (a bare number retries lock contention too).
            accept_proposal(db, proposal, Lock::no_wait().retry(4)).await
        }
        Strategy::OneStatement => accept_proposal_in_one_statement(db, project, proposal).await,
    };
    match result {
        Ok(()) => Ok(Click::Accepted),
        Err(AssignmentError::AlreadyAssigned(_))
        | Err(AssignmentError::NotPending {
            status: ProposalStatus::Rejected,
            ..
        }) => Ok(Click::AlreadyAssigned),
        Err(AssignmentError::Busy) => Ok(Click::Busy),
        Err(e) => Err(e.into()),
    }
}

struct Row {
    attempts: i64,
    accepted: i64,
    doubled: i64,
    busy: i64,
    already: i64,
    elapsed: Duration,
}

async fn race(
    cluster: &Arc<TestCluster>,
    strategy: Strategy,
    args: &Args,
) -> Result<Row, Box<dyn std::error::Error + Send + Sync>> {
    let pg = cluster.create_database_owned().await?;
    let tasks = (args.managers * args.concurrency) as usize;
    let db = pg.db(tasks);
    migrate(&db).await?;
    let admin = pg.client().await?;
    if strategy == Strategy::Flawed {
        admin
            .batch_execute(&format!("DROP INDEX {ONE_ACCEPTED_INDEX}"))
            .await?;
    }
    // Project p gets proposals (p-1)*K+1 ..= p*K, one per manager.
    admin
        .execute(
            "INSERT INTO projects (title) SELECT 'project ' || g FROM generate_series(1, $1::int8) g",
            &[&args.projects],
        )
        .await?;
    admin
        .execute(
            "INSERT INTO proposals (project_id, freelancer)
             SELECT p, 'freelancer ' || f FROM generate_series(1, $1::int8) p,
                                               generate_series(1, $2::int8) f ORDER BY p, f",
            &[&args.projects, &args.managers],
        )
        .await?;
    let mut row = Row {
        attempts: 0,
        accepted: 0,
        doubled: 0,
        busy: 0,
        already: 0,
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    let mut first = 1;
    while first <= args.projects {
        let last = (first + args.concurrency - 1).min(args.projects);
        let start = Arc::new(Barrier::new(((last - first + 1) * args.managers) as usize));
        let mut clicks = Vec::new();
        for project in first..=last {
            for manager in 1..=args.managers {
                let proposal = (project - 1) * args.managers + manager;
                let (db, start) = (db.clone(), start.clone());
                clicks.push(tokio::spawn(async move {
                    start.wait().await; // everyone clicks at the same instant
                    click(&db, strategy, project, proposal).await
                }));
            }
        }
        for c in clicks {
            row.attempts += 1;
            match c.await?? {
                Click::Accepted => row.accepted += 1,
                Click::AlreadyAssigned => row.already += 1,
                Click::Busy => row.busy += 1,
            }
        }
        first = last + 1;
    }
    row.elapsed = started.elapsed();
    row.doubled = admin
        .query_one(
            "SELECT count(*) FROM (SELECT project_id FROM proposals WHERE status = 'accepted'
                                   GROUP BY project_id HAVING count(*) > 1) d",
            &[],
        )
        .await?
        .get(0);
    Ok(row)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = parse_args().map_err(|e| e.to_string())?;
    let cluster = Arc::new(TestCluster::from_env().map_err(|e| e.to_string())?);
    println!(
        "{} managers race to accept a proposal on each of {} projects ({} projects at a time)\n",
        args.managers, args.projects, args.concurrency
    );
    println!(
        "| strategy | attempts | accepted | projects with >1 accepted | busy | already assigned | elapsed | attempts/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut broken = false;
    for strategy in [
        Strategy::Flawed,
        Strategy::Wait,
        Strategy::NoWaitRetry,
        Strategy::OneStatement,
    ] {
        let r = race(&cluster, strategy, &args).await?;
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} s | {:.0} |",
            strategy.name(),
            r.attempts,
            r.accepted,
            r.doubled,
            r.busy,
            r.already,
            r.elapsed.as_secs_f64(),
            r.attempts as f64 / r.elapsed.as_secs_f64()
        );
        broken |= strategy != Strategy::Flawed && r.doubled > 0;
    }
    println!(
        "\nThe flawed strategy runs without the safety-net index {ONE_ACCEPTED_INDEX} \
         (at most one accepted proposal per project), so its double acceptances show; with the \
         index they would surface as unique-violation errors instead. The locked strategies \
         keep the index and never need it: the project lock turns every loser into \
         \"already assigned\" (Wait) or \"busy\" (NoWait)."
    );
    drop(cluster);
    if broken {
        return Err("a locked strategy accepted two proposals for one project".into());
    }
    Ok(())
}
