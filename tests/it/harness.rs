//! The test harness itself: stop/restart, and no server outliving its owner, exited or killed.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rowlock_testing::{StopMode, TestCluster};

const CHILD_ENV: &str = "ROWLOCK_HARNESS_CHILD";

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// Prints where `cluster` lives (its directory and postmaster pid), for the parent test.
fn report(cluster: &TestCluster) {
    let log = cluster.log_file().expect("embedded");
    let dir = log.parent().unwrap().to_path_buf();
    let pid = std::fs::read_to_string(dir.join("data/postmaster.pid")).unwrap();
    // libtest prints the test's name on the same line first: mark the start of our part.
    println!(
        "\nCLUSTER {} {}",
        dir.display(),
        pid.lines().next().unwrap()
    );
}

/// What a child reported with [`report`], read from its output `line`.
fn reported(line: &str) -> (PathBuf, u32) {
    let start = line
        .find("CLUSTER ")
        .expect("the child reported its cluster");
    let mut parts = line[start..].split_whitespace().skip(1);
    let dir = PathBuf::from(parts.next().unwrap());
    (dir, parts.next().unwrap().parse().unwrap())
}

/// This test binary, running only the ignored helper test `helper`.
fn child(helper: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            helper,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stderr(Stdio::null());
    command
}

/// Run by `a_killed_owner_takes_its_cluster_with_it` in a child process: starts a cluster,
/// reports where it lives, and waits to be killed.
#[test]
#[ignore = "helper: runs only as the child process of a harness test"]
fn child_starts_a_cluster_and_waits_to_be_killed() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cluster = TestCluster::start().expect("cluster");
    report(&cluster);
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_killed_owner_takes_its_cluster_with_it() {
    if std::env::var_os("DATABASE_URL").is_some() && TestCluster::start().is_err() {
        eprintln!("no server binaries next to DATABASE_URL: nothing to check");
        return;
    }
    let mut child = child("harness::child_starts_a_cluster_and_waits_to_be_killed")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("CLUSTER "));
    let Some(line) = line else {
        let _ = child.kill();
        panic!("the child did not report its cluster");
    };
    let (dir, postmaster) = reported(&line);
    assert!(pid_alive(postmaster), "the child's server is running");
    child.kill().unwrap(); // SIGKILL: no destructor, no atexit
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (pid_alive(postmaster) || dir.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !pid_alive(postmaster),
        "postmaster {postmaster} outlived its killed owner"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

/// Run by `the_shared_cluster_is_gone_when_its_process_has_exited` in a child process: starts
/// the shared cluster, reports where it lives, and returns (the process then exits).
#[test]
#[ignore = "helper: runs only as the child process of a harness test"]
fn child_starts_the_shared_cluster_and_exits() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    report(TestCluster::shared().expect("cluster"));
}

