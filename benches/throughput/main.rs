//! Throughput: rowlock against `pgbench` and hand-written tokio-postgres, on one server, in
//! one run, alternating the three, printed as tables with ratios.
//!
//! ```text
//! cargo bench --bench throughput              # full: clients 1, 4, 16; 3 rounds of 3 s
//! cargo bench --bench throughput -- --quick   # smoke test: small data, correctness only
//! cargo bench --bench throughput -- --durable # server defaults for durability (fsync, WAL waits)
//! ```
//!
//! Uses `DATABASE_URL` if set (and `pgbench` from the installed server binaries), else a
//! throwaway cluster. Writes `throughput.md` and one SVG chart per workload to
//! `target/rowlock-bench/`. Progress lines on stderr also give the client thread's CPU time
//! per transaction for the in-process implementations.
//!
//! For profiling, `ROWLOCK_BENCH_WORKLOADS=hot_row,spread`, `ROWLOCK_BENCH_CLIENTS=1,4`,
//! `ROWLOCK_BENCH_IMPLS=rowlock` and `ROWLOCK_BENCH_SECS=2` narrow a run;
//! `ROWLOCK_BENCH_CHECK_PRIMARY=1` turns on `Builder::check_primary` for the pooled
//! implementations.

mod alloc;
mod report;
mod workloads;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rowlock::tokio_postgres::config::Host;
use rowlock_testing::{TestCluster, TestDatabase, server_bindir};
use tokio::sync::Barrier;

use report::{Cell, Imp, Measure};
use workloads::{Hand, Rng, Sizes, Snapshot, Workload};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long each run lasts.
#[derive(Clone, Copy)]
enum Limit {
    /// Wall-clock seconds (pgbench takes whole seconds).
    Secs(u64),
    /// Transactions per client.
    Count(u64),
}

struct Mode {
    quick: bool,
    /// Server defaults for durability: every commit waits for its WAL to reach the disk.
    durable: bool,
    limit: Limit,
    rounds: usize,
    clients: Vec<usize>,
    sizes: Sizes,
}

impl Mode {
    fn from_args() -> Mode {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var_os("ROWLOCK_BENCH_QUICK").is_some();
        let mut mode = Self::base(quick);
        mode.durable = std::env::args().any(|a| a == "--durable")
            || std::env::var_os("ROWLOCK_BENCH_DURABLE").is_some();
        // For profiling one cell: ROWLOCK_BENCH_CLIENTS=1,4 and ROWLOCK_BENCH_WORKLOADS=hot_row.
        if let Ok(list) = std::env::var("ROWLOCK_BENCH_CLIENTS") {
            mode.clients = list
                .split(',')
                .filter_map(|c| c.trim().parse().ok())
                .collect();
        }
        mode
    }

