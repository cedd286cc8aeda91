//! The accept loop and graceful shutdown.
//!
//! Every accepted socket takes a permit of the connection limit first; without one it gets a
//! `503` JSON reply instead of a refused connection. Each HTTP connection is served by hyper
//! with upgrades enabled; a WebSocket upgrade moves the permit into the connection's own task.
//! An HTTP connection whose response is an `/sse` stream keeps the permit, and its task drops
//! the connection when the stream is cut off (see [`crate::sse::Watch`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::{Config, ConfigError};
use crate::error::Result;
use crate::http::{self, AppState};
use crate::registry::CloseReason;

/// Hyper's read buffer limit for a request head. Hyper checks it between reads, so a head that
/// arrives in one piece may run somewhat past it before hyper answers with an empty `431`
/// itself; heads within it but over [`http::MAX_URI_BYTES`] or [`http::MAX_HEADER_BYTES`] get
/// our JSON `414`/`431`.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Pause after an accept error such as running out of file descriptors, so the loop does not
/// spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves HTTP and WebSocket connections on `listener` until `shutdown` resolves, then closes
/// every WebSocket with 1001 "going away" and returns once all are closed or
/// [`Config::shutdown_grace`] has passed.
///
/// # Errors
/// [`crate::Error::Config`] when the configuration is invalid.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let verifier = Verifier::from_config(&config)
        .map_err(ConfigError::from)?
        .map(Arc::new);
    if verifier.is_none() {
        tracing::warn!(
            "no --jwt-secret or --jwt-public-key: WebSocket clients are anonymous and may pick \
             any client_id and subscribe to any channel"
        );
    }
    let listening = listener.local_addr()?;
    if config.api_keys.is_empty() {
        if listening.ip().is_loopback() {
            tracing::info!(
                "no --api-key: /api/* and /metrics answer only clients on this machine that do \
                 not come through a proxy"
            );
        } else {
            tracing::warn!(
                %listening,
                "no --api-key while listening beyond loopback: /api/* and /metrics answer only \
                 clients on this machine that do not come through a proxy (Forwarded, \
                 X-Forwarded-For, X-Real-IP); set --api-key to publish from elsewhere"
            );
        }
    }
    tracing::info!(%listening, "settings: {}", config.summary());
    let broker = Broker::start(&config)?;
    let registry = broker.registry().clone();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let grace = config.shutdown_grace;
    let state = Arc::new(AppState {
        broker,
        config,
        verifier,
    });
    // Every HTTP connection task holds a receiver: the sender's change starts their graceful
    // shutdown, and `closed()` resolves once all of them have ended.
    let (close_tx, close_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_error(err).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        match Arc::clone(&limit).try_acquire_owned() {
            Ok(permit) => serve_http(
                stream,
                peer,
                Arc::clone(&state),
                Arc::new(http::Slot::new(permit)),
                close_rx.clone(),
            ),
            Err(_) => {
                tracing::warn!(
                    limit = state.config.max_connections,
                    "connection limit reached, answering 503"
                );
                tokio::spawn(reject_busy(stream));
            }
        }
    }
    drop(listener);
    drop(close_rx);
    tracing::info!("shutting down: closing connections");
    close_tx.send_replace(());
    registry.close_all(CloseReason::GoingAway);
    let drained = async {
        registry.drained().await;
        close_tx.closed().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            remaining = registry.len(),
            "shutdown grace elapsed with connections still open"
        );
    }
    Ok(())
}

fn serve_http(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    slot: http::ConnectionSlot,
    mut close_rx: watch::Receiver<()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.handshake_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    tokio::spawn(async move {
        let watched = Arc::clone(&slot);
        let service = service_fn(move |req| {
            let state = Arc::clone(&state);
            let slot = Arc::clone(&slot);
            async move { Ok::<_, std::convert::Infallible>(http::handle(req, state, slot, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(conn);
        // An `/sse` stream cut off while hyper waits for a full socket ends the connection here.
        let cut_off = watched.stream().cut_off();
        tokio::pin!(cut_off);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = &mut cut_off => return,
            _ = close_rx.changed() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    result = conn => result,
                    () = cut_off => return,
                }
            }
        };
        if let Err(err) = result {
            tracing::debug!(%err, "http connection ended with an error");
        }
    });
}

/// Answers a connection over the limit with `503` and closes it.
async fn reject_busy(mut stream: TcpStream) {
    const BODY: &str =
        r#"{"error":"too_many_connections","message":"connection limit reached, try again later"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        // Read the request first (bounded) so that closing does not reset the connection
        // before the client has seen the reply.
        let mut head = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut head)).await;
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Accept errors: per-connection ones are skipped; others (out of file descriptors, out of
/// memory) are logged and the loop pauses instead of spinning.
async fn accept_error(err: io::Error) {
    match err.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionRefused
        | io::ErrorKind::Interrupted => {}
        _ => {
            tracing::error!(%err, "accept failed; pausing before the next accept");
            tokio::time::sleep(ACCEPT_BACKOFF).await;
        }
    }
}
