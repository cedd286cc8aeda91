//! Server-Sent Events (`GET /sse`) over real sockets: a hand-written HTTP/1.1 client that reads
//! the chunked event stream byte by byte, WebSocket clients next to it for comparison, and the
//! real `curl -N`. Events for channel messages, direct sends and broadcasts; heartbeats and no
//! idle close on tokio's paused clock; resuming several channels with a last event id (header
//! or query); a slow consumer cut off that comes back and misses nothing; auth, bad input and
//! CORS; the README's example, run as it is written.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::sse::{End, Item, Sse, positions};
use common::{HttpClient, TestServer, WAIT, http_exchange, recv};
use herald::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "sse-tests-secret-of-at-least-32-bytes";

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// The (epoch, offset) of `channel` in a welcome.
fn standing(welcome: &Value, channel: &str) -> (String, u64) {
    let entry = &welcome["channels"][channel];
    (
        entry["epoch"].as_str().expect("an epoch").to_owned(),
        entry["offset"].as_u64().expect("an offset"),
    )
}

async fn publish(http: &mut HttpClient, channel: &str, body: &Value) {
    let reply = http
        .post_json(&format!("/api/publish/{channel}"), &body.to_string())
        .await;
    assert_eq!(
        reply.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
}

async fn stats(server: &TestServer) -> Value {
    server.http().await.get("/api/stats").await.json()
}

/// Polls `/api/stats` until `condition` holds (at most [`WAIT`]).
async fn until_stats(server: &TestServer, what: &str, condition: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = stats(server).await;
        if condition(&stats) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {what}: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(server: &TestServer) -> String {
    let reply = server.http().await.get("/metrics").await;
    String::from_utf8_lossy(&reply.body).into_owned()
}

fn token(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A `GET /sse` request with these header lines, for replies that are not streams.
fn sse_request(query: &str, headers: &str) -> Vec<u8> {
    format!("GET /sse?{query} HTTP/1.1\r\nhost: herald.test\r\n{headers}\r\n").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn messages_direct_sends_and_broadcasts_are_events_of_the_json_envelopes() {
    let server = TestServer::default().await;
    let mut sse = Sse::open(server.addr, "channels=news,room:1&client_id=alice", "").await;
    assert_eq!(
        sse.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(sse.header("cache-control"), Some("no-cache"));
    assert_eq!(sse.header("x-accel-buffering"), Some("no"));
    assert_eq!(
        sse.header("access-control-allow-origin"),
        None,
        "no Origin, no CORS"
    );
    // A json WebSocket of the same client and channels gets the same envelopes.
    let mut ws = server
        .connect("/ws?channels=news,room:1&client_id=alice")
        .await;
    let ws_text = |message: Message| match message {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    };
    let ws_welcome: Value = serde_json::from_str(&ws_text(recv(&mut ws).await)).unwrap();

    let (welcome_id, welcome) = sse.next_event().await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["client_id"], "alice");
    assert_eq!(welcome, ws_welcome, "the welcome a json WebSocket gets");
    let (news, room) = (standing(&welcome, "news"), standing(&welcome, "room:1"));
    assert_eq!(positions(&welcome_id), [news.clone(), room.clone()]);

    let mut http = server.http().await;
    publish(&mut http, "news", &json!({"title": "hi"})).await;
    let reply = http
        .request("POST", "/api/publish/room:1", &[], b"plain text")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        http.request("POST", "/api/send/alice", &[], b"psst")
            .await
            .status,
        200
    );
    assert_eq!(
        http.post_json("/api/broadcast", r#"{"maintenance":"soon"}"#)
            .await
            .status,
        200
    );
    // Pretty-printed JSON: its line breaks become data lines, and the client reads the same
    // value back.
    let pretty = serde_json::to_string_pretty(&json!({"a": [1, 2], "b": {"c": "d"}})).unwrap();
    assert!(pretty.contains('\n'));
    let reply = http
        .request(
            "POST",
            "/api/publish/news",
            &[("content-type", "application/json")],
            pretty.replace('\n', "\r\n").as_bytes(),
        )
        .await;
    assert_eq!(reply.status, 200);

    let expected_ids = [
        [(news.0.clone(), 1), (room.0.clone(), 0)],
        [(news.0.clone(), 1), (room.0.clone(), 1)],
        [(news.0.clone(), 1), (room.0.clone(), 1)],
        [(news.0.clone(), 1), (room.0.clone(), 1)],
        [(news.0.clone(), 2), (room.0.clone(), 1)],
    ];
    for (at, want_id) in expected_ids.iter().enumerate() {
        let (id, data) = sse.next_event().await;
        let ws_data: Value = serde_json::from_str(&ws_text(recv(&mut ws).await)).unwrap();
        assert_eq!(data, ws_data, "event {at}: the json envelope");
        assert_eq!(&positions(&id)[..], &want_id[..], "event {at}: {data}");
    }
    // The envelopes come byte for byte (but for the payload's own line breaks).
    publish(&mut http, "news", &json!({"n": 3})).await;
    let Some(Item::Event { data, .. }) = sse.next_item().await else {
        panic!("expected the event");
    };
    assert_eq!(data, ws_text(recv(&mut ws).await));

    // The stream counts as a connection while it is open, and not after the client left.
    assert_eq!(stats(&server).await["connections"], 2);
    drop(sse);
    until_stats(&server, "the stream is unregistered", |stats| {
        stats["connections"] == 1
    })
    .await;
    let metrics = metrics(&server).await;
    assert!(
        metrics.contains(r#"herald_connections_closed_total{reason="peer_gone"} 1"#),
        "{metrics}"
    );
}

/// On tokio's paused clock: a stream gets a `: ping` comment every ping interval and stays open
/// long past the idle timeout, while a WebSocket that never answers its pings is closed.
#[tokio::test]
async fn heartbeats_keep_a_silent_stream_open_past_the_idle_timeout() {
    let server = TestServer::default().await; // ping every 25 s, idle timeout 60 s
    let mut sse = Sse::open(server.addr, "channels=quiet", "").await;
    let (_, welcome) = sse.next_event().await;
    assert_eq!(welcome["type"], "welcome");
    let mut silent_ws = common::raw_upgrade_json(server.addr, "channels=quiet").await;

    tokio::time::pause();
    for step in 0..8 {
        tokio::time::advance(Duration::from_secs(30)).await;
        match sse.next_item().await {
            Some(Item::Comment(text)) => assert_eq!(text, "ping", "step {step}"),
            other => panic!("step {step}: expected the heartbeat, got {other:?}"),
        }
    }
    // Four minutes of silence: the WebSocket was closed for it, the stream is open.
    let end = common::read_until_close(&mut silent_ws, WAIT).await;
    assert_eq!(
        (end.close_code, end.close_reason.as_str()),
        (Some(1001), "idle timeout")
    );
    let mut http = server.http().await;
    publish(&mut http, "quiet", &json!("still here")).await;
    let (_, message) = sse.next_event().await;
    assert_eq!(message["data"], "still here");
    let metrics = metrics(&server).await;
    assert!(
        metrics.contains(r#"herald_connections_closed_total{reason="idle_timeout"} 1"#),
        "only the WebSocket: {metrics}"
    );
}

/// A stream that comes back with the id of the last event it got, in `Last-Event-ID`, gets
/// every message published meanwhile on each of its channels exactly once, in order, then the
/// live ones; the welcome says each channel was recovered.
#[tokio::test]
async fn last_event_id_resumes_every_channel_exactly() {
    let server = TestServer::default().await;
    let mut http = server.http().await;
    let query = "channels=a,b";
    let mut sse = Sse::open(server.addr, query, "").await;
    let (welcome_id, welcome) = sse.next_event().await;
    let (epoch_a, epoch_b) = (standing(&welcome, "a").0, standing(&welcome, "b").0);
    publish(&mut http, "a", &json!("a1")).await;
    publish(&mut http, "b", &json!("b1")).await;
    sse.next_event().await;
    let (last_id, last) = sse.next_event().await;
    assert_eq!(last["data"], "b1");
    assert_eq!(
        positions(&last_id),
        [(epoch_a.clone(), 1), (epoch_b.clone(), 1)]
    );
    drop(sse);

    // Published while the client is away, on both channels.
    for body in ["a2", "b2", "a3", "a4", "b3"] {
        publish(&mut http, &body[..1], &json!(body)).await;
    }
    let mut back = Sse::open(server.addr, query, &format!("last-event-id: {last_id}\r\n")).await;
    let (id, welcome) = back.next_event().await;
    for channel in ["a", "b"] {
        assert_eq!(welcome["channels"][channel]["recovered"], true, "{welcome}");
    }
    assert_eq!(
        positions(&id),
        positions(&last_id),
        "the welcome's id is the client's"
    );
    let mut got = Vec::new();
    while got.len() < 5 {
        let (id, message) = back.next_event().await;
        got.push((
            message["channel"].as_str().unwrap().to_owned(),
            message["offset"].clone(),
        ));
        let data = message["data"].as_str().unwrap().to_owned();
        let at = positions(&id);
        let index = usize::from(data.starts_with('b'));
        assert_eq!(
            at[index].1, message["offset"],
            "{data}: the id moved with it"
        );
    }
    let of = |channel: &str| -> Vec<Value> {
        got.iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, offset)| offset.clone())
            .collect()
    };
    assert_eq!(of("a"), [json!(2), json!(3), json!(4)], "{got:?}");
    assert_eq!(of("b"), [json!(2), json!(3)], "{got:?}");
    publish(&mut http, "b", &json!("b4")).await;
    let (id, live) = back.next_event().await;
    assert_eq!(
        (live["data"].clone(), positions(&id)),
        (
            json!("b4"),
            vec![(epoch_a.clone(), 4), (epoch_b.clone(), 4)]
        ),
        "live next, nothing twice"
    );
    drop(back);

    // The welcome's id alone resumes exactly too (a client gone before any message), here
    // from the query; a Last-Event-ID header would win over it.
    let mut again = Sse::open(
        server.addr,
        &format!("{query}&last_event_id={welcome_id}"),
        "",
    )
    .await;
    let (_, welcome) = again.next_event().await;
    assert_eq!(welcome["channels"]["a"]["recovered"], true);
    let mut offsets = Vec::new();
    for _ in 0..8 {
        let (_, message) = again.next_event().await;
        offsets.push((
            message["data"].as_str().unwrap().to_owned(),
            message["offset"].clone(),
        ));
    }
    offsets.sort_by(|x, y| x.0.cmp(&y.0));
    let datas: Vec<&str> = offsets.iter().map(|(data, _)| data.as_str()).collect();
    assert_eq!(datas, ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"]);
    drop(again);
    let header_wins = Sse::open(
        server.addr,
        &format!("{query}&last_event_id=not-an-id"),
        &format!("last-event-id: {id}\r\n"),
    )
    .await;
    drop(header_wins);

    // A position the channel cannot continue from is said so, and the stream goes on live.
    let other_epoch = id.replacen(&epoch_a, "zzzzzzzz", 1);
    let mut fresh = Sse::open(
        server.addr,
        query,
        &format!("last-event-id: {other_epoch}\r\n"),
    )
    .await;
    let (id, welcome) = fresh.next_event().await;
    assert_eq!(welcome["channels"]["a"]["recovered"], false);
    assert_eq!(welcome["channels"]["a"]["reason"], "epoch_changed");
    assert_eq!(welcome["channels"]["b"]["recovered"], true);
    assert_eq!(
        positions(&id),
        [(epoch_a.clone(), 4), (epoch_b.clone(), 4)],
        "where to go on from"
    );
    publish(&mut http, "a", &json!("a5")).await;
    assert_eq!(fresh.next_event().await.1["data"], "a5");
}

/// A client with a small receive buffer that stops reading is cut off as a slow consumer (its
/// 16-frame queue overflows); coming back with the id of the last whole event it got, it
/// gets every message after it, streamed through that same small queue, then live ones.
#[tokio::test]
async fn a_slow_consumer_is_cut_off_and_comes_back_missing_nothing() {
    const TOTAL: u64 = 3000;
    let server = TestServer::start(Config::default().queue_capacity(16).history_size(5000)).await;
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let stream = socket.connect(server.addr).await.expect("connect");
    let mut slow = Sse::open_on(stream, "channels=ticker", "").await;
    let mut http = server.http().await;
    let payload = json!("x".repeat(4096));
    for _ in 0..TOTAL {
        publish(&mut http, "ticker", &payload).await;
    }
    until_stats(&server, "the slow stream is dropped", |stats| {
        stats["slow_consumer_drops"] == 1 && stats["connections"] == 0
    })
    .await;
    let metrics = metrics(&server).await;
    assert!(
        metrics.contains(r#"herald_connections_closed_total{reason="slow_consumer"} 1"#),
        "{metrics}"
    );

    let (events, end) = slow.read_to_end().await;
    assert_eq!(end, End::Cut, "cut off, not ended");
    let (last_id, _) = events.last().expect("the welcome at least").clone();
    let read = events.len() as u64 - 1;
    for (n, (_, message)) in events.iter().skip(1).enumerate() {
        assert_eq!(message["offset"], n as u64 + 1, "in order, none missing");
    }
    assert!(read < TOTAL - 16, "it really missed messages: read {read}");
    assert_eq!(positions(&last_id)[0].1, read);

    let mut back = Sse::open(
        server.addr,
        "channels=ticker",
        &format!("last-event-id: {last_id}\r\n"),
    )
    .await;
    let (_, welcome) = back.next_event().await;
    assert_eq!(
        welcome["channels"]["ticker"]["recovered"], true,
        "{welcome}"
    );
    for offset in read + 1..=TOTAL {
        let (id, message) = back.next_event().await;
        assert_eq!(message["offset"], offset);
        assert_eq!(positions(&id)[0].1, offset);
    }
    publish(&mut http, "ticker", &json!("live")).await;
    let (_, message) = back.next_event().await;
    assert_eq!(
        (message["offset"].clone(), message["data"].clone()),
        (json!(TOTAL + 1), json!("live"))
    );
    assert_eq!(
        stats(&server).await["slow_consumer_drops"],
        1,
        "the replay streamed"
    );
}

/// Even through a one-frame queue (half of which is nothing), a replay streams: a frame at a
/// time as the client reads.
#[tokio::test]
async fn a_replay_streams_through_a_one_frame_queue() {
    let server = TestServer::start(Config::default().queue_capacity(1)).await;
    let mut sse = Sse::open(server.addr, "channels=tiny", "").await;
    let (welcome_id, _) = sse.next_event().await;
    drop(sse);
    let mut http = server.http().await;
    for n in 1..=20 {
        publish(&mut http, "tiny", &json!(n)).await;
    }
    let mut back = Sse::open(
        server.addr,
        &format!("channels=tiny&last_event_id={welcome_id}"),
        "",
    )
    .await;
    assert_eq!(
        back.next_event().await.1["channels"]["tiny"]["recovered"],
        true
    );
    for n in 1..=20 {
        assert_eq!(back.next_event().await.1["data"], n);
    }
}

#[tokio::test]
async fn with_jwt_auth_a_stream_needs_a_token_and_ends_at_its_expiry() {
    let server = TestServer::start(Config::default().jwt_secret(Some(SECRET.to_owned()))).await;
    let grant = |sub: &str, exp: u64| token(&json!({"sub": sub, "exp": exp, "channels": ["news"]}));
    let reply = http_exchange(server.addr, sse_request("channels=news", "")).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["error"], "token_missing");
    assert_eq!(
        reply.header("www-authenticate"),
        Some(r#"Bearer error="invalid_token""#)
    );
    let reply = http_exchange(server.addr, sse_request("channels=news&token=junk", "")).await;
    assert_eq!(
        (reply.status, reply.json()["error"].clone()),
        (401, json!("token_malformed"))
    );
    let reply = http_exchange(
        server.addr,
        sse_request(
            &format!("channels=other&token={}", grant("eve", now() + 60)),
            "",
        ),
    )
    .await;
    assert_eq!(
        (reply.status, reply.json()["error"].clone()),
        (403, json!("forbidden"))
    );
    assert_eq!(
        stats(&server).await["connections_opened"],
        0,
        "nothing registered"
    );

    // From the query (browsers), ?client_id= ignored: the token names the client.
    let mut sse = Sse::open(
        server.addr,
        &format!(
            "channels=news&client_id=mallory&token={}",
            grant("alice", now() + 3600)
        ),
        "",
    )
    .await;
    assert_eq!(sse.next_event().await.1["client_id"], "alice");
    // From the header.
    let mut bob = Sse::open(
        server.addr,
        "channels=news",
        &format!("authorization: Bearer {}\r\n", grant("bob", now() + 30)),
    )
    .await;
    assert_eq!(bob.next_event().await.1["client_id"], "bob");
    // A stream cannot refresh its token: it ends at the expiry (the client opens a new one
    // with a fresh token and its last event id).
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(32)).await;
    let (events, end) = bob.read_to_end().await;
    assert_eq!((events.len(), end), (0, End::Clean));
    let metrics = metrics(&server).await;
    assert!(
        metrics.contains(r#"herald_connections_closed_total{reason="token_expired"} 1"#),
        "{metrics}"
    );
    server
        .http()
        .await
        .post_json("/api/publish/news", "1")
        .await;
    assert_eq!(
        sse.next_event().await.1["data"],
        1,
        "alice's stream goes on"
    );
}

#[tokio::test]
async fn bad_parameters_and_last_event_ids_are_refused_with_400() {
    let server = TestServer::start(Config::default().max_subscriptions(2)).await;
    let mut sse = Sse::open(server.addr, "channels=a,b", "").await;
    let (id, _) = sse.next_event().await;
    drop(sse);
    let refused = [
        (
            "chanels=a",
            "",
            "invalid_query",
            "unknown query parameter \"chanels\"",
        ),
        (
            "channels=a&format=raw",
            "",
            "invalid_query",
            "last_event_id",
        ),
        (
            "channels=a&since=a:abcdefgh:1",
            "",
            "invalid_query",
            "accepted: channels",
        ),
        (
            "channels=a&client_id=x&client_id=y",
            "",
            "invalid_query",
            "more than once",
        ),
        (
            "channels=a&last_event_id=x&last_event_id=y",
            "",
            "invalid_query",
            "more than once",
        ),
        ("channels=a,b,c", "", "too_many_subscriptions", "limit 2"),
        (
            "channels=a%20b",
            "",
            "invalid_channel",
            "invalid channel name",
        ),
        (
            "client_id=a%20b",
            "",
            "invalid_client_id",
            "invalid client id",
        ),
        (
            "channels=a,b&last_event_id=nope",
            "",
            "invalid_last_event_id",
            "not one this server sent",
        ),
        (
            "channels=a,b",
            "last-event-id: 7rn1tq.abcdefgh-01\r\n",
            "invalid_last_event_id",
            "leading zeros",
        ),
        (
            "channels=a",
            &format!("last-event-id: {id}\r\n"),
            "invalid_last_event_id",
            "2 channel(s) but channels= names 1",
        ),
        (
            "channels=b,a",
            &format!("last-event-id: {id}\r\n"),
            "invalid_last_event_id",
            "same names in the same order",
        ),
        (
            "channels=a,c",
            &format!("last-event-id: {id}\r\n"),
            "invalid_last_event_id",
            "another list of channels",
        ),
        (
            "channels=a",
            "last-event-id: \u{e9}\r\n",
            "invalid_last_event_id",
            "not ASCII",
        ),
    ];
    for (query, headers, code, words) in refused {
        let reply = http_exchange(server.addr, sse_request(query, headers)).await;
        let body = reply.json();
        assert_eq!(
            (reply.status, body["error"].as_str()),
            (400, Some(code)),
            "{query} {headers}: {body}"
        );
        let message = body["message"].as_str().expect("a message");
        assert!(message.contains(words), "{query} {headers}: {message}");
    }
    let reply = http_exchange(
        server.addr,
        b"POST /sse?channels=a HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(
        (reply.status, reply.header("allow")),
        (405, Some("GET, OPTIONS"))
    );
    assert_eq!(
        stats(&server).await["connections_opened"],
        1,
        "only the first stream"
    );
    // An empty last event id is none (a page with no event yet can always send one).
    let mut fresh = Sse::open(
        server.addr,
        "channels=a&last_event_id=",
        "last-event-id: \r\n",
    )
    .await;
    assert!(
        fresh.next_event().await.1["channels"]["a"]
            .get("recovered")
            .is_none()
    );
}

#[tokio::test]
async fn cors_follows_the_origin_rule_of_websockets() {
    let server = TestServer::start(
        Config::default().allowed_origins(vec!["https://app.example.com".to_owned()]),
    )
    .await;
    for origin in ["https://app.example.com", "http://herald.test"] {
        let sse = Sse::open(server.addr, "channels=a", &format!("origin: {origin}\r\n")).await;
        assert_eq!(
            sse.header("access-control-allow-origin"),
            Some(origin),
            "{origin}"
        );
        assert_eq!(sse.header("vary"), Some("origin"));
    }
    let reply = http_exchange(
        server.addr,
        sse_request("channels=a", "origin: https://evil.example\r\n"),
    )
    .await;
    assert_eq!(
        (reply.status, reply.json()["error"].clone()),
        (403, json!("origin_not_allowed"))
    );
    assert_eq!(reply.header("access-control-allow-origin"), None);

    let preflight = |origin: &str| {
        format!(
            "OPTIONS /sse?channels=a HTTP/1.1\r\nhost: herald.test\r\norigin: {origin}\r\naccess-control-request-method: GET\r\naccess-control-request-headers: last-event-id\r\n\r\n"
        )
        .into_bytes()
    };
    let reply = http_exchange(server.addr, preflight("https://app.example.com")).await;
    assert_eq!(reply.status, 204);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(reply.header("access-control-allow-methods"), Some("GET"));
    assert_eq!(
        reply.header("access-control-allow-headers"),
        Some("authorization, last-event-id")
    );
    let reply = http_exchange(server.addr, preflight("https://evil.example")).await;
    assert_eq!(reply.status, 403);

    let any = TestServer::start(Config::default().allowed_origins(vec!["*".to_owned()])).await;
    let sse = Sse::open(any.addr, "channels=a", "origin: https://evil.example\r\n").await;
    assert_eq!(
        sse.header("access-control-allow-origin"),
        Some("https://evil.example")
    );
}

#[tokio::test]
async fn a_shutdown_ends_streams_cleanly() {
    let server = TestServer::default().await;
    let mut sse = Sse::open(server.addr, "channels=news", "").await;
    sse.next_event().await;
    server
        .http()
        .await
        .post_json("/api/publish/news", "1")
        .await;
    assert_eq!(sse.next_event().await.1["data"], 1);
    server.shutdown().await.expect("clean shutdown");
    let (events, end) = sse.read_to_end().await;
    assert_eq!(
        (events.len(), end),
        (0, End::Clean),
        "an end the client reconnects after"
    );
}

// ---------------------------------------------------------------------------------------------
// The real curl, and the README's example.
// ---------------------------------------------------------------------------------------------

/// `curl` started by a test, killed when dropped; its stdout lines come through a channel.
struct Curl {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Curl {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new("/usr/bin/curl")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run /usr/bin/curl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line curl printed (within [`WAIT`]).
    async fn line(&self) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            match self.lines.try_recv() {
                Ok(line) => return line,
                Err(mpsc::TryRecvError::Disconnected) => panic!("curl exited"),
                Err(mpsc::TryRecvError::Empty) => {
                    assert!(std::time::Instant::now() < deadline, "curl printed nothing");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

impl Drop for Curl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The README's SSE section: its `curl -N` command, the publish it says to run, and the lines
/// it says curl prints.
fn readme_example() -> (String, String, Vec<String>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(path).expect("read README.md");
    let start = readme
        .find("\n## Server-Sent Events\n")
        .expect("README.md has a Server-Sent Events section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let command = |prefix: &str| {
        section
            .lines()
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("the section has a line starting {prefix:?}"))
            .split(" #")
            .next()
            .unwrap()
            .trim()
            .to_owned()
    };
    let text = section
        .split("```text\n")
        .nth(1)
        .expect("the section shows curl's output in a text block");
    let output = text[..text.find("```").expect("the block ends")]
        .lines()
        .map(str::to_owned)
        .collect();
    (command("curl -N "), command("curl -X POST "), output)
}

/// The README's example, run as written (`localhost:8080` pointed at a test server): the real
/// `curl -N` prints exactly the lines the README shows, but for the channel's random epoch.
#[tokio::test]
async fn curl_prints_what_the_readme_shows() {
    let (listen, publish_command, expected) = readme_example();
    assert!(listen.contains("localhost:8080"), "{listen}");
    let server = TestServer::default().await;
    let here = format!("127.0.0.1:{}", server.addr.port());
    let url = listen
        .trim_start_matches("curl -N ")
        .trim_matches('\'')
        .replace("localhost:8080", &here);
    let curl = Curl::spawn(&["-N", "-s", &url]);
    let mut printed = Vec::new();
    for _ in 0..3 {
        printed.push(curl.line().await);
    }
    // Off the runtime's thread, which serves the publish.
    let publish_command = publish_command.replace("localhost:8080", &here);
    let publish = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .args(["-c", &publish_command])
            .stdout(Stdio::null())
            .status()
            .expect("run the README's publish")
    });
    let publish = tokio::time::timeout(WAIT, publish)
        .await
        .expect("the publish timed out")
        .expect("the publish ran");
    assert!(publish.success());
    while printed.len() < expected.len() {
        printed.push(curl.line().await);
    }
    let welcome: Value = serde_json::from_str(printed[1].strip_prefix("data: ").expect("data"))
        .expect("the welcome is JSON");
    let epoch = welcome["channels"]["news"]["epoch"]
        .as_str()
        .expect("an epoch");
    let readme_epoch = expected[1]
        .split(r#""epoch":""#)
        .nth(1)
        .and_then(|rest| rest.get(..8))
        .expect("the README's welcome shows an epoch");
    let expected: Vec<String> = expected
        .iter()
        .map(|line| line.replace(readme_epoch, epoch))
        .collect();
    assert_eq!(printed, expected);
}
