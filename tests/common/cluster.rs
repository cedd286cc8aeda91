//! Cluster-mode helpers: Herald nodes on a shared Redis, and waiting for the cluster to settle.
//! Every wait polls a condition with a deadline; nothing asserts on timing.

use std::time::{Duration, Instant};

use herald::Config;
use serde_json::Value;

use super::redis_server::RedisServer;
use super::{TestServer, Ws, recv_json};

/// How long a condition may take to come true: a reconnect waits up to the 5 s backoff cap.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A node in cluster mode on the Redis at `url`.
pub async fn node(url: &str) -> TestServer {
    TestServer::start(Config::default().redis(Some(url.to_owned()))).await
}

/// Polls `condition` until it holds, panicking with `what` after [`DEADLINE`].
pub async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status of the node's `/readyz`.
pub async fn readyz(server: &TestServer) -> u16 {
    server.http().await.get("/readyz").await.status
}

/// Waits until every one of `servers` is ready.
pub async fn wait_ready(servers: &[&TestServer]) {
    for server in servers {
        eventually("the node is ready", async || readyz(server).await == 200).await;
    }
}

/// Waits until `nodes` nodes subscribe to the Redis channel `name`.
pub async fn wait_numsub(redis: &RedisServer, name: &str, nodes: u64) {
    eventually(
        &format!("{nodes} node(s) subscribe to {name}"),
        async || redis.numsub(name) == Some(nodes),
    )
    .await;
}

/// The next frame that is not a gap announcement.
pub async fn recv_message(ws: &mut Ws) -> Value {
    loop {
        let frame = recv_json(ws).await;
        if frame["type"] != "gap" {
            return frame;
        }
    }
}