/// The shared cluster (a static, never dropped) is stopped and deleted before its test
/// process is gone, not a moment later: `cargo test` returns with no server left.
#[test]
fn the_shared_cluster_is_gone_when_its_process_has_exited() {
    if std::env::var_os("DATABASE_URL").is_some() {
        eprintln!("the shared cluster is DATABASE_URL's server: nothing to check");
        return;
    }
    let output = child("harness::child_starts_the_shared_cluster_and_exits")
        .output()
        .unwrap();
    assert!(output.status.success(), "the child failed");
    let (dir, postmaster) = reported(&String::from_utf8_lossy(&output.stdout));
    // Checked at once: no waiting for a guardian to notice.
    assert!(
        !pid_alive(postmaster),
        "postmaster {postmaster} outlived its exited owner"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[tokio::test]
async fn stop_start_and_restart_keep_the_data() {
    let cluster = match TestCluster::start() {
        Ok(c) => Arc::new(c),
        Err(e) if std::env::var_os("DATABASE_URL").is_some() => {
            eprintln!("no server binaries next to DATABASE_URL ({e}): nothing to check");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let pg = cluster.create_database_owned().await.unwrap();
    pg.client()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    let log = cluster.log_file().unwrap();
    let dir = log.parent().unwrap().to_path_buf();

    let blocking = cluster.clone();
    tokio::task::spawn_blocking(move || blocking.stop(StopMode::Fast))
        .await
        .unwrap()
        .unwrap();
    assert!(
        pg.client().await.is_err(),
        "stopped server refuses connections"
    );
    let blocking = cluster.clone();
    tokio::task::spawn_blocking(move || blocking.start_again())
        .await
        .unwrap()
        .unwrap();
    let x: i32 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT x FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 7);

    let session = pg.session().await.unwrap();
    let blocking = cluster.clone();
    tokio::task::spawn_blocking(move || blocking.restart(StopMode::Immediate))
        .await
        .unwrap()
        .unwrap();
    assert!(
        session.batch_execute("SELECT 1").await.is_err(),
        "old sessions are gone"
    );
    let x: i32 = pg
        .client()
        .await
        .unwrap()
        .query_one("SELECT x FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 7, "committed data survives an immediate restart");

    let victim = pg.session().await.unwrap();
    assert!(cluster.terminate_backend(victim.pid()).await.unwrap());
    assert!(victim.batch_execute("SELECT 1").await.is_err());

    drop((session, victim, pg));
    let cluster = Arc::try_unwrap(cluster).expect("last reference");
    drop(cluster);
    assert!(!dir.exists(), "dropping the cluster removed its directory");
}

/// The attribute hands the test a handle on a fresh copy of the setup's schema and rows.
#[rowlock_testing::test(
    setup = "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
                                 INSERT INTO accounts VALUES (1, 100);"
)]
async fn the_test_attribute_hands_a_ready_handle(db: rowlock::Db) {
    let outcome = db
        .with_locked_row(
            &1,
            rowlock::Lock::no_wait(),
            |tx, a: crate::support::Account| {
                Box::pin(async move {
                    tx.execute("UPDATE accounts SET balance = 0 WHERE id = $1", &[&a.id])
                        .await?;
                    Ok::<_, rowlock::Error>(a.balance)
                })
            },
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        rowlock::Outcome::Done(100),
        "the setup's row, untouched"
    );
}

/// Every test gets its own copy: this one changes the row the one above reads, and both pass
/// in any order, in parallel.
#[rowlock_testing::test(
    setup = "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
                                 INSERT INTO accounts VALUES (1, 100);"
)]
async fn each_test_gets_its_own_copy_of_the_template(
    pg: rowlock_testing::TestDatabase,
) -> Result<(), Box<dyn std::error::Error>> {
    let client = pg.client().await?;
    client
        .batch_execute(
            "UPDATE accounts SET balance = 1 WHERE id = 1; INSERT INTO accounts VALUES (2, 5)",
        )
        .await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM accounts", &[])
        .await?
        .get(0);
    assert_eq!(n, 2);
    Ok(())
}

/// A schema several tests share, as a constant (not only a literal).
const SHOP: &str = "CREATE SCHEMA shop;
    CREATE TABLE shop.orders (id bigint PRIMARY KEY, status text NOT NULL);
    INSERT INTO shop.orders VALUES (1, 'new');";

#[rowlock_testing::test(setup = SHOP)]
async fn the_setup_may_be_a_constant(db: rowlock::Db) {
    let status: String = db
        .pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT status FROM shop.orders WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "new");
}

#[rowlock_testing::test]
async fn without_setup_the_database_is_empty(db: rowlock::Db) {
    let tables: i64 = db
        .pool()
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}

/// A setup whose SQL the server refuses says what the server said (it said only "a test
/// harness query failed", so a typo in a schema gave no clue); so does a failed connection.
#[tokio::test]
async fn a_failed_setup_says_what_the_server_said() {
    let cluster = TestCluster::shared().unwrap();
    let err = cluster
        .create_database_with("CREATE TABLE t (id int); SELECT no_such_function()")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no_such_function"), "{text}");
    assert!(
        matches!(err, rowlock_testing::HarnessError::Setup { .. }),
        "{err:?}"
    );
    // Where in the setup: the line and column the server points at, and that line. A second
    // test with the same setup is told the same (it was told the template database "already
    // exists": the first left it behind, half made).
    let setup = "CREATE TABLE ok (id int);\n  CREAT TABLE bad (id int);";
    for _ in 0..2 {
        let text = cluster
            .create_database_with(setup)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("line 2, column 3 (`CREAT TABLE bad (id int);`)")
                && text.contains("syntax error at or near \"CREAT\""),
            "{text}"
        );
    }
    // A race script's setup alike.
    let err = rowlock_testing::interleave::Script::new("bad setup")
        .setup(setup)
        .session("a", |s| s.sql("a1", "SELECT 1"))
        .run()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("line 2, column 3"), "{err}");
    let mut config = cluster.config().clone();
    config.dbname("no_such_database_here");
    let refused = config
        .connect(rowlock::tokio_postgres::NoTls)
        .await
        .map(drop)
        .map_err(rowlock_testing::HarnessError::Connect)
        .unwrap_err();
    let text = refused.to_string();
    assert!(text.contains("no_such_database_here"), "{text}");
}
