//! A minimal receiving endpoint that verifies our signatures, as an ISV's product would:
//! `fulfillment demo` registers one on loopback and prints what it received.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::signature::{Secret, verify};

/// Signatures older or newer than this are refused (replays).
const TOLERANCE_SECS: i64 = 5 * 60;

/// One delivery the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    /// The CloudEvents `type`.
    pub event_type: String,
    pub verified: bool,
}

/// What the receiver got so far. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Inbox(Arc<Mutex<Vec<Received>>>);

impl Inbox {
    pub fn all(&self) -> Vec<Received> {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

#[derive(Clone)]
struct Shared {
    secret: Arc<Mutex<Option<Secret>>>,
    inbox: Inbox,
}

/// A receiver on 127.0.0.1 (port 0) until `shutdown`; set its secret with the setter
/// returned once the endpoint is registered. Answers 200 to a verified delivery, 401
/// otherwise.
pub async fn start(
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, Inbox, impl Fn(Secret) + Send + Sync)> {
    let shared = Shared {
        secret: Arc::new(Mutex::new(None)),
        inbox: Inbox::default(),
    };
    let app = Router::new()
        .route("/hooks", post(receive))
        .with_state(shared.clone());
    let listener = crate::http::listener::listen(([127, 0, 0, 1], 0).into())?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    let secret = shared.secret.clone();
    let set = move |new: Secret| {
        if let Ok(mut slot) = secret.lock() {
            *slot = Some(new);
        }
    };
    Ok((address, shared.inbox, set))
}

async fn receive(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = header("webhook-id");
    let timestamp = header("webhook-timestamp").parse::<i64>().unwrap_or(0);
    let fresh = (OffsetDateTime::now_utc().unix_timestamp() - timestamp).abs() <= TOLERANCE_SECS;
    let secret = shared.secret.lock().ok().and_then(|s| s.clone());
    let verified = fresh
        && secret.is_some_and(|secret| {
            verify(&secret, &id, timestamp, &body, &header("webhook-signature"))
        });
    let event_type = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned))
        .unwrap_or_default();
    if let Ok(mut inbox) = shared.inbox.0.lock() {
        inbox.push(Received {
            id,
            event_type,
            verified,
        });
    }
    if verified {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    }
}
