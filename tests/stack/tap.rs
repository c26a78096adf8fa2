//! The tap between the simulator and the ingress: it records every webhook body the
//! simulator sends and forwards the request (signature and all) to the real ingress. Made
//! deaf, it answers 200 and forwards nothing, as a webhook lost on the way would be.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use tokio::net::TcpListener;
use url::Url;

#[derive(Clone, Default)]
pub struct Tap {
    ingress: Arc<Mutex<Option<Url>>>,
    received: Arc<Mutex<Vec<String>>>,
    deaf: Arc<AtomicBool>,
    http: reqwest::Client,
}

impl Tap {
    /// Listens on port 0: the tap and the URL the simulator is to send its webhooks to.
    /// Forwards once [`Tap::forward_to`] names the ingress.
    pub async fn start() -> (Tap, Url) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/webhook", listener.local_addr().unwrap());
        let tap = Tap::default();
        let router = axum::Router::new().route("/webhook", axum::routing::post(forward));
        let router = router.with_state(tap.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (tap, url.parse().unwrap())
    }

    /// The webhook bodies received so far, in order (also those lost while deaf).
    pub fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    /// Forwards to another ingress from now on.
    pub fn forward_to(&self, ingress: Url) {
        *self.ingress.lock().unwrap() = Some(ingress);
    }

    pub fn set_deaf(&self, deaf: bool) {
        self.deaf.store(deaf, Ordering::SeqCst);
    }
}

async fn forward(State(tap): State<Tap>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let text = String::from_utf8_lossy(&body).into_owned();
    tap.received.lock().unwrap().push(text);
    let ingress = tap.ingress.lock().unwrap().clone();
    let (Some(ingress), false) = (ingress, tap.deaf.load(Ordering::SeqCst)) else {
        return StatusCode::OK;
    };
    let mut request = tap.http.post(ingress).body(body);
    for (name, value) in &headers {
        if name != header::HOST && name != header::CONTENT_LENGTH {
            request = request.header(name.as_str(), value.as_bytes());
        }
    }
    match request.send().await {
        Ok(answer) => StatusCode::from_u16(answer.status().as_u16()).unwrap(),
        Err(_) => StatusCode::BAD_GATEWAY,
    }
}
