//! `Idempotency-Key` on publish, send and broadcast, over real sockets: a retry gets the first
//! reply again (marked `Idempotent-Replayed: true`) and nothing is delivered twice, on one node
//! and across a cluster on a real `redis-server` (skipped with a notice when it is not
//! installed, unless `HERALD_REQUIRE_REDIS=1`).
//!
//! "Delivered once" is checked with a marker: after the retries, one more message without a
//! key goes to the same subscribers, and the next frame each receives must be that marker
//! (messages arrive in order, so a second copy would come first). The window runs out on
//! tokio's paused clock.

mod common;

use std::time::Duration;

use common::cluster::{node, recv_message, wait_numsub, wait_ready};
use common::redis_server::RedisServer;
use common::stall_proxy::StallProxy;
use common::{HttpReply, TestServer, Ws, metric, recv_json};
use herald::Config;
use serde_json::{Value, json};

const JSON: (&str, &str) = ("content-type", "application/json");

/// Posts `body` to `path` on a fresh connection, with `headers`.
async fn post(server: &TestServer, path: &str, headers: &[(&str, &str)], body: &str) -> HttpReply {
    server
        .http()
        .await
        .request("POST", path, headers, body.as_bytes())
        .await
}

/// Posts a JSON `body` to `path` with `Idempotency-Key: key`.
async fn post_keyed(server: &TestServer, path: &str, key: &str, body: &str) -> HttpReply {
    post(server, path, &[("idempotency-key", key), JSON], body).await
}

fn replayed(reply: &HttpReply) -> bool {
    match reply.header("idempotent-replayed") {
        None => false,
        Some("true") => true,
        Some(other) => panic!("Idempotent-Replayed: {other}"),
    }
}

fn body_text(reply: &HttpReply) -> &str {
    std::str::from_utf8(&reply.body).expect("UTF-8 reply")
}