    fn base(quick: bool) -> Mode {
        if quick {
            Mode {
                quick,
                durable: false,
                limit: Limit::Count(20),
                rounds: 1,
                clients: vec![1, 4],
                sizes: Sizes {
                    projects: 2_000,
                    counters: 2_000,
                    jobs: 5_000,
                },
            }
        } else {
            let secs = std::env::var("ROWLOCK_BENCH_SECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(3);
            Mode {
                quick,
                durable: false,
                limit: Limit::Secs(secs),
                rounds: 3,
                clients: vec![1, 4, 16],
                sizes: Sizes {
                    projects: 100_000,
                    counters: 100_000,
                    // claim_spread claims about 150,000 jobs/s at 16 clients: a 3 s run
                    // takes under a third of the queue.
                    jobs: 1_500_000,
                },
            }
        }
    }
}

/// Per-client results of a run done by this process.
struct ClientRun {
    latencies_us: Vec<u32>,
    committed: u64,
    rows: u64,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn measure(runs: Vec<ClientRun>, elapsed: Duration) -> (Measure, u64, u64) {
    let mut latencies: Vec<u32> = runs
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let committed: u64 = runs.iter().map(|r| r.committed).sum();
    let rows: u64 = runs.iter().map(|r| r.rows).sum();
    let secs = elapsed.as_secs_f64();
    (
        Measure {
            tps: committed as f64 / secs,
            rows_per_s: rows as f64 / secs,
            p50_ms: percentile(&latencies, 0.5),
            p99_ms: percentile(&latencies, 0.99),
            client_cpu_us: f64::NAN,
            allocs_per_tx: f64::NAN,
        },
        committed,
        rows,
    )
}

const WARM_UP: u64 = 5;

/// One transaction by the hand-written client (if given) or through rowlock.
async fn one(
    hand: &Option<Hand>,
    db: &rowlock::Db,
    prepared: &mut workloads::Prepared,
    sizes: &Sizes,
    workload: Workload,
    rng: &mut Rng,
) -> Result<i64, BoxError> {
    match hand {
        Some(h) => h.run(workload, rng, sizes).await,
        None => Ok(workloads::with_rowlock(db, workload, rng, sizes, prepared).await?),
    }
}

/// Runs `clients` tasks of hand-written or rowlock transactions. Returns the measure and the
/// transactions/rows committed in total, warm-up included (for the checks).
async fn run_in_process(
    db: &TestDatabase,
    imp: Imp,
    workload: Workload,
    clients: usize,
    limit: Limit,
    sizes: &Arc<Sizes>,
) -> Result<(Measure, u64, u64), BoxError> {
    // ROWLOCK_BENCH_CHECK_PRIMARY=1: the pool checks its server is a primary at each checkout
    // (`Builder::check_primary`), to measure what that round trip costs. The hand-pooled
    // clients use the same pool.
    let handle = if std::env::var_os("ROWLOCK_BENCH_CHECK_PRIMARY").is_some() {
        db.db_with(rowlock::Db::builder().max_size(clients).check_primary(true))?
    } else {
        db.db(clients)
    };
    let start = Arc::new(Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let hand = match imp {
            Imp::Hand => Some(Hand::new(db.client().await?).await?),
            Imp::HandPool => Some(Hand::Pooled(handle.pool().clone())),
            _ => None,
        };
        let (handle, start, sizes) = (handle.clone(), start.clone(), sizes.clone());
        tasks.push(tokio::spawn(async move {
            let mut prepared = workloads::Prepared::new();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((c as u64 + 1) << 17));
            let mut run = ClientRun {
                latencies_us: Vec::new(),
                committed: 0,
                rows: 0,
            };
            for _ in 0..WARM_UP {
                run.rows +=
                    one(&hand, &handle, &mut prepared, &sizes, workload, &mut rng).await? as u64;
                run.committed += 1;
            }
            start.wait().await;
            let started = Instant::now();
            let mut timed = ClientRun {
                latencies_us: Vec::with_capacity(4096),
                committed: 0,
                rows: 0,
            };
            loop {
                match limit {
                    Limit::Secs(s) if started.elapsed() >= Duration::from_secs(s) => break,
                    Limit::Count(n) if timed.committed >= n => break,
                    _ => {}
                }
                let t = Instant::now();
                timed.rows +=
                    one(&hand, &handle, &mut prepared, &sizes, workload, &mut rng).await? as u64;
                timed
                    .latencies_us
                    .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                timed.committed += 1;
            }
            Ok::<_, BoxError>((run, timed, started.elapsed()))
        }));
    }
    start.wait().await;
    let cpu_before = thread_cpu_ns();
    let allocs_before = alloc::allocations();
    let mut timed_runs = Vec::new();
    let (mut committed, mut rows, mut elapsed) = (0, 0, Duration::ZERO);
    for t in tasks {
        let (warm, timed, took) = t.await??;
        committed += warm.committed + timed.committed;
        rows += warm.rows + timed.rows;
        elapsed = elapsed.max(took);
        timed_runs.push(timed);
    }
    let timed_committed: u64 = timed_runs.iter().map(|r| r.committed).sum();
    let (mut m, _, _) = measure(timed_runs, elapsed);
    // The clients and their connections' tasks all run in this process, on this thread; the
    // allocations of the whole timed part, per transaction.
    m.allocs_per_tx = (alloc::allocations() - allocs_before) as f64 / timed_committed.max(1) as f64;
    if let (Some(before), Some(after)) = (cpu_before, thread_cpu_ns()) {
        m.client_cpu_us = (after - before) as f64 / 1000.0 / timed_committed.max(1) as f64;
    }
    Ok((m, committed, rows))
}

struct Pgbench {
    path: PathBuf,
    args: Vec<String>,
    password: Option<String>,
    dir: PathBuf,
}

impl Pgbench {
    fn new(db: &TestDatabase, bindir: PathBuf, dir: PathBuf) -> Result<Pgbench, BoxError> {
        let config = db.config();
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let mut args = vec!["-h".into(), host, "-p".into(), port.to_string()];
        if let Some(user) = config.get_user() {
            args.extend(["-U".into(), user.to_string()]);
        }
        args.push(db.name().to_string());
        Ok(Pgbench {
            path: bindir.join("pgbench"),
            args,
            password: config
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            dir,
        })
    }

