//! The tap between the simulator and the ingress: it records every webhook body the
//! simulator sends and forwards the request (signature and all) to the real ingress. Made
//! deaf, it answers 200 and forwards nothing, as a webhook lost on the way would be.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::net::TcpListener;
use url::Url;

#[derive(Clone)]
pub struct Tap {
    url: Url,
    shared: Arc<Shared>,
}

struct Shared {
    ingress: Mutex<Url>,
    http: reqwest::Client,
    received: Mutex<Vec<String>>,
    deaf: AtomicBool,
}

impl Tap {
    /// Listens on port 0; forwards once [`Tap::forward_to`] names the ingress.
    pub async fn start() -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: Url = format!("http://{}/webhook", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let shared = Arc::new(Shared {
            ingress: Mutex::new(url.clone()),
            http: reqwest::Client::new(),
            received: Mutex::default(),
            deaf: AtomicBool::new(false),
        });
        let router = axum::Router::new()
            .route("/webhook", post(forward))
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Tap { url, shared }
    }

    /// Where the simulator sends its webhooks.
    pub fn url(&self) -> Url {
        self.url.clone()
    }

    /// The webhook bodies received so far, in order (also those lost while deaf).
    pub fn received(&self) -> Vec<String> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Forwards to another ingress from now on.
    pub fn forward_to(&self, ingress: Url) {
        *self.shared.ingress.lock().unwrap() = ingress;
    }

    pub fn set_deaf(&self, deaf: bool) {
        self.shared.deaf.store(deaf, Ordering::SeqCst);
    }
}

async fn forward(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    shared
        .received
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&body).into_owned());
    if shared.deaf.load(Ordering::SeqCst) {
        return StatusCode::OK;
    }
    let ingress = shared.ingress.lock().unwrap().clone();
    let mut request = shared.http.post(ingress).body(body);
    for (name, value) in &headers {
        if name != axum::http::header::HOST && name != axum::http::header::CONTENT_LENGTH {
            request = request.header(name.as_str(), value.as_bytes());
        }
    }
    match request.send().await {
        Ok(answer) => {
            StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY)
        }
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}
