//! The high-availability stack teams run, started for a test: one etcd member, two Patroni
//! nodes managing PostgreSQL with synchronous replication, HAProxy routing one address to
//! whichever node Patroni's REST API reports as primary, and optionally PgBouncer in front of
//! HAProxy.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_postgres::Config;

use super::HarnessError;
use super::cluster::{
    START_TIMEOUT, chown, chown_dir, command_as, find_bindir, find_pgbouncer, free_port, io,
    log_tail, spawn_guardian, start_pgbouncer, unprivileged_user,
};

/// The timing of the stack, chosen for fast tests. Production defaults, for comparison:
/// Patroni's `ttl` 30 s, `loop_wait` 10 s, `retry_timeout` 10 s; the HAProxy template in
/// Patroni's documentation checks every 3 s and marks a server down after 3 failed checks and
/// up after 2 (`inter 3s fall 3 rise 2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaTiming {
    /// Patroni's `ttl`: how long the leader key lives without being renewed; an unplanned
    /// failover starts when it expires.
    pub ttl: Duration,
    /// Patroni's `loop_wait`: the pause between two runs of its HA loop.
    pub loop_wait: Duration,
    /// Patroni's `retry_timeout`: how long it retries the DCS and PostgreSQL before demoting.
    pub retry_timeout: Duration,
    /// HAProxy's health check interval (`inter`); a server is marked down after 2 failed
    /// checks (`fall 2`) and up after 1 passed check (`rise 1`).
    pub check_interval: Duration,
}

/// The timing [`HaStack::start`] uses: `ttl` 10 s, `loop_wait` 1 s, `retry_timeout` 3 s
/// (Patroni requires `loop_wait + 2 × retry_timeout ≤ ttl`), HAProxy checks every 500 ms.
pub const FAST_TIMING: HaTiming = HaTiming {
    ttl: Duration::from_secs(10),
    loop_wait: Duration::from_secs(1),
    retry_timeout: Duration::from_secs(3),
    check_interval: Duration::from_millis(500),
};

/// One Patroni node: its names, its ports, its process.
#[derive(Debug)]
struct Node {
    name: String,
    pg_port: u16,
    api_port: u16,
    /// `runuser` (or Patroni itself), while this harness runs it.
    patroni: Mutex<Option<Child>>,
}

/// etcd, two Patroni nodes with synchronous replication, HAProxy (and PgBouncer) on loopback,
/// in a temporary directory, run as an unprivileged user when the tests run as root; stopped
/// and removed when dropped, and also when the test process exits or is killed (the same
/// guardian as [`TestCluster`](crate::TestCluster)'s).
///
/// Needs `patroni`, `etcd` and `haproxy` (Debian 12: `apt-get install patroni etcd-server
/// haproxy`), and `pgbouncer` for [`HaStack::start_behind_pgbouncer`]; without them the start
/// fails with [`HarnessError::NoBinaries`] naming the packages, which a test may treat as
/// "skip". [`HaStack::url`] is the one address a service uses. Blocking: start it from
/// `spawn_blocking` in an async test.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use rowlock_testing::HaStack;
///
/// let stack = tokio::task::spawn_blocking(HaStack::start).await??;
/// let db = rowlock::Db::builder().url(&stack.url("postgres")).build()?;
/// let old = stack.leader().await.expect("a primary");
/// stack.switchover().await?; // patronictl switchover, as in a deploy
/// assert_ne!(stack.leader().await.as_deref(), Some(old.as_str()));
/// # drop(db); Ok(()) }
/// ```
#[derive(Debug)]
pub struct HaStack {
    dir: PathBuf,
    run_as: Option<String>,
    timing: HaTiming,
    bin: Binaries,
    nodes: Vec<Node>,
    haproxy_port: u16,
    pgbouncer_port: Option<u16>,
    /// etcd, HAProxy and PgBouncer, while this harness runs them.
    others: Mutex<Vec<Child>>,
    guardian: Mutex<Option<(Child, ChildStdin)>>,
}