/// Publishes a marker to `channel` without a key and checks that it is the next frame every
/// one of `subscribers` receives, with `offset`: nothing else was delivered before it.
async fn assert_next_is_marker(
    server: &TestServer,
    channel: &str,
    offset: u64,
    subscribers: &mut [&mut Ws],
) {
    let reply = post(
        server,
        &format!("/api/publish/{channel}"),
        &[JSON],
        r#""marker""#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", body_text(&reply));
    for ws in subscribers {
        let frame = recv_message(ws).await;
        assert_eq!(
            (frame["data"].clone(), frame["offset"].clone()),
            (json!("marker"), json!(offset)),
            "the next frame is the marker: {frame}"
        );
    }
}

/// The next `count` frames' types (with the channel of a message), sorted: direct sends are
/// queued at once and may overtake channel messages and broadcasts, which go through the
/// shard writers.
async fn frame_types(ws: &mut Ws, count: usize) -> Vec<String> {
    let mut types = Vec::new();
    for _ in 0..count {
        let frame = recv_message(ws).await;
        let kind = frame["type"].as_str().expect("type").to_owned();
        types.push(match frame["channel"].as_str() {
            Some(channel) => format!("{kind} {channel}"),
            None => kind,
        });
    }
    types.sort();
    types
}

// ---------------------------------------------------------------------------------------------
// One node, the in-memory broker.
// ---------------------------------------------------------------------------------------------

/// The README's example, request for request (curl -d sends a form content type), on a
/// channel of its own with two subscribers.
#[tokio::test]
async fn a_retry_gets_the_first_reply_and_delivers_nothing_again() {
    let server = TestServer::default().await;
    let (mut a, _) = server.connect_json("channels=orders").await;
    let (mut b, _) = server.connect_json("channels=orders").await;
    let headers = [
        ("idempotency-key", "order-42-shipped"),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let first = post(&server, "/api/publish/orders", &headers, "shipped").await;
    assert_eq!(first.status, 200);
    assert_eq!(
        body_text(&first),
        r#"{"channel":"orders","offset":1,"subscribers":2}"#
    );
    assert!(!replayed(&first), "a first reply is not marked");
    for _ in 0..3 {
        let retry = post(&server, "/api/publish/orders", &headers, "shipped").await;
        assert_eq!(retry.status, 200);
        assert_eq!(retry.body, first.body, "the same reply, byte for byte");
        assert_eq!(retry.header("content-type"), Some("application/json"));
        assert!(replayed(&retry));
    }
    let lost = post(&server, "/api/publish/orders", &headers, "lost").await;
    assert_eq!(lost.status, 409);
    assert_eq!(
        body_text(&lost),
        r#"{"error":"idempotency_key_reused","message":"Idempotency-Key \"order-42-shipped\" was used for a different request (another content type or body) to this route and target within --idempotency-window; use a new key for a new request"}"#
    );
    for ws in [&mut a, &mut b] {
        assert_eq!(
            recv_json(ws).await,
            json!({"type":"message","channel":"orders","offset":1,"data":"shipped"})
        );
    }
    assert_next_is_marker(&server, "orders", 2, &mut [&mut a, &mut b]).await;
    let stats = server.http().await.get("/api/stats").await.json();
    assert_eq!(stats["publishes"], 2, "retries are not publishes: {stats}");
}

#[tokio::test]
async fn a_key_is_scoped_to_its_route_and_target() {
    let server = TestServer::default().await;
    let (mut news, _) = server.connect_json("channels=news").await;
    let (mut sports, _) = server.connect_json("channels=sports&client_id=alice").await;
    let mut replies = Vec::new();
    for path in [
        "/api/publish/news",
        "/api/publish/sports",
        "/api/send/alice",
        "/api/broadcast",
    ] {
        let reply = post_keyed(&server, path, "same-key", r#""hi""#).await;
        assert_eq!(reply.status, 200, "{path}: {}", body_text(&reply));
        assert!(!replayed(&reply), "{path} is a request of its own");
        replies.push(reply.json());
    }
    assert_eq!(
        replies,
        [
            json!({"channel":"news","offset":1,"subscribers":1}),
            json!({"channel":"sports","offset":1,"subscribers":1}),
            json!({"client_id":"alice","connections":1}),
            json!({"connections":2}),
        ]
    );
    assert_eq!(
        frame_types(&mut news, 2).await,
        ["broadcast", "message news"]
    );
    assert_eq!(
        frame_types(&mut sports, 3).await,
        ["broadcast", "direct", "message sports"]
    );
}

#[tokio::test]
async fn a_different_request_under_a_used_key_is_refused_with_409() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("channels=news").await;
    let first = post_keyed(&server, "/api/publish/news", "k1", r#"{"n":1}"#).await;
    assert_eq!(first.status, 200);
    let other_body = post_keyed(&server, "/api/publish/news", "k1", r#"{"n":2}"#).await;
    assert_eq!(other_body.status, 409);
    assert_eq!(other_body.json()["error"], "idempotency_key_reused");
    let message = other_body.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(r#""k1""#) && message.contains("new key"),
        "{message}"
    );
    assert!(!replayed(&other_body));
    let other_type = post(
        &server,
        "/api/publish/news",
        &[("idempotency-key", "k1"), ("content-type", "text/plain")],
        r#"{"n":1}"#,
    )
    .await;
    assert_eq!(other_type.status, 409, "{}", body_text(&other_type));
    // The first request's own retry still gets its reply.
    let retry = post_keyed(&server, "/api/publish/news", "k1", r#"{"n":1}"#).await;
    assert_eq!((retry.status, retry.body), (200, first.body));
    assert_eq!(recv_json(&mut ws).await["data"], json!({"n": 1}));
    assert_next_is_marker(&server, "news", 2, &mut [&mut ws]).await;
}

#[tokio::test]
async fn an_invalid_key_is_400_and_nothing_is_delivered() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("channels=news&client_id=alice").await;
    let too_long = "k".repeat(129);
    for key in ["", too_long.as_str(), "a b", "\u{e9}t\u{e9}", "a\tb"] {
        for path in ["/api/publish/news", "/api/send/alice", "/api/broadcast"] {
            let reply = post_keyed(&server, path, key, "1").await;
            assert_eq!(reply.status, 400, "{key:?} on {path}");
            let body = reply.json();
            assert_eq!(body["error"], "invalid_idempotency_key", "{body}");
            let message = body["message"].as_str().unwrap();
            assert!(
                message.contains("1 to 128 visible ASCII characters"),
                "{message}"
            );
        }
    }
    let twice = post(
        &server,
        "/api/publish/news",
        &[("idempotency-key", "a"), ("idempotency-key", "b")],
        "1",
    )
    .await;
    assert_eq!(twice.status, 400);
    assert!(
        twice.json()["message"]
            .as_str()
            .unwrap()
            .contains("more than once")
    );
    let longest = "k".repeat(128);
    let reply = post_keyed(&server, "/api/publish/news", &longest, "1").await;
    assert_eq!(reply.status, 200, "128 characters are fine");
    assert_eq!(recv_json(&mut ws).await["offset"], 1);
    assert_next_is_marker(&server, "news", 2, &mut [&mut ws]).await;
}

#[tokio::test]
async fn after_the_window_the_key_is_forgotten_and_a_retry_publishes_again() {
    let window = Config::default().idempotency_window;
    assert_eq!(window, Duration::from_secs(300), "the documented default");
    // The registry's clock is tokio's too: keep pings and idle closes out of the jump.
    let server = TestServer::start(
        Config::default()
            .ping_interval(Duration::from_secs(3600))
            .idle_timeout(Duration::from_secs(7200)),
    )
    .await;
    let (mut ws, _) = server.connect_json("channels=news").await;
    let first = post_keyed(&server, "/api/publish/news", "daily", r#""report""#).await;
    assert_eq!(first.json()["offset"], 1);

    // Half the window later (on tokio's clock, which the server's store reads): remembered.
    tokio::time::pause();
    tokio::time::advance(window / 2).await;
    tokio::time::resume();
    let retry = post_keyed(&server, "/api/publish/news", "daily", r#""report""#).await;
    assert!(replayed(&retry));
    assert_eq!(retry.body, first.body);

    // The window is over: the key is forgotten, and the same request publishes again.
    tokio::time::pause();
    tokio::time::advance(window / 2).await;
    tokio::time::resume();
    let again = post_keyed(&server, "/api/publish/news", "daily", r#""report""#).await;
    assert_eq!(again.status, 200);
    assert!(!replayed(&again));
    assert_eq!(again.json()["offset"], 2);
    for offset in [1, 2] {
        assert_eq!(recv_json(&mut ws).await["offset"], offset);
    }
    assert_next_is_marker(&server, "news", 3, &mut [&mut ws]).await;
}

#[tokio::test]
async fn sends_and_broadcasts_are_delivered_once_too() {
    let server = TestServer::default().await;
    let (mut alice, _) = server.connect_json("client_id=alice&channels=news").await;
    let (mut bob, _) = server.connect_json("channels=news").await;
    for _ in 0..2 {
        let sent = post_keyed(&server, "/api/send/alice", "dm-1", r#""psst""#).await;
        assert_eq!(sent.status, 200);
        assert_eq!(body_text(&sent), r#"{"client_id":"alice","connections":1}"#);
        let broadcast = post_keyed(&server, "/api/broadcast", "all-1", r#""all""#).await;
        assert_eq!(broadcast.status, 200);
        assert_eq!(body_text(&broadcast), r#"{"connections":2}"#);
    }
    let retried = post_keyed(&server, "/api/send/alice", "dm-1", r#""psst""#).await;
    assert!(replayed(&retried));
    assert_eq!(frame_types(&mut alice, 2).await, ["broadcast", "direct"]);
    assert_eq!(
        recv_json(&mut bob).await,
        json!({"type":"broadcast","data":"all"})
    );
    assert_next_is_marker(&server, "news", 1, &mut [&mut alice, &mut bob]).await;
}

#[tokio::test]
async fn a_failed_first_attempt_is_not_remembered() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("channels=news").await;
    let invalid = post_keyed(&server, "/api/publish/news", "k", r#"{"broken""#).await;
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.json()["error"], "invalid_json");
    // The same key with the corrected body is a first request, not a reused key.
    let fixed = post_keyed(&server, "/api/publish/news", "k", r#"{"fixed":true}"#).await;
    assert_eq!(fixed.status, 200, "{}", body_text(&fixed));
    assert!(!replayed(&fixed));
    assert_eq!(recv_json(&mut ws).await["data"], json!({"fixed": true}));

    // A direct send that found nobody (404) is not remembered: once the client is there, the
    // retry delivers.
    let nobody = post_keyed(&server, "/api/send/carol", "dm", r#""hi""#).await;
    assert_eq!(nobody.status, 404);
    let (mut carol, _) = server.connect_json("client_id=carol").await;
    let retry = post_keyed(&server, "/api/send/carol", "dm", r#""hi""#).await;
    assert_eq!(retry.status, 200);
    assert!(!replayed(&retry));
    assert_eq!(recv_json(&mut carol).await["data"], "hi");
}

/// Two worker threads, so that duplicates are handled at the same time as the first request
/// (on one thread a publish runs from key lookup to reply without giving the others a turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_wait_for_the_first_and_deliver_once() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("channels=news").await;
    for round in 1..=10u64 {
        let key = format!("burst-{round}");
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(server.http().await);
        }
        let requests = clients.into_iter().map(|mut http| {
            let key = key.clone();
            tokio::spawn(async move {
                http.request(
                    "POST",
                    "/api/publish/news",
                    &[("idempotency-key", key.as_str()), JSON],
                    b"\"once\"",
                )
                .await
            })
        });
        let mut replies = Vec::new();
        for request in requests.collect::<Vec<_>>() {
            replies.push(request.await.expect("request task"));
        }
        assert!(replies.iter().all(|reply| reply.status == 200));
        assert!(replies.iter().all(|reply| reply.body == replies[0].body));
        assert_eq!(replies.iter().filter(|reply| !replayed(reply)).count(), 1);
        assert_eq!(replies[0].json()["offset"], round);
        assert_eq!(recv_json(&mut ws).await["offset"], round);
    }
    assert_next_is_marker(&server, "news", 11, &mut [&mut ws]).await;
}

#[tokio::test]
async fn past_the_key_limit_the_oldest_key_is_forgotten_first() {
    let server = TestServer::start(Config::default().idempotency_keys(2)).await;
    for key in ["k1", "k2", "k3"] {
        assert_eq!(
            post_keyed(&server, "/api/publish/news", key, "1")
                .await
                .status,
            200
        );
    }
    assert_eq!(
        metric(&server, "herald_idempotency_keys_forgotten_total").await,
        1
    );
    for (key, offset) in [("k2", 2), ("k3", 3)] {
        let retry = post_keyed(&server, "/api/publish/news", key, "1").await;
        assert!(replayed(&retry), "{key}");
        assert_eq!(retry.json()["offset"], offset);
    }
    let forgotten = post_keyed(&server, "/api/publish/news", "k1", "1").await;
    assert!(
        !replayed(&forgotten),
        "k1 was forgotten and publishes again"
    );
    assert_eq!(forgotten.json()["offset"], 4);
    assert_eq!(
        metric(&server, "herald_idempotency_keys_forgotten_total").await,
        2
    );
}

// ---------------------------------------------------------------------------------------------
// Cluster mode: the keys live in Redis.
// ---------------------------------------------------------------------------------------------

/// The integer or bulk string of a one-value RESP reply.
fn resp_value(reply: &str) -> String {
    let mut lines = reply.split("\r\n");
    let first = lines.next().unwrap_or_default();
    match first.chars().next() {
        Some(':') => first[1..].to_owned(),
        Some('$') => lines.next().unwrap_or_default().to_owned(),
        _ => panic!("unexpected reply {reply:?}"),
    }
}

#[tokio::test]
async fn a_key_used_on_one_node_is_replayed_on_another() {
    let Some(redis) = RedisServer::start("idempotency across nodes") else {
        return;
    };
    let (a, b) = (node(&redis.url()).await, node(&redis.url()).await);
    wait_ready(&[&a, &b]).await;
    let (mut on_a, _) = a.connect_json("channels=news").await;
    let (mut on_b, _) = b.connect_json("channels=news&client_id=alice").await;
    wait_numsub(&redis, "herald:{news}:messages", 2).await;
    wait_numsub(&redis, "herald:client:alice", 1).await;

    let first = post_keyed(&a, "/api/publish/news", "order-7", r#""shipped""#).await;
    assert_eq!(
        body_text(&first),
        r#"{"channel":"news","nodes":2,"offset":1}"#
    );
    assert!(!replayed(&first));
    let retry = post_keyed(&b, "/api/publish/news", "order-7", r#""shipped""#).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body, first.body, "B answers with A's offset");
    assert!(replayed(&retry));
    let reused = post_keyed(&b, "/api/publish/news", "order-7", r#""lost""#).await;
    assert_eq!(reused.status, 409);
    assert_eq!(reused.json()["error"], "idempotency_key_reused");
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(recv_message(ws).await["data"], "shipped");
    }
    assert_next_is_marker(&b, "news", 2, &mut [&mut on_a, &mut on_b]).await;

    // The record is in the channel's hash slot and expires with the window.
    let record = "herald:{news}:idem:order-7";
    let offset = redis.command(&["HGET", record, "offset"]).expect("redis");
    assert_eq!(resp_value(&offset), "1");
    let ttl: u64 = resp_value(&redis.command(&["PTTL", record]).expect("redis"))
        .parse()
        .expect("PTTL is a number");
    assert!((1..=300_000).contains(&ttl), "record TTL {ttl} ms");

    // Direct sends and broadcasts: once, and a send that found nobody is not remembered.
    for server in [&a, &b] {
        let sent = post_keyed(server, "/api/send/alice", "dm-1", r#""psst""#).await;
        assert_eq!(body_text(&sent), r#"{"client_id":"alice","nodes":1}"#);
        let broadcast = post_keyed(server, "/api/broadcast", "all-1", r#""all""#).await;
        assert_eq!(body_text(&broadcast), r#"{"nodes":2}"#);
        assert_eq!(replayed(&sent), std::ptr::eq(server, &b));
        assert_eq!(replayed(&broadcast), std::ptr::eq(server, &b));
    }
    assert_eq!(frame_types(&mut on_a, 1).await, ["broadcast"]);
    assert_eq!(frame_types(&mut on_b, 2).await, ["broadcast", "direct"]);
    assert_next_is_marker(&a, "news", 3, &mut [&mut on_a, &mut on_b]).await;
    let nobody = post_keyed(&a, "/api/send/carol", "dm-2", r#""hi""#).await;
    assert_eq!(nobody.status, 404);
    let (mut carol, _) = b.connect_json("client_id=carol").await;
    let retry = post_keyed(&a, "/api/send/carol", "dm-2", r#""hi""#).await;
    assert_eq!((retry.status, replayed(&retry)), (200, false));
    assert_eq!(recv_message(&mut carol).await["data"], "hi");
}

#[tokio::test]
async fn concurrent_requests_with_one_key_on_two_nodes_deliver_once() {
    let Some(redis) = RedisServer::start("idempotency race across nodes") else {
        return;
    };
    let (a, b) = (node(&redis.url()).await, node(&redis.url()).await);
    wait_ready(&[&a, &b]).await;
    let (mut on_a, _) = a.connect_json("channels=news").await;
    let (mut on_b, _) = b.connect_json("channels=news").await;
    wait_numsub(&redis, "herald:{news}:messages", 2).await;
    for round in 1..=20u64 {
        let key = format!("race-{round}");
        let (mut to_a, mut to_b) = (a.http().await, b.http().await);
        let headers = [("idempotency-key", key.as_str()), JSON];
        let (from_a, from_b) = tokio::join!(
            to_a.request("POST", "/api/publish/news", &headers, b"\"once\""),
            to_b.request("POST", "/api/publish/news", &headers, b"\"once\""),
        );
        assert_eq!((from_a.status, from_b.status), (200, 200));
        assert_eq!(from_a.body, from_b.body);
        assert_eq!(from_a.json()["offset"], round);
        assert!(
            replayed(&from_a) != replayed(&from_b),
            "one of them published"
        );
        for ws in [&mut on_a, &mut on_b] {
            assert_eq!(recv_message(ws).await["offset"], round);
        }
    }
    assert_next_is_marker(&a, "news", 21, &mut [&mut on_a, &mut on_b]).await;
}

/// README "Faults": a 503 after a timeout does not mean nothing was published. With a key, the
/// retry says what happened: here the first attempt reached Redis, so the retry gets its offset.
#[tokio::test]
async fn a_retry_after_a_timeout_gets_the_offset_of_the_attempt_that_reached_redis() {
    let Some(redis) = RedisServer::start("idempotency after a timeout") else {
        return;
    };
    let upstream = format!("127.0.0.1:{}", redis.port).parse().expect("addr");
    let proxy = StallProxy::start(upstream).await;
    let a = TestServer::start(
        Config::default()
            .redis(Some(format!("redis://{}/", proxy.addr)))
            .redis_timeout(Duration::from_millis(500)),
    )
    .await;
    let b = node(&redis.url()).await;
    wait_ready(&[&a, &b]).await;
    let (mut subscriber, _) = b.connect_json("channels=news").await;
    wait_numsub(&redis, "herald:{news}:messages", 1).await;
    // Opens A's publisher connection and loads the publish script.
    let warm = post_keyed(&a, "/api/publish/warm-up", "w", "1").await;
    assert_eq!(warm.status, 200);

    // Redis does the publish, but its answer never reaches A in time.
    proxy.stall(true);
    let timed_out = post_keyed(&a, "/api/publish/news", "order-9", r#""shipped""#).await;
    assert_eq!(timed_out.status, 503, "{}", body_text(&timed_out));
    assert_eq!(timed_out.json()["error"], "broker_unavailable");
    assert_eq!(
        recv_message(&mut subscriber).await,
        json!({"type":"message","channel":"news","offset":1,"data":"shipped"}),
        "the first attempt reached Redis"
    );

    proxy.stall(false);
    wait_ready(&[&a]).await;
    let retry = post_keyed(&a, "/api/publish/news", "order-9", r#""shipped""#).await;
    assert_eq!(retry.status, 200);
    assert!(replayed(&retry));
    let reply: Value = retry.json();
    assert_eq!(reply, json!({"channel":"news","offset":1,"nodes":1}));
    assert_next_is_marker(&a, "news", 2, &mut [&mut subscriber]).await;
}

/// README "Faults", the other half: a retry with its key after a first attempt that never
/// reached Redis (it was down) is published.
#[tokio::test]
async fn a_retry_after_redis_was_down_is_published() {
    let Some(mut redis) = RedisServer::start("idempotency while redis is down") else {
        return;
    };
    let a = node(&redis.url()).await;
    wait_ready(&[&a]).await;
    let (mut subscriber, _) = a.connect_json("channels=news").await;
    wait_numsub(&redis, "herald:{news}:messages", 1).await;
    redis.kill();
    let refused = post_keyed(&a, "/api/publish/news", "order-10", r#""shipped""#).await;
    assert_eq!(refused.status, 503);
    redis.restart();
    wait_ready(&[&a]).await;
    wait_numsub(&redis, "herald:{news}:messages", 1).await;
    let retry = post_keyed(&a, "/api/publish/news", "order-10", r#""shipped""#).await;
    assert_eq!(retry.status, 200, "{}", body_text(&retry));
    assert!(
        !replayed(&retry),
        "nothing to replay: the first attempt went nowhere"
    );
    assert_eq!(recv_message(&mut subscriber).await["data"], "shipped");
    assert_next_is_marker(&a, "news", 2, &mut [&mut subscriber]).await;
}