    /// Runs one pgbench; returns the measure and the transactions it committed.
    fn run(
        &self,
        workload: Workload,
        sizes: &Sizes,
        clients: usize,
        limit: Limit,
    ) -> Result<(Measure, u64), BoxError> {
        let script = self.dir.join(format!("{}.sql", workload.name()));
        std::fs::write(&script, workload.pgbench_script(sizes))?;
        let prefix = self.dir.join("log");
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("log."))
            {
                std::fs::remove_file(path)?;
            }
        }
        let mut cmd = Command::new(&self.path);
        cmd.args(["-n", "-M", "prepared", "-j", "1", "-l"])
            .arg(format!("--log-prefix={}", prefix.display()))
            .arg("-c")
            .arg(clients.to_string())
            .arg("-f")
            .arg(&script);
        match limit {
            Limit::Secs(s) => cmd.arg("-T").arg(s.to_string()),
            Limit::Count(n) => cmd.arg("-t").arg(n.to_string()),
        };
        cmd.args(&self.args);
        if let Some(p) = &self.password {
            cmd.env("PGPASSWORD", p);
        }
        let out = cmd.output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "pgbench failed ({}): {}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let field = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| {
                    v.split_whitespace()
                        .next()?
                        .split('/')
                        .next()?
                        .parse::<f64>()
                        .ok()
                })
        };
        let processed = field("number of transactions actually processed: ")
            .ok_or_else(|| format!("pgbench printed no transaction count: {stdout}"))?
            as u64;
        let tps = field("tps = ").ok_or("pgbench printed no tps")?;
        let mut latencies = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("log."))
            {
                for line in std::fs::read_to_string(&path)?.lines() {
                    if let Some(us) = line
                        .split_whitespace()
                        .nth(2)
                        .and_then(|v| v.parse::<u32>().ok())
                    {
                        latencies.push(us);
                    }
                }
            }
        }
        latencies.sort_unstable();
        Ok((
            Measure {
                tps,
                rows_per_s: tps * workload.batch() as f64, // corrected from the data below
                p50_ms: percentile(&latencies, 0.5),
                p99_ms: percentile(&latencies, 0.99),
                client_cpu_us: f64::NAN,
                allocs_per_tx: f64::NAN,
            },
            processed,
        ))
    }
}