/// Which packages the stack needs, and where they are.
#[derive(Debug)]
struct Binaries {
    patroni: PathBuf,
    patronictl: PathBuf,
    etcd: PathBuf,
    haproxy: PathBuf,
}

impl HaStack {
    /// Starts the stack with [`FAST_TIMING`] and waits until a primary serves writes through
    /// HAProxy and the other node is its synchronous standby.
    pub fn start() -> Result<HaStack, HarnessError> {
        HaStack::start_with(FAST_TIMING, false)
    }

    /// [`HaStack::start`], with PgBouncer (transaction pooling) in front of HAProxy:
    /// [`HaStack::url`] is then PgBouncer's address. PgBouncer tries a failed server login
    /// again after 1 s (`server_login_retry`; its default, 15 s, would hold every client that
    /// long after a failover).
    pub fn start_behind_pgbouncer() -> Result<HaStack, HarnessError> {
        HaStack::start_with(FAST_TIMING, true)
    }

    fn start_with(timing: HaTiming, pgbouncer: bool) -> Result<HaStack, HarnessError> {
        let bin = find_binaries()?;
        let bouncer = if pgbouncer {
            Some(find_pgbouncer()?)
        } else {
            None
        };
        let bindir = find_bindir()?;
        let run_as = unprivileged_user()?;
        let dir = tempfile::Builder::new()
            .prefix("rowlock-ha-")
            .tempdir()
            .map_err(|e| io("creating a temporary directory", e))?
            .keep();
        let guardian = spawn_guardian(&dir)?;
        let mut stack = HaStack {
            dir,
            run_as,
            timing,
            bin,
            nodes: Vec::new(),
            haproxy_port: 0,
            pgbouncer_port: None,
            others: Mutex::new(Vec::new()),
            guardian: Mutex::new(Some(guardian)),
        };
        // From here on, dropping `stack` stops whatever was started.
        for sub in ["run", "etcd", "node1", "node2"] {
            std::fs::create_dir_all(stack.dir.join(sub))
                .map_err(|e| io("creating the stack's directories", e))?;
        }
        if let Some(user) = &stack.run_as {
            chown_dir(&stack.dir, user)?;
            for sub in ["run", "etcd", "node1", "node2"] {
                chown_dir(&stack.dir.join(sub), user)?;
            }
        }
        let etcd_port = stack.start_etcd(&stack.bin.etcd)?;
        for name in ["node1", "node2"] {
            let node = Node {
                name: name.to_string(),
                pg_port: free_port()?,
                api_port: free_port()?,
                patroni: Mutex::new(None),
            };
            stack.write_patroni_config(&node, etcd_port, &bindir)?;
            stack.nodes.push(node);
        }
        for node in &stack.nodes {
            stack.spawn_patroni(node, &stack.bin.patroni)?;
        }
        stack.haproxy_port = stack.start_haproxy(&stack.bin.haproxy)?;
        if let Some(binary) = bouncer {
            let port = free_port()?;
            let child = start_pgbouncer(
                &stack.dir,
                stack.run_as.as_deref(),
                &binary,
                port,
                stack.haproxy_port,
                "server_login_retry = 1\nserver_connect_timeout = 2\nquery_wait_timeout = 30\n",
            )?;
            stack.lock_others().push(child);
            stack.pgbouncer_port = Some(port);
        }
        stack.wait_until_ready(START_TIMEOUT)?;
        Ok(stack)
    }

    /// The timing the stack runs with.
    pub fn timing(&self) -> HaTiming {
        self.timing
    }

    /// The one address a service uses, for database `dbname`: PgBouncer's when the stack has
    /// one, else HAProxy's. `connect_timeout=2`: a connection attempt to a server going away
    /// gives up in 2 s instead of the operating system's TCP timeout.
    pub fn url(&self, dbname: &str) -> String {
        let port = self.pgbouncer_port.unwrap_or(self.haproxy_port);
        format!("postgres://postgres@127.0.0.1:{port}/{dbname}?connect_timeout=2")
    }

