//! A small HTTP service over `rowlock::assignment`, with the status codes a client expects.
//!
//! | request | success | failures |
//! |---|---|---|
//! | `POST /projects` `{"title": "…"}` | 201 + project | 422 bad input |
//! | `POST /projects/{id}/proposals` `{"freelancer": "…"}` | 201 + proposal | 404, 409 not open / duplicate, 422 |
//! | `POST /proposals/{id}/accept[?mode=nowait]` | 200 | 404, 409 already assigned / busy / not pending |
//! | `POST /proposals/{id}/withdraw` | 200 | 404, 409 not pending |
//! | `GET /projects/{id}` | 200 + project with proposals | 404 |
//!
//! Malformed JSON, missing fields and non-numeric ids are 422. Database failures are 500 and
//! a lock timeout is 503.
//!
//! ```text
//! cargo run --example http_service -- --addr 127.0.0.1:3000
//! curl -s -XPOST localhost:3000/projects -H 'content-type: application/json' -d '{"title":"Logo"}'
//! ```
//!
//! Runs on `DATABASE_URL`, or on a throwaway cluster when it is unset. Its end-to-end test
//! (`cargo test --example http_service`, also part of `cargo test`) fires concurrent accepts.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rowlock::Db;
use rowlock::LockMode;
use rowlock::assignment::{
    self, AssignmentError, Project, ProjectDetails, Proposal, accept_proposal,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// Everything a handler can answer with when it does not succeed.
enum ApiError {
    Domain(AssignmentError),
    Malformed(String),
}

impl From<AssignmentError> for ApiError {
    fn from(e: AssignmentError) -> Self {
        ApiError::Domain(e)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::Malformed(e.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::Malformed(e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use AssignmentError::*;
        let (status, message) = match self {
            ApiError::Malformed(m) => (StatusCode::UNPROCESSABLE_ENTITY, m),
            ApiError::Domain(e) => {
                let status = match &e {
                    InvalidInput(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    ProjectNotFound(_) | ProposalNotFound(_) => StatusCode::NOT_FOUND,
                    AlreadyAssigned(_)
                    | ProjectNotOpen(_)
                    | DuplicateProposal { .. }
                    | NotPending { .. }
                    | Busy => StatusCode::CONFLICT,
                    LockTimeout => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                if status == StatusCode::INTERNAL_SERVER_ERROR {
                    eprintln!("request failed: {e:?}");
                }
                (status, e.to_string())
            }
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

fn project_json(p: &Project) -> Value {
    json!({
        "id": p.id, "title": p.title, "status": p.status.as_str(),
        "created_at_ms": millis(p.created_at), "updated_at_ms": millis(p.updated_at),
    })
}

fn proposal_json(p: &Proposal) -> Value {
    json!({
        "id": p.id, "project_id": p.project_id, "freelancer": p.freelancer,
        "status": p.status.as_str(), "created_at_ms": millis(p.created_at),
    })
}

#[derive(Deserialize)]
struct NewProject {
    title: String,
}

#[derive(Deserialize)]
struct NewProposal {
    freelancer: String,
}

#[derive(Deserialize)]
struct AcceptQuery {
    mode: Option<String>,
}

async fn create_project(
    State(db): State<Db>,
    body: Result<Json<NewProject>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(body) = body?;
    let project = assignment::create_project(&db, &body.title).await?;
    Ok((StatusCode::CREATED, Json(project_json(&project))))
}

async fn submit_proposal(
    State(db): State<Db>,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<NewProposal>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (Path(id), Json(body)) = (id?, body?);
    let proposal = assignment::submit_proposal(&db, id, &body.freelancer).await?;
    Ok((StatusCode::CREATED, Json(proposal_json(&proposal))))
}

async fn accept(
    State(db): State<Db>,
    id: Result<Path<i64>, PathRejection>,
    Query(query): Query<AcceptQuery>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id?;
    let mode = match query.mode.as_deref() {
        None | Some("wait") => LockMode::Wait,
        Some("nowait") => LockMode::NoWait,
        Some(other) => return Err(ApiError::Malformed(format!("unknown mode {other:?}"))),
    };
    accept_proposal(&db, id, mode).await?;
    Ok(Json(json!({ "id": id, "status": "accepted" })))
}

async fn withdraw(
    State(db): State<Db>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id?;
    assignment::withdraw_proposal(&db, id).await?;
    Ok(Json(json!({ "id": id, "status": "withdrawn" })))
}

async fn details(
    State(db): State<Db>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id?;
    let ProjectDetails { project, proposals } = assignment::project_details(&db, id).await?;
    let mut body = project_json(&project);
    body["proposals"] = proposals.iter().map(proposal_json).collect();
    Ok(Json(body))
}

fn router(db: Db) -> Router {
    Router::new()
        .route("/projects", post(create_project))
        .route("/projects/{id}", get(details))
        .route("/projects/{id}/proposals", post(submit_proposal))
        .route("/proposals/{id}/accept", post(accept))
        .route("/proposals/{id}/withdraw", post(withdraw))
        .with_state(db)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut addr = "127.0.0.1:3000".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => addr = args.next().ok_or("--addr needs a value")?,
            "--help" | "-h" => {
                println!("usage: http_service [--addr HOST:PORT]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other}; try --help").into()),
        }
    }
    let cluster = std::sync::Arc::new(rowlock_testing::TestCluster::from_env()?);
    let pg = cluster.create_database_owned().await?;
    let db = pg.db(16);
    assignment::migrate(&db).await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(db))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    drop(pg);
    drop(cluster);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rowlock_testing::TestCluster;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A minimal HTTP/1.1 client: one request per connection.
    async fn call(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, Value) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn concurrent_accepts_over_http_have_exactly_one_winner() {
        let pg = TestCluster::shared()
            .unwrap()
            .create_database()
            .await
            .unwrap();
        let db = pg.db(16);
        assignment::migrate(&db).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router(db)).await });

        let (status, project) = call(addr, "POST", "/projects", r#"{"title":"Logo"}"#).await;
        assert_eq!(status, 201);
        let id = project["id"].as_i64().unwrap();
        let mut proposals = Vec::new();
        for who in 0..8 {
            let body = format!(r#"{{"freelancer":"f{who}"}}"#);
            let (status, p) = call(addr, "POST", &format!("/projects/{id}/proposals"), &body).await;
            assert_eq!(status, 201);
            proposals.push(p["id"].as_i64().unwrap());
        }
        let clicks: Vec<_> = proposals
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mode = if i % 2 == 0 { "wait" } else { "nowait" };
                let path = format!("/proposals/{p}/accept?mode={mode}");
                tokio::spawn(async move { call(addr, "POST", &path, "").await.0 })
            })
            .collect();
        let mut statuses = Vec::new();
        for c in clicks {
            statuses.push(c.await.unwrap());
        }
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "{statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 409),
            "{statuses:?}"
        );
        let (status, details) = call(addr, "GET", &format!("/projects/{id}"), "").await;
        assert_eq!(status, 200);
        assert_eq!(details["status"], "assigned");
        let accepted = details["proposals"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["status"] == "accepted")
            .count();
        assert_eq!(accepted, 1);

        // The status codes a client expects.
        assert_eq!(call(addr, "GET", "/projects/999999", "").await.0, 404);
        assert_eq!(
            call(addr, "POST", "/proposals/999999/accept", "").await.0,
            404
        );
        assert_eq!(call(addr, "POST", "/projects", "{not json").await.0, 422);
        assert_eq!(
            call(addr, "POST", "/projects", r#"{"name":"x"}"#).await.0,
            422
        );
        assert_eq!(
            call(addr, "POST", "/projects", r#"{"title":"  "}"#).await.0,
            422
        );
        assert_eq!(call(addr, "GET", "/projects/abc", "").await.0, 422);
        let body = r#"{"freelancer":"late"}"#;
        assert_eq!(
            call(addr, "POST", &format!("/projects/{id}/proposals"), body)
                .await
                .0,
            409
        );
        let withdraw = format!("/proposals/{}/withdraw", proposals[0]);
        assert_eq!(
            call(addr, "POST", &withdraw, "").await.0,
            409,
            "no longer pending"
        );
        server.abort();
    }
}
