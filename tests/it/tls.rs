//! TLS: a handle built from a URL with `sslmode=require` connects over rustls to a cluster
//! with a certificate of its own authority; without trusting that authority it is refused.

use std::sync::Arc;

use rowlock::{Db, ErrorKind, Lock};
use rowlock_testing::TestCluster;

use crate::support::Account;

async fn tls_cluster() -> (Arc<TestCluster>, String, rowlock_testing::TestDatabase) {
    let (cluster, ca) = TestCluster::start_with_tls().expect("a TLS cluster");
    let cluster = Arc::new(cluster);
    let pg = cluster.create_database_owned().await.unwrap();
    pg.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts VALUES (1, 100);",
        )
        .await
        .unwrap();
    (cluster, ca, pg)
}

/// The URL of `pg` over TCP to 127.0.0.1 with `sslmode=require`.
fn tls_url(pg: &rowlock_testing::TestDatabase) -> String {
    let config = pg.config();
    let port = config.get_ports()[0];
    let user = config.get_user().unwrap();
    format!(
        "postgres://{user}@127.0.0.1:{port}/{}?sslmode=require",
        pg.name()
    )
}

#[tokio::test]
async fn a_url_requiring_tls_connects_over_rustls_to_a_trusted_certificate() {
    if std::env::var_os("DATABASE_URL").is_some() {
        return; // the server under test is not ours to give a certificate
    }
    let (_cluster, ca, pg) = tls_cluster().await;
    let db = Db::builder()
        .url(&tls_url(&pg))
        .root_certificate_pem(&ca)
        .max_size(1)
        .build()
        .unwrap();
    let ssl = db
        .with_locked_row(&1, Lock::new(), |tx, _: Account| {
            Box::pin(async move {
                let row = tx
                    .query_one(
                        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                        &[],
                    )
                    .await?;
                Ok::<bool, rowlock::Error>(row.get(0))
            })
        })
        .await
        .unwrap()
        .done();
    assert_eq!(ssl, Some(true), "the session is encrypted");
}

/// The error of a first statement on `db` whose connection the TLS handshake refuses:
/// `Unreachable`, its text with its cause's.
async fn refused_connection(db: &Db) -> String {
    let err = db
        .with_transaction(rowlock::TransactionOptions::new(), |tx| {
            Box::pin(async move { tx.batch_execute("SELECT 1").await })
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");
    format!("{err} {:?}", std::error::Error::source(&err))
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_with_a_clear_error() {
    if std::env::var_os("DATABASE_URL").is_some() {
        return;
    }
    let (_cluster, _ca, pg) = tls_cluster().await;
    let db = Db::builder()
        .url(&tls_url(&pg))
        .max_size(1)
        .build()
        .unwrap();
    let text = refused_connection(&db).await;
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

/// `sslmode=require` over rustls checks the server's host name too (what libpq's
/// `verify-full` checks, which the docs and the refusal of `verify-full` say): a trusted
/// certificate for `localhost` and `127.0.0.1`, reached under another name, is refused.
#[tokio::test]
async fn a_trusted_certificate_for_another_host_name_is_refused() {
    if std::env::var_os("DATABASE_URL").is_some() {
        return;
    }
    let (_cluster, ca, pg) = tls_cluster().await;
    let config = pg.config();
    let url = format!(
        "host=db.example.invalid hostaddr=127.0.0.1 port={} user={} dbname={} sslmode=require",
        config.get_ports()[0],
        config.get_user().unwrap(),
        pg.name()
    );
    let db = Db::builder()
        .url(&url)
        .root_certificate_pem(ca.as_bytes())
        .max_size(1)
        .build()
        .unwrap();
    let text = refused_connection(&db).await;
    assert!(text.contains("not valid for name"), "{text}");
}

#[test]
fn a_root_certificate_that_is_not_one_is_refused_when_built() {
    for pem in [
        "",
        "not a certificate",
        "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
    ] {
        let err = Db::builder()
            .url("postgres://app@localhost/app?sslmode=require")
            .root_certificate_pem(pem)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{pem:?}: {err}");
    }
}