    /// HAProxy's port (the primary's address).
    pub fn haproxy_port(&self) -> u16 {
        self.haproxy_port
    }

    /// PgBouncer's port, when the stack has one.
    pub fn pgbouncer_port(&self) -> Option<u16> {
        self.pgbouncer_port
    }

    /// The nodes' names (`node1`, `node2`).
    pub fn nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The PostgreSQL port of node `name`: what `inet_server_port()` answers on it.
    pub fn node_port(&self, name: &str) -> Option<u16> {
        self.node(name).ok().map(|n| n.pg_port)
    }

    /// Connection settings for database `dbname` on node `name` directly (not through
    /// HAProxy), to read what a node holds.
    pub fn node_config(&self, name: &str, dbname: &str) -> Result<Config, HarnessError> {
        let node = self.node(name)?;
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(node.pg_port)
            .user("postgres")
            .dbname(dbname)
            .application_name("rowlock-testing")
            .connect_timeout(Duration::from_secs(5));
        Ok(config)
    }

    /// The node Patroni's REST API reports as primary (`GET /primary` answers 200), if any.
    pub async fn leader(&self) -> Option<String> {
        for node in &self.nodes {
            if self.role_is(node, "primary").await {
                return Some(node.name.clone());
            }
        }
        None
    }

    /// Whether node `name`'s REST API answers 200 to `GET /{check}`: `primary`, `replica`
    /// (running as a replica), `sync` (the synchronous standby), `health` (PostgreSQL up).
    pub async fn check(&self, name: &str, check: &str) -> Result<bool, HarnessError> {
        let node = self.node(name)?;
        Ok(self.role_is(node, check).await)
    }

