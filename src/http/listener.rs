//! The ingress's listening socket, with two limits axum's own `serve` does not have.
//!
//! - **At most `http.max_connections` connections at once** (`HTTP_MAX_CONNECTIONS`, default
//!   256, [`DEFAULT_MAX_CONNECTIONS`](crate::settings::DEFAULT_MAX_CONNECTIONS)). Without a limit every connection is accepted until the process runs out of file
//!   descriptors (under systemd's default soft limit of 1,024 that is a burst of about a
//!   thousand webhooks), and then axum's accept loop only sleeps and retries. At the limit
//!   the next connection is not accepted until one closes: it waits in the kernel's accept
//!   queue ([`BACKLOG`]), handshake done, and is served in its turn. Nothing is refused.
//!   Keep the limit below `ulimit -n`. The limit bounds the ingress's memory: an open
//!   connection costs about 25 KiB (hyper's buffers, its task; the router is shared, see
//!   [`Application::run_until_stopped`](super::Application::run_until_stopped)), on top of
//!   about 33 MiB idle (24 MiB of it the binary's code pages). `bench burst` (5,000 webhooks
//!   at once) held 400 to 2,000 connections open with a limit of 4,096 (peak RSS 41 to
//!   116 MiB, depending on how fast RabbitMQ confirmed); at most 512 with
//!   `HTTP_MAX_CONNECTIONS=512` (45.5 and 49.4 MiB), 256 at the default (40.8 MiB), none
//!   refused or lost and no fewer acknowledged in time. While every place is taken each answer closes
//!   its connection ([`close_when_full`]), so the connections waiting behind keep-alive ones
//!   get their turn without waiting for the idle timeout.
//! - **An idle connection is closed after `http.idle_timeout_secs`**
//!   (`HTTP_IDLE_TIMEOUT_SECS`): a socket that has sent nothing for that long (an idle
//!   keep-alive, a client that stalled mid-request) or does not take our answer is closed,
//!   so idle clients cannot hold every place under the limit. The timeouts are
//!   `tokio-io-timeout`'s read and write timeouts.
//!
//! `fulfillment_http_connections` is the number open; `fulfillment_http_connections_waited_total`
//! counts the connections that waited for a place, and a warning is logged once per
//! saturation (when the limit is reached after having had room).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::http::header::CONNECTION;
use axum::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;

use crate::metrics::{FULFILLMENT_HTTP_CONNECTIONS, FULFILLMENT_HTTP_CONNECTIONS_WAITED_TOTAL};

/// The accept queue asked of the kernel (Linux caps it at `net.core.somaxconn`, 4,096 by
/// default): connections beyond the limit wait there instead of being dropped mid-handshake.
pub const BACKLOG: u32 = 4096;

/// A bound socket that hands out at most `max_connections` connections at once.
#[derive(Debug)]
pub struct LimitedListener {
    inner: TcpListener,
    places: Arc<Semaphore>,
    max_connections: usize,
    idle_timeout: Duration,
    /// Whether the last accept found the limit reached (so the warning is logged once per
    /// saturation, not once per connection).
    saturated: bool,
}

/// A listening socket on `address` with a [`BACKLOG`]-deep accept queue, for every server of
/// ours (the ingress, the simulator, the worker's metrics, the bench's engines). tokio's and
/// std's `TcpListener::bind` listen with a queue of 128: a burst of new connections beyond
/// it loses their SYNs, which the clients' kernels send again only after a second (the
/// simulator's listener gave `bench pipeline` an ACK p99 of 1.2 s in 5 of 37 runs,
/// `TcpExtListenOverflows` counting 22 to 54 per run). Port 0 picks a free port.
pub fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted server can bind at once although the last
    // one's connections are still in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)
}

