//! A TCP proxy in front of a server that can hold back the server's answers: requests still
//! go through at once, so the server does what it is asked while its client waits for an answer
//! and times out. This is how a Redis that did a publish but answered too late looks to a node.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy; dropping it stops accepting (open connections end with their peers).
pub struct StallProxy {
    pub addr: SocketAddr,
    stalled: watch::Sender<bool>,
    severed: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl StallProxy {
    /// Listens on a free port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (stalled, watching) = watch::channel(false);
        let (severed, cut) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *cut.borrow() {
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(severable(
                    cut.clone(),
                    forward(client_read, server_write, None),
                ));
                tokio::spawn(severable(
                    cut.clone(),
                    forward(server_read, client_write, Some(watching.clone())),
                ));
            }
        });
        Self {
            addr,
            stalled,
            severed,
            accept,
        }
    }

    /// Drops every connection through the proxy now and refuses new ones (`true`), as a
    /// network that cuts a node off from Redis does, or lets connections through again.
    pub fn sever(&self, severed: bool) {
        self.severed.send_replace(severed);
    }

    /// Holds back (`true`) or lets through (`false`) everything the server sends from now on.
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Runs `copy` until the proxy is severed, dropping its sockets then.
async fn severable(mut cut: watch::Receiver<bool>, copy: impl Future<Output = ()>) {
    tokio::select! {
        () = copy => {}
        _ = cut.wait_for(|severed| *severed) => {}
    }
}

/// Copies `from` to `to` until either ends; with `gate`, each chunk read waits while the gate
/// says stalled before it is written.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: Option<watch::Receiver<bool>>,
) {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(gate) = &mut gate
            && gate.wait_for(|stalled| !stalled).await.is_err()
        {
            break;
        }
        if to.write_all(&chunk[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