    /// Waits until node `name` answers 200 to `GET /{check}` (see [`HaStack::check`]).
    pub async fn wait_for(
        &self,
        name: &str,
        check: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let node = self.node(name)?;
        let deadline = Instant::now() + timeout;
        while !self.role_is(node, check).await {
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(
                    timeout,
                    format!("{name} to answer 200 to /{check}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// A planned switchover, as in a deploy: `patronictl switchover` from the current primary
    /// to the other node, returning when patronictl reports it done (it waits for the new
    /// primary). Returns the new primary's name.
    pub async fn switchover(&self) -> Result<String, HarnessError> {
        let leader = self
            .leader()
            .await
            .ok_or_else(|| HarnessError::Start("no primary to switch over from".into()))?;
        let candidate = self
            .nodes
            .iter()
            .find(|n| n.name != leader)
            .map(|n| n.name.clone())
            .expect("two nodes");
        let mut command = command_as(self.run_as.as_deref(), &self.bin.patronictl);
        command
            .arg("-c")
            .arg(self.dir.join(format!("{leader}.yml")))
            .args(["switchover", "--leader", &leader, "--candidate", &candidate])
            .arg("--force")
            .current_dir(&self.dir);
        let out = tokio::task::spawn_blocking(move || command.output())
            .await
            .map_err(|e| HarnessError::Io(format!("running patronictl: {e}")))?
            .map_err(|e| io("running patronictl", e))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.contains("Successfully switched over") {
            return Err(HarnessError::Start(format!(
                "patronictl switchover failed ({}): {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(candidate)
    }

    /// An unplanned failure of node `name`, as when its machine dies: its Patroni and its
    /// PostgreSQL are killed (`SIGKILL`), so nothing releases the leader key: the other node
    /// takes over when the key's `ttl` expires.
    pub fn crash(&self, name: &str) -> Result<(), HarnessError> {
        let node = self.node(name)?;
        let pid_file = self.dir.join("run").join(format!("manager-{name}.pid"));
        if let Some(pid) = read_pid(&pid_file) {
            signal("-KILL", pid);
        }
        let _ = std::fs::remove_file(&pid_file);
        let postmaster = self.dir.join(name).join("data/postmaster.pid");
        if let Some(pid) = read_pid(&postmaster) {
            signal("-KILL", pid);
        }
        if let Some(mut child) = node.lock_patroni().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Patroni starts PostgreSQL as a process of its own; wait until the postmaster is gone
        // (its children follow it).
        let deadline = Instant::now() + Duration::from_secs(10);
        while read_pid(&postmaster).is_some_and(alive) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Starts node `name`'s Patroni again (after [`HaStack::crash`]): it rejoins as a replica
    /// of the current primary, rewinding its data directory (`pg_rewind`) when it diverged.
    pub fn restart_node(&self, name: &str) -> Result<(), HarnessError> {
        let node = self.node(name)?;
        self.spawn_patroni(node, &self.bin.patroni)
    }

    /// The tail of node `name`'s Patroni log, for a failure message.
    pub fn patroni_log(&self, name: &str) -> String {
        log_tail(&self.dir.join(format!("{name}.log")), 0)
    }

    fn node(&self, name: &str) -> Result<&Node, HarnessError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            HarnessError::Config(format!(
                "no node {name:?} in the stack (its nodes: {:?})",
                self.nodes()
            ))
        })
    }

    fn lock_others(&self) -> std::sync::MutexGuard<'_, Vec<Child>> {
        self.others.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn role_is(&self, node: &Node, check: &str) -> bool {
        http_status(node.api_port, check).await == Some(200)
    }

    fn write_file(&self, name: &str, text: &str) -> Result<(), HarnessError> {
        let path = self.dir.join(name);
        std::fs::write(&path, text).map_err(|e| io(&format!("writing {name}"), e))?;
        if let Some(user) = &self.run_as {
            chown(&path, user)?;
        }
        Ok(())
    }

    /// Spawns `program args…` as the stack's user, writing its pid to `run/{pid_name}.pid`
    /// (`exec` keeps the pid: the guardian signals the program itself, not `runuser`), with
    /// its output in `{log}`.
    fn spawn(
        &self,
        program: &Path,
        args: &[&str],
        pid_name: &str,
        log: &str,
    ) -> Result<Child, HarnessError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(log))
            .map_err(|e| io("opening a log file", e))?;
        let pid_file = self.dir.join("run").join(format!("{pid_name}.pid"));
        let mut command = command_as(self.run_as.as_deref(), Path::new("/bin/sh"));
        command
            .arg("-c")
            .arg("echo $$ > \"$0\"; exec \"$@\"")
            .arg(&pid_file)
            .arg(program)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| io("opening a log file", e))?)
            .stderr(log)
            // Its own process group: a Ctrl-C aimed at `cargo test` does not hit it; the
            // guardian stops it instead.
            .process_group(0);
        command
            .spawn()
            .map_err(|e| io(&format!("starting {}", program.display()), e))
    }

    fn start_etcd(&self, etcd: &Path) -> Result<u16, HarnessError> {
        let (client, peer) = (free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = self.dir.join("etcd").display().to_string();
        let cluster = format!("etcd1={peer_url}");
        let child = self.spawn(
            etcd,
            &[
                "--name",
                "etcd1",
                "--data-dir",
                &data,
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &cluster,
                "--log-level",
                "warn",
            ],
            "store-etcd",
            "etcd.log",
        )?;
        self.lock_others().push(child);
        wait_for_port(client, "etcd", &self.dir.join("etcd.log"))?;
        Ok(client)
    }

    fn write_patroni_config(
        &self,
        node: &Node,
        etcd_port: u16,
        bindir: &Path,
    ) -> Result<(), HarnessError> {
        let t = self.timing;
        let dir = self.dir.join(&node.name);
        let scope = format!(
            "rowlock-{}",
            self.dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("ha")
                .trim_start_matches("rowlock-ha-")
        );
        let yaml = format!(
            "scope: {scope}\n\
             namespace: /rowlock-testing/\n\
             name: {name}\n\
             log:\n  level: INFO\n\
             restapi:\n  listen: 127.0.0.1:{api}\n  connect_address: 127.0.0.1:{api}\n\
             etcd3:\n  hosts: 127.0.0.1:{etcd_port}\n\
             bootstrap:\n\
             \x20 dcs:\n\
             \x20   ttl: {ttl}\n\
             \x20   loop_wait: {loop_wait}\n\
             \x20   retry_timeout: {retry_timeout}\n\
             \x20   maximum_lag_on_failover: 1048576\n\
             \x20   synchronous_mode: true\n\
             \x20   postgresql:\n\
             \x20     use_pg_rewind: true\n\
             \x20     use_slots: true\n\
             \x20     parameters:\n\
             \x20       wal_log_hints: 'on'\n\
             \x20       max_connections: 200\n\
             \x20       log_min_messages: warning\n\
             \x20 initdb:\n  - encoding: UTF8\n  - locale: C\n  - auth: trust\n\
             \x20 pg_hba:\n\
             \x20 - local all all trust\n\
             \x20 - host all all 127.0.0.1/32 trust\n\
             \x20 - host replication all 127.0.0.1/32 trust\n\
             postgresql:\n\
             \x20 listen: 127.0.0.1:{pg}\n\
             \x20 connect_address: 127.0.0.1:{pg}\n\
             \x20 data_dir: {dir}/data\n\
             \x20 bin_dir: {bindir}\n\
             \x20 pgpass: {dir}/pgpass\n\
             \x20 authentication:\n\
             \x20   superuser: {{username: postgres, password: postgres}}\n\
             \x20   replication: {{username: replicator, password: replicator}}\n\
             \x20   rewind: {{username: postgres, password: postgres}}\n\
             \x20 parameters:\n\
             \x20   unix_socket_directories: {dir}\n",
            name = node.name,
            api = node.api_port,
            pg = node.pg_port,
            ttl = t.ttl.as_secs(),
            loop_wait = t.loop_wait.as_secs(),
            retry_timeout = t.retry_timeout.as_secs(),
            dir = dir.display(),
            bindir = bindir.display(),
        );
        self.write_file(&format!("{}.yml", node.name), &yaml)
    }

    fn spawn_patroni(&self, node: &Node, patroni: &Path) -> Result<(), HarnessError> {
        let config = self
            .dir
            .join(format!("{}.yml", node.name))
            .display()
            .to_string();
        let child = self.spawn(
            patroni,
            &[&config],
            &format!("manager-{}", node.name),
            &format!("{}.log", node.name),
        )?;
        if let Some(mut old) = node.lock_patroni().replace(child) {
            let _ = old.kill();
            let _ = old.wait();
        }
        Ok(())
    }

    fn start_haproxy(&self, haproxy: &Path) -> Result<u16, HarnessError> {
        let port = free_port()?;
        let inter = self.timing.check_interval.as_millis();
        let mut config = format!(
            "global\n  maxconn 4000\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30m\n  \
             timeout server 30m\n  timeout check 1s\n\
             listen primary\n  bind 127.0.0.1:{port}\n  option httpchk OPTIONS /primary\n  \
             http-check expect status 200\n  \
             default-server inter {inter}ms fall 2 rise 1 on-marked-down shutdown-sessions\n"
        );
        for node in &self.nodes {
            config.push_str(&format!(
                "  server {} 127.0.0.1:{} maxconn 200 check port {}\n",
                node.name, node.pg_port, node.api_port
            ));
        }
        self.write_file("haproxy.cfg", &config)?;
        let cfg = self.dir.join("haproxy.cfg").display().to_string();
        let child = self.spawn(
            haproxy,
            &["-f", &cfg, "-db"],
            "proxy-haproxy",
            "haproxy.log",
        )?;
        self.lock_others().push(child);
        wait_for_port(port, "haproxy", &self.dir.join("haproxy.log"))?;
        Ok(port)
    }

    /// Waits until one node is primary, the other its synchronous standby, and a connection
    /// through the service address reaches a server that accepts writes.
    fn wait_until_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io("a runtime to wait for the stack", e))?;
        let deadline = Instant::now() + timeout;
        runtime.block_on(async {
            loop {
                if let Some(leader) = self.leader().await {
                    let standby = self.nodes.iter().find(|n| n.name != leader);
                    let synced = match standby {
                        Some(n) => self.role_is(n, "sync").await,
                        None => false,
                    };
                    if synced && self.writable().await {
                        return Ok(());
                    }
                }
                if Instant::now() > deadline {
                    return Err(HarnessError::Start(format!(
                        "the Patroni stack did not come up within {timeout:?}; node1's log \
                         says: {}\nnode2's log says: {}",
                        self.patroni_log("node1"),
                        self.patroni_log("node2")
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }

    /// Whether the service address reaches a server that accepts writes.
    async fn writable(&self) -> bool {
        let Ok(config) = self.url("postgres").parse::<Config>() else {
            return false;
        };
        let Ok(client) = super::connect(&config).await else {
            return false;
        };
        // The simple protocol: behind PgBouncer a prepared statement may not outlive its
        // transaction.
        let Ok(messages) = client.simple_query("SELECT pg_is_in_recovery()").await else {
            return false;
        };
        messages.iter().any(|m| {
            matches!(m, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("f"))
        })
    }
}

impl Drop for HaStack {
    fn drop(&mut self) {
        // The guardian stops everything in order (Patroni first, so nothing restarts a
        // server) and removes the directory; wait for it so the stack is gone when drop
        // returns.
        let guardian = self
            .guardian
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((mut child, stdin)) = guardian {
            drop(stdin);
            let _ = child.wait();
        }
        for node in &self.nodes {
            if let Some(mut child) = node.lock_patroni().take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for mut child in self.lock_others().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Node {
    fn lock_patroni(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.patroni.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn find_binaries() -> Result<Binaries, HarnessError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let find = |name: &str| {
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    };
    let (patroni, patronictl, etcd, haproxy) = (
        find("patroni"),
        find("patronictl"),
        find("etcd"),
        find("haproxy"),
    );
    match (patroni, patronictl, etcd, haproxy) {
        (Some(patroni), Some(patronictl), Some(etcd), Some(haproxy)) => Ok(Binaries {
            patroni,
            patronictl,
            etcd,
            haproxy,
        }),
        (p, c, e, h) => {
            let missing: Vec<&str> = [
                (p.is_none() || c.is_none(), "patroni"),
                (e.is_none(), "etcd"),
                (h.is_none(), "haproxy"),
            ]
            .into_iter()
            .filter_map(|(gone, name)| gone.then_some(name))
            .collect();
            Err(HarnessError::NoBinaries(format!(
                "the high-availability stack needs {} on PATH (Debian/Ubuntu: `apt-get install \
                 patroni etcd-server haproxy`)",
                missing.join(", ")
            )))
        }
    }
}

/// Waits until something listens on `port`, or gives up with the tail of `log`.
fn wait_for_port(port: u16, what: &str, log: &Path) -> Result<(), HarnessError> {
    let deadline = Instant::now() + START_TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(HarnessError::Start(format!(
                "{what} did not listen within {START_TIMEOUT:?}; its log says: {}",
                log_tail(log, 0)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The status code of `GET /{path}` on Patroni's REST API at `port`, or `None` when it does
/// not answer within a second.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request = format!("GET /{path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0_u8; 16];
        let mut read = 0;
        while read < 12 {
            let n = stream.read(&mut head[read..]).await.ok()?;
            if n == 0 {
                return None;
            }
            read += n;
        }
        // "HTTP/1.0 200 …"
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether process `pid` runs (a zombie, dead but not yet reaped, does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) S …": the state follows the last parenthesis.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn signal(signal: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}