impl LimitedListener {
    /// Binds `address` with a [`BACKLOG`]-deep accept queue. Port 0 picks a free port.
    pub fn bind(
        address: SocketAddr,
        max_connections: usize,
        idle_timeout: Duration,
    ) -> anyhow::Result<LimitedListener> {
        let inner =
            listen(address).with_context(|| format!("cannot listen on {address} (LISTEN_ADDR)"))?;
        Ok(LimitedListener {
            inner,
            places: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            idle_timeout,
            saturated: false,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// A handle that tells whether every place is taken (see [`close_when_full`]).
    pub fn saturation(&self) -> Saturation {
        Saturation(Arc::clone(&self.places))
    }

    async fn place(&mut self) -> OwnedSemaphorePermit {
        if let Ok(place) = self.places.clone().try_acquire_owned() {
            self.saturated = false;
            return place;
        }
        metrics::counter!(FULFILLMENT_HTTP_CONNECTIONS_WAITED_TOTAL).increment(1);
        if !self.saturated {
            self.saturated = true;
            tracing::warn!(
                max_connections = self.max_connections,
                "the ingress has HTTP_MAX_CONNECTIONS connections open; new ones wait in the \
                 accept queue until one closes"
            );
        }
        self.places
            .clone()
            .acquire_owned()
            .await
            .expect("the listener never closes its semaphore")
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        let place = self.place().await;
        let (stream, peer) = axum::serve::Listener::accept(&mut self.inner).await;
        let mut stream = TimeoutStream::new(stream);
        stream.set_read_timeout(Some(self.idle_timeout));
        stream.set_write_timeout(Some(self.idle_timeout));
        metrics::gauge!(FULFILLMENT_HTTP_CONNECTIONS).increment(1.0);
        let connection = Connection {
            stream: Box::pin(stream),
            _place: Place(place),
        };
        (connection, peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Whether the listener has every place under its limit taken; cheap to clone.
#[derive(Debug, Clone)]
pub struct Saturation(Arc<Semaphore>);

impl Saturation {
    pub fn is_full(&self) -> bool {
        self.0.available_permits() == 0
    }
}

/// Response middleware: while every place is taken, the answer carries `Connection:
/// close`, so hyper closes the connection after it and a connection waiting in the accept
/// queue gets the place. Without it the places stay with keep-alive connections (a burst's
/// client keeps each one it opened) and the connections behind them wait until the idle
/// timeout, past Microsoft's 10 s.
pub async fn close_when_full(State(saturation): State<Saturation>, response: Response) -> Response {
    let mut response = response;
    if saturation.is_full() {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// One accepted connection: the socket with its idle timeouts, and its place under the
/// limit, given back when the connection is dropped.
#[derive(Debug)]
pub struct Connection {
    stream: Pin<Box<TimeoutStream<TcpStream>>>,
    _place: Place,
}

#[derive(Debug)]
struct Place(#[allow(dead_code)] OwnedSemaphorePermit);

impl Drop for Place {
    fn drop(&mut self) {
        metrics::gauge!(FULFILLMENT_HTTP_CONNECTIONS).decrement(1.0);
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().stream.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream.as_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn listener(max: usize, idle: Duration) -> LimitedListener {
        LimitedListener::bind("127.0.0.1:0".parse().unwrap(), max, idle).unwrap()
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_waits_for_a_place_and_is_then_served() {
        let mut listener = listener(1, Duration::from_secs(30));
        let address = listener.local_addr().unwrap();
        let _first_client = TcpStream::connect(address).await.unwrap();
        let (first, _) = axum::serve::Listener::accept(&mut listener).await;
        // The second connects (the kernel completes the handshake) but is not accepted.
        let _second_client = TcpStream::connect(address).await.unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_millis(200),
            axum::serve::Listener::accept(&mut listener),
        )
        .await;
        assert!(waiting.is_err(), "accepted beyond the limit");
        drop(first);
        let accepted = tokio::time::timeout(
            Duration::from_secs(5),
            axum::serve::Listener::accept(&mut listener),
        )
        .await;
        assert!(accepted.is_ok(), "not accepted after a place was freed");
    }

    #[tokio::test]
    async fn answers_close_the_connection_only_while_every_place_is_taken() {
        let mut listener = listener(1, Duration::from_secs(30));
        let saturation = listener.saturation();
        let connection_header = |response: Response| {
            response
                .headers()
                .get(CONNECTION)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let answer = close_when_full(State(saturation.clone()), Response::default()).await;
        assert_eq!(connection_header(answer), None);
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (connection, _) = axum::serve::Listener::accept(&mut listener).await;
        let answer = close_when_full(State(saturation.clone()), Response::default()).await;
        assert_eq!(connection_header(answer).as_deref(), Some("close"));
        drop(connection);
        let answer = close_when_full(State(saturation), Response::default()).await;
        assert_eq!(connection_header(answer), None);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_frees_its_place() {
        let mut listener = listener(1, Duration::from_millis(300));
        let address = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(address).await.unwrap();
        let (mut server, _) = axum::serve::Listener::accept(&mut listener).await;
        // Traffic keeps it open…
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        // …silence ends it: the read fails with a timeout.
        let error = server.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(server);
        let _next_client = TcpStream::connect(address).await.unwrap();
        let accepted = tokio::time::timeout(
            Duration::from_secs(5),
            axum::serve::Listener::accept(&mut listener),
        )
        .await;
        assert!(accepted.is_ok());
    }
}