/// Checks a run against the data; returns a failure description, if any.
fn check(
    workload: Workload,
    imp: Imp,
    before: Snapshot,
    after: Snapshot,
    committed: u64,
    rows: Option<u64>,
) -> Option<String> {
    let failed = match workload {
        Workload::Accept | Workload::AcceptCas => (after.doubly_accepted != 0).then(|| {
            format!(
                "{} projects with more than one accepted proposal",
                after.doubly_accepted
            )
        }),
        Workload::HotRow | Workload::Spread => {
            let delta = after.counter_sum - before.counter_sum;
            (delta != committed as i64)
                .then(|| format!("counters grew by {delta} for {committed} committed transactions"))
        }
        Workload::NowaitBusy => {
            let delta = after.counter_sum - before.counter_sum;
            let rejected = rows.unwrap_or(committed);
            if delta != 0 {
                Some(format!("counters grew by {delta}"))
            } else {
                (rejected != committed)
                    .then(|| format!("{rejected} rejections in {committed} tries of held rows"))
            }
        }
        Workload::ClaimOne
        | Workload::ClaimBatch
        | Workload::ClaimSpread
        | Workload::ClaimLocked => {
            let done = after.jobs_done - before.jobs_done;
            if after.jobs_claimed_twice != 0 {
                Some(format!(
                    "{} rows processed more than once",
                    after.jobs_claimed_twice
                ))
            } else if after.claims_sum != after.jobs_done {
                Some(format!(
                    "{} rows done but {} claims",
                    after.jobs_done, after.claims_sum
                ))
            } else {
                rows.filter(|r| *r as i64 != done)
                    .map(|r| format!("{done} rows done but {r} claimed"))
            }
        }
    };
    failed.map(|f| format!("{} / {}: {f}", workload.name(), imp.name()))
}

fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("rowlock-bench")
}

