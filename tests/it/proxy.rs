//! A loopback TCP proxy that forwards everything until the server acknowledges a COMMIT, then
//! drops that reply and cuts the connection: a commit that succeeded but whose reply never
//! arrived.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rowlock::Db;
use rowlock::deadpool_postgres::{Manager, Pool};
use rowlock::tokio_postgres::config::Host;
use rowlock::tokio_postgres::{Config, NoTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A listener on a free loopback port, its address, and the address of the server `config`
/// names; `None` if the server is not on TCP.
async fn listen(config: &Config) -> Option<(TcpListener, SocketAddr, String)> {
    let Host::Tcp(host) = config.get_hosts().first()? else {
        return None;
    };
    let target = format!(
        "{host}:{}",
        config.get_ports().first().copied().unwrap_or(5432)
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.ok()?;
    let addr = listener.local_addr().ok()?;
    Some((listener, addr, target))
}

/// Settings for database `dbname` through a proxy at `addr`, with `config`'s credentials.
fn through(addr: SocketAddr, config: &Config, dbname: &str) -> Config {
    let mut via = Config::new();
    via.host("127.0.0.1").port(addr.port()).dbname(dbname);
    if let Some(user) = config.get_user() {
        via.user(user);
    }
    if let Some(password) = config.get_password() {
        via.password(password);
    }
    via
}

pub struct CommitReplyDropper {
    addr: SocketAddr,
    dropped: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

/// Whether `needle` occurs in `carry` + `chunk` (so a tag split across reads is still seen).
fn seen(carry: &mut Vec<u8>, chunk: &[u8], needle: &[u8]) -> bool {
    carry.extend_from_slice(chunk);
    let found = carry.windows(needle.len()).any(|w| w == needle);
    let keep = carry.len().saturating_sub(needle.len());
    carry.drain(..keep);
    found
}

impl CommitReplyDropper {
    /// Starts the proxy in front of the server `config` names; `None` if it is not on TCP.
    pub async fn start(config: &Config) -> Option<Self> {
        let (listener, addr, target) = listen(config).await?;
        let dropped = Arc::new(AtomicBool::new(false));
        let accept = tokio::spawn({
            let dropped = dropped.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        continue;
                    };
                    tokio::spawn(pump(client, server, dropped.clone()));
                }
            }
        });
        Some(CommitReplyDropper {
            addr,
            dropped,
            accept,
        })
    }

    /// A one-connection db to database `dbname` through the proxy, with `config`'s
    /// credentials.
    pub fn db(&self, config: &Config, dbname: &str) -> Db {
        let via = through(self.addr, config, dbname);
        Db::from_pool(
            Pool::builder(Manager::new(via, NoTls))
                .max_size(1)
                .build()
                .unwrap(),
        )
    }

    pub fn dropped_a_commit_reply(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for CommitReplyDropper {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pump(client: TcpStream, server: TcpStream, dropped: Arc<AtomicBool>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let commit_sent = Arc::new(AtomicBool::new(false));
    let upstream = tokio::spawn({
        let commit_sent = commit_sent.clone();
        async move {
            let (mut buf, mut carry) = (vec![0; 16 * 1024], Vec::new());
            loop {
                let n = match client_rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if seen(&mut carry, &buf[..n], b"COMMIT\0") {
                    commit_sent.store(true, Ordering::SeqCst);
                }
                if server_tx.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    });
    let (mut buf, mut carry) = (vec![0; 16 * 1024], Vec::new());
    loop {
        let n = match server_rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // The server's CommandComplete for COMMIT carries the tag "COMMIT".
        if commit_sent.load(Ordering::SeqCst) && seen(&mut carry, &buf[..n], b"COMMIT\0") {
            dropped.store(true, Ordering::SeqCst);
            break; // the reply is never forwarded; both connections close
        }
        if client_tx.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    upstream.abort();
}

/// A loopback TCP proxy that forwards everything and records, from what the client sends,
/// each message's type and the statement it names: for a `Parse` (`P`) the statement it
/// prepares (empty: the unnamed statement), for a `Close` (`C`) the one it closes.
pub struct MessageRecorder {
    addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<(u8, String)>>>,
    accept: JoinHandle<()>,
}

impl MessageRecorder {
    /// Starts the proxy in front of the server `config` names; `None` if it is not on TCP.
    pub async fn start(config: &Config) -> Option<Self> {
        let (listener, addr, target) = listen(config).await?;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        continue;
                    };
                    tokio::spawn(record(client, server, seen.clone()));
                }
            }
        });
        Some(MessageRecorder { addr, seen, accept })
    }

    /// Settings for database `dbname` through the proxy, with `config`'s credentials.
    pub fn config(&self, config: &Config, dbname: &str) -> Config {
        through(self.addr, config, dbname)
    }

    /// The statements named by the messages of type `kind` recorded so far, in order.
    pub fn named(&self, kind: u8) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, name)| name.clone())
            .collect()
    }
}

impl Drop for MessageRecorder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn record(
    client: TcpStream,
    server: TcpStream,
    seen: Arc<std::sync::Mutex<Vec<(u8, String)>>>,
) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let downstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
    });
    // Untyped until the startup message (an SSL or GSS request may come first), then typed.
    let (mut buf, mut pending, mut started) = (vec![0; 16 * 1024], Vec::new(), false);
    loop {
        let n = match client_rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        loop {
            let head = if started { 5 } else { 4 };
            if pending.len() < head {
                break;
            }
            let at = head - 4;
            let len = u32::from_be_bytes(pending[at..at + 4].try_into().unwrap()) as usize;
            if pending.len() < at + len {
                break;
            }
            let message: Vec<u8> = pending.drain(..at + len).collect();
            if !started {
                // Protocol 3.0's startup message; anything else is a request before it.
                started = message.get(4..8) == Some(&[0, 3, 0, 0][..]);
                continue;
            }
            let body = &message[5..];
            let name = match message[0] {
                b'P' => cstring(body),
                b'C' => cstring(body.get(1..).unwrap_or_default()),
                _ => String::new(),
            };
            seen.lock().unwrap().push((message[0], name));
        }
        if server_tx.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    downstream.abort();
}

/// The zero-terminated string `bytes` starts with.
fn cstring(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}