fn main() -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<(), BoxError> {
    let mode = Mode::from_args();
    let cluster = Arc::new(
        if mode.durable && std::env::var_os("DATABASE_URL").is_none() {
            TestCluster::start_with(&[
                ("fsync", "on"),
                ("synchronous_commit", "on"),
                ("full_page_writes", "on"),
            ])?
        } else {
            // With DATABASE_URL the server's own settings apply (printed with the results).
            TestCluster::from_env()?
        },
    );
    let bindir = match cluster.bindir() {
        Some(dir) => dir.to_path_buf(),
        None => server_bindir()?,
    };
    let db = cluster.create_database_owned().await?;
    let admin = db.client().await?;
    let sizes = Arc::new(mode.sizes);
    let loading = Instant::now();
    workloads::load(&admin, &sizes).await?;
    eprintln!("loaded data in {:.1} s", loading.elapsed().as_secs_f64());
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let scratch = tempfile_dir()?;
    let pgbench = Pgbench::new(&db, bindir, scratch.clone())?;

    let mut cells = Vec::new();
    let mut failures = Vec::new();
    let only = std::env::var("ROWLOCK_BENCH_WORKLOADS").unwrap_or_default();
    // For profiling one implementation: ROWLOCK_BENCH_IMPLS=rowlock (names as printed).
    let impls = std::env::var("ROWLOCK_BENCH_IMPLS").unwrap_or_default();
    let selected: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| only.is_empty() || only.split(',').any(|o| o.trim() == w.name()))
        .collect();
    for &workload in &selected {
        // nowait_busy: a session holds the rows every client asks for, for the whole run.
        let holder = if workload == Workload::NowaitBusy {
            let holder = db.client().await?;
            holder.batch_execute(workloads::HOLD).await?;
            Some(holder)
        } else {
            None
        };
        for &clients in &mode.clients {
            let mut cell = Cell {
                workload,
                clients,
                runs: [Vec::new(), Vec::new(), Vec::new(), Vec::new()],
            };
            for round in 0..mode.rounds {
                for k in 0..Imp::ALL.len() {
                    let imp = Imp::ALL[(round + k) % Imp::ALL.len()];
                    if !impls.is_empty() && !impls.split(',').any(|i| i.trim() == imp.name()) {
                        cell.runs[imp as usize].push(Measure::default());
                        continue;
                    }
                    if imp == Imp::Pgbench && !workload.has_pgbench() {
                        cell.runs[imp as usize].push(Measure::missing());
                        continue;
                    }
                    let before = workloads::snapshot(&admin).await?;
                    let (mut m, committed, rows) = match imp {
                        Imp::Pgbench => {
                            let (m, committed) =
                                pgbench.run(workload, &sizes, clients, mode.limit)?;
                            (m, committed, None)
                        }
                        _ => {
                            let (m, committed, rows) =
                                run_in_process(&db, imp, workload, clients, mode.limit, &sizes)
                                    .await?;
                            (m, committed, Some(rows))
                        }
                    };
                    let after = workloads::snapshot(&admin).await?;
                    if imp == Imp::Pgbench && workload.is_claim() && committed > 0 {
                        // pgbench does not report rows: take them from the data.
                        let done = (after.jobs_done - before.jobs_done) as f64;
                        m.rows_per_s = m.tps * done / committed as f64;
                    }
                    if !workload.is_claim() {
                        m.rows_per_s = m.tps;
                    }
                    if let Some(f) = check(workload, imp, before, after, committed, rows) {
                        eprintln!("CHECK FAILED: {f}");
                        failures.push(f);
                    }
                    workloads::reset(&admin, workload).await?;
                    eprintln!(
                        "{:<11} {:>2} clients  {:<12} {:>8.0} tps  p50 {:.2} ms  p99 {:.2} ms  client CPU {:.1} µs/tx  {:.1} allocs/tx",
                        workload.name(),
                        clients,
                        imp.name(),
                        m.tps,
                        m.p50_ms,
                        m.p99_ms,
                        m.client_cpu_us,
                        m.allocs_per_tx
                    );
                    cell.runs[imp as usize].push(m);
                }
            }
            cells.push(cell);
        }
        if let Some(holder) = holder {
            holder.batch_execute("ROLLBACK").await?;
        }
    }

    let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let mut settings = Vec::new();
    for name in [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
        "max_connections",
    ] {
        let v: String = admin.query_one(&format!("SHOW {name}"), &[]).await?.get(0);
        settings.push(format!("{name}={v}"));
    }
    let mut md = String::new();
    md.push_str(&format!(
        "## Throughput ({} mode{})\n\nPostgreSQL {version}, {} cores, client and server on one machine; \
         {}; pgbench -M prepared -j 1; clients run on one Tokio current-thread runtime; \
         {}; medians of {} round(s), ratios are medians of per-round ratios.\n\n",
        if mode.quick { "quick" } else { "full" },
        if mode.durable { ", durable" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        settings.join(", "),
        match mode.limit {
            Limit::Secs(s) => format!("{s} s per run"),
            Limit::Count(n) => format!("{n} transactions per client per run"),
        },
        mode.rounds
    ));
    for &workload in &selected {
        let mine: Vec<&Cell> = cells.iter().filter(|c| c.workload == workload).collect();
        md.push_str(&report::table(workload, &mine));
        md.push('\n');
        std::fs::write(
            dir.join(format!("{}.svg", workload.name())),
            report::svg(workload, &mine),
        )?;
    }
    md.push_str(&report::targets(&cells));
    md.push_str(&format!(
        "Correctness checks: {}\n",
        if failures.is_empty() {
            "all passed (no project accepted twice; counters equal committed transactions; \
             no job processed twice, jobs done = jobs claimed)"
                .to_string()
        } else {
            format!("FAILED: {}", failures.join("; "))
        }
    ));
    println!("\n{md}");
    let name = if mode.durable {
        "throughput-durable.md"
    } else {
        "throughput.md"
    };
    std::fs::write(dir.join(name), &md)?;
    println!("written to {}", dir.display());
    let _ = std::fs::remove_dir_all(&scratch);
    drop((admin, db));
    drop(cluster);
    if !failures.is_empty() {
        return Err(format!("{} correctness check(s) failed", failures.len()).into());
    }
    Ok(())
}

/// CPU time this thread has used, in ns (Linux `schedstat`); the clients all run on it.
fn thread_cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// A scratch directory for pgbench scripts and logs.
fn tempfile_dir() -> Result<PathBuf, BoxError> {
    let dir = std::env::temp_dir().join(format!("rowlock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
