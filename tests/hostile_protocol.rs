//! Hostile clients of the JSON protocol: garbage, deep nesting, subscription floods, oversized
//! names and messages, and oversized `?channels=` on the upgrade.

mod common;

use common::{
    TestServer, WAIT, assert_still_serves, client_frame, http_exchange, raw_upgrade_json,
    read_until_close, recv_json, send_json, upgrade_request_for,
};
use futures_util::SinkExt as _;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;

/// Sends a raw text frame and returns the reply.
async fn request_text(ws: &mut common::Ws, text: &str) -> Value {
    ws.send(Message::text(text)).await.expect("send");
    recv_json(ws).await
}

/// Asserts the connection is still usable: a subscribe works and a publish arrives.
async fn assert_usable(server: &TestServer, ws: &mut common::Ws, channel: &str) {
    send_json(
        ws,
        json!({"type": "subscribe", "channel": channel, "id": "check"}),
    )
    .await;
    let reply = recv_json(ws).await;
    assert_eq!(
        (&reply["type"], &reply["id"], &reply["channel"]),
        (&json!("subscribed"), &json!("check"), &json!(channel)),
        "{reply}"
    );
    let mut http = server.http().await;
    assert_eq!(
        http.post_json(&format!("/api/publish/{channel}"), "42")
            .await
            .status,
        200
    );
    let message = recv_json(ws).await;
    assert_eq!(message["channel"], channel);
    assert_eq!(message["data"], 42);
}

#[tokio::test]
async fn garbage_json_gets_invalid_json_and_the_connection_stays() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("").await;
    for garbage in [
        "{not json",
        "",
        "null",
        "[1,2,3]",
        "\"just a string\"",
        "{\"type\":\"subscribe\",\"channel\":\"a\"} trailing",
        "{\"type\":\"subscribe\",\"channel\":\"a\"",
        "\u{0}\u{1}\u{2}",
        "{\"type\":\"subscribe\",\"channel\":\"a\",\"channel\":\"b\"}",
    ] {
        let reply = request_text(&mut ws, garbage).await;
        assert_eq!(reply["type"], "error", "{garbage:?}: {reply}");
        assert_eq!(reply["code"], "invalid_json", "{garbage:?}: {reply}");
    }
    // Well-formed JSON that is not a valid request gets the matching code, and the id back.
    let cases = [
        (json!({"id": 1}), "missing_field"),
        (json!({"type": "dance", "id": 2}), "unknown_type"),
        (json!({"type": "subscribe", "id": 3}), "missing_field"),
        (
            json!({"type": "subscribe", "channel": "bad name", "id": 4}),
            "invalid_channel",
        ),
        (
            json!({"type": "subscribe", "channel": 7, "id": 5}),
            "invalid_json",
        ),
        (
            json!({"type": "send", "to": "", "id": 6}),
            "invalid_client_id",
        ),
        (
            json!({"type": "unsubscribe", "channel": "never", "id": 7}),
            "not_subscribed",
        ),
        (
            json!({"type": "send", "to": "nobody-here", "data": 1, "id": 8}),
            "client_not_found",
        ),
    ];
    for (request, code) in cases {
        send_json(&mut ws, request.clone()).await;
        let reply = recv_json(&mut ws).await;
        assert_eq!(reply["type"], "error", "{request}: {reply}");
        assert_eq!(reply["code"], code, "{request}: {reply}");
        if code != "invalid_json" {
            assert_eq!(reply["id"], request["id"], "{request}: {reply}");
        }
    }
    ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
    assert_eq!(recv_json(&mut ws).await["code"], "binary_not_supported");
    assert_usable(&server, &mut ws, "after-garbage").await;
    assert_still_serves(&server).await;
}

/// The next data frame as text, without parsing it.
async fn recv_text(ws: &mut common::Ws) -> String {
    match common::recv(ws).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn json_nested_10000_deep_gets_invalid_json() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("channels=deep").await;
    for depth in [10_000, 127] {
        let deep = nested(depth);
        for text in [
            format!(r#"{{"type":"publish","channel":"deep","id":1,"data":{deep}}}"#),
            format!(r#"{{"type":"send","to":"nobody","id":1,"data":{deep}}}"#),
            format!(r#"{{"type":"publish","channel":"deep","data":{{"a":{deep}}}}}"#),
        ] {
            ws.send(Message::text(text.clone())).await.expect("send");
            let raw = recv_text(&mut ws).await;
            eprintln!(
                "depth {depth} {} -> {}",
                &text[..60],
                &raw[..raw.len().min(80)]
            );
            let reply: Value = serde_json::from_str(&raw).unwrap_or_default();
            assert_eq!(reply["type"], "error", "depth {depth}: {reply}");
            assert_eq!(reply["code"], "invalid_json", "depth {depth}: {reply}");
        }
    }
    // 126 levels of data is the documented limit and is accepted, over WebSocket and HTTP.
    let ok = nested(126);
    ws.send(Message::text(format!(
        r#"{{"type":"publish","channel":"deep","id":1,"data":{ok}}}"#
    )))
    .await
    .expect("send");
    let mut frames = [recv_text(&mut ws).await, recv_text(&mut ws).await];
    frames.sort(); // the reply and the delivery may come in either order
    assert!(
        frames[0].starts_with(r#"{"type":"message","channel":"deep","offset":1,"from":"c-"#)
            && frames[0].ends_with(&format!(r#"","data":{ok}}}"#)),
        "{}",
        frames[0]
    );
    assert_eq!(
        frames[1], r#"{"type":"published","id":1,"channel":"deep","offset":1,"subscribers":1}"#,
        "the refused publishes used no offset"
    );
    let mut http = server.http().await;
    let reply = http.post_json("/api/publish/deep", &ok).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        recv_text(&mut ws).await,
        format!(r#"{{"type":"message","channel":"deep","offset":2,"data":{ok}}}"#)
    );
    let reply = http.post_json("/api/publish/deep", &nested(127)).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"], "invalid_json");
    assert_usable(&server, &mut ws, "after-deep").await;
    assert_still_serves(&server).await;
}

/// 10,000 subscribe requests to distinct channels with the default limit of 128: exactly the
/// first 128 succeed, every other one gets `too_many_subscriptions` with its id, and the
/// connection stays usable. Requests go in batches of 200 (replies count against the
/// connection's 1024-frame queue, so a client must read them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_subscribes_give_exactly_128_subscriptions() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("").await;
    let mut subscribed = Vec::new();
    let mut refused = 0;
    for batch in 0..50 {
        for i in batch * 200..(batch + 1) * 200 {
            ws.feed(Message::text(
                json!({"type": "subscribe", "channel": format!("ch-{i}"), "id": i}).to_string(),
            ))
            .await
            .expect("feed");
        }
        ws.flush().await.expect("flush");
        for i in batch * 200..(batch + 1) * 200 {
            let reply = recv_json(&mut ws).await;
            assert_eq!(reply["id"], i, "replies in request order: {reply}");
            match reply["type"].as_str() {
                Some("subscribed") => {
                    assert_eq!(reply["channel"], format!("ch-{i}"));
                    subscribed.push(i);
                }
                Some("error") => {
                    assert_eq!(reply["code"], "too_many_subscriptions", "{reply}");
                    assert_eq!(reply["message"], "too many subscriptions (limit 128)");
                    refused += 1;
                }
                _ => panic!("unexpected reply {reply}"),
            }
        }
    }
    assert_eq!(subscribed, (0..128).collect::<Vec<_>>());
    assert_eq!(refused, 10_000 - 128);
    // Still usable: subscribed channels deliver, re-subscribing is idempotent, and a slot
    // freed by an unsubscribe can be used again.
    let mut http = server.http().await;
    http.post_json("/api/publish/ch-127", r#""last""#).await;
    let message = recv_json(&mut ws).await;
    assert_eq!(
        (message["channel"].as_str(), message["data"].as_str()),
        (Some("ch-127"), Some("last"))
    );
    send_json(&mut ws, json!({"type": "subscribe", "channel": "ch-0"})).await;
    assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    send_json(&mut ws, json!({"type": "subscribe", "channel": "one-more"})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "too_many_subscriptions");
    send_json(&mut ws, json!({"type": "unsubscribe", "channel": "ch-0"})).await;
    assert_eq!(recv_json(&mut ws).await["type"], "unsubscribed");
    assert_usable(&server, &mut ws, "one-more").await;
    let channels = http.get("/api/channels").await.json();
    assert_eq!(channels["channels"].as_array().map(Vec::len), Some(128));
    assert_still_serves(&server).await;
}

/// A subscribe with a 1 MiB channel name is a message over the 64 KiB limit: close 1009 from
/// the frame header, before the payload is read.
#[tokio::test]
async fn subscribe_with_a_1_mib_channel_name_is_1009() {
    let server = TestServer::default().await;
    let stream = raw_upgrade_json(server.addr, "").await;
    let request = format!(
        r#"{{"type":"subscribe","channel":"{}"}}"#,
        "c".repeat(1024 * 1024)
    );
    let frame = client_frame(0x81, request.as_bytes());
    let (mut reader, mut writer) = stream.into_split();
    // Written concurrently: the server stops reading the payload once it has refused it.
    let writing = tokio::spawn(async move {
        let _ = tokio::time::timeout(WAIT, writer.write_all(&frame)).await;
    });
    let end = read_until_close(&mut reader, WAIT).await;
    writing.abort();
    assert_eq!(end.close_code, Some(1009), "{end:?}");
    assert_eq!(end.close_reason, "message over 65536 bytes");
    assert!(end.frames.is_empty(), "{end:?}");
    assert!(end.tcp_closed);
    // A channel name that fits in a message but breaks the naming rules is an error frame.
    let (mut ws, _) = server.connect_json("").await;
    send_json(
        &mut ws,
        json!({"type": "subscribe", "channel": "c".repeat(60_000), "id": 1}),
    )
    .await;
    let reply = recv_json(&mut ws).await;
    assert_eq!(reply["code"], "invalid_channel", "{reply}");
    assert_usable(&server, &mut ws, "after-long-name").await;
    assert_still_serves(&server).await;
}

/// `?channels=` on the upgrade: over the limits the upgrade is refused before any WebSocket
/// exists. 1 MiB of names overflows hyper's request buffer (its own empty `431`, then close);
/// a 10 KiB target gets our `414 uri_too_long`; 129 valid names get `400
/// too_many_subscriptions`; one 129-byte name gets `400 invalid_channel`.
#[tokio::test]
async fn oversized_channels_query_on_the_upgrade_is_refused() {
    let server = TestServer::default().await;
    let names = |count: usize, len: usize| {
        (0..count)
            .map(|i| format!("{i:0len$}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let huge = names(1024 * 1024 / 33, 32); // 32-byte names and commas: 1 MiB
    assert!(huge.len() >= 1024 * 1024 - 33);
    let reply = http_exchange(
        server.addr,
        upgrade_request_for(&format!("/ws?channels={huge}"), "").into_bytes(),
    )
    .await;
    assert_eq!(reply.status, 431, "{}", reply.head);
    assert_eq!(reply.header("content-length"), Some("0"));
    assert!(reply.closed);

    let long = names(300, 32); // ~10 KiB
    let reply = http_exchange(
        server.addr,
        upgrade_request_for(&format!("/ws?channels={long}"), "").into_bytes(),
    )
    .await;
    assert_eq!(reply.status, 414, "{}", reply.head);
    assert_eq!(reply.json()["error"], "uri_too_long");

    let many = names(129, 8);
    let reply = http_exchange(
        server.addr,
        upgrade_request_for(&format!("/ws?channels={many}"), "").into_bytes(),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.head);
    assert_eq!(reply.json()["error"], "too_many_subscriptions");

    let exactly = names(128, 8);
    let reply = http_exchange(
        server.addr,
        upgrade_request_for(&format!("/ws?channels={exactly}"), "").into_bytes(),
    )
    .await;
    assert_eq!(
        reply.status, 101,
        "128 channels is the limit: {}",
        reply.head
    );

    let reply = http_exchange(
        server.addr,
        upgrade_request_for(&format!("/ws?channels=ok,{}", "x".repeat(129)), "").into_bytes(),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.head);
    assert_eq!(reply.json()["error"], "invalid_channel");
    assert_still_serves(&server).await;
}

/// A message of exactly the limit is handled (here a publish request padded to 65,536 bytes);
/// one byte more is close 1009.
#[tokio::test]
async fn message_at_the_limit_is_fine_and_one_byte_more_is_1009() {
    let server = TestServer::default().await;
    let (mut subscriber, _) = server.connect_json("channels=big").await;
    let (mut ws, _) = server.connect_json("").await;
    let request = |len: usize| {
        let skeleton = r#"{"type":"publish","channel":"big","id":1,"data":""}"#;
        let padding = "p".repeat(len - skeleton.len());
        format!(r#"{{"type":"publish","channel":"big","id":1,"data":"{padding}"}}"#)
    };
    let text = request(65_536);
    assert_eq!(text.len(), 65_536);
    let reply = request_text(&mut ws, &text).await;
    assert_eq!(reply["type"], "published", "{reply}");
    assert_eq!(reply["offset"], 1);
    let message = recv_json(&mut subscriber).await;
    assert_eq!(message["data"].as_str().map(str::len), Some(65_536 - 51));
    ws.send(Message::text(request(65_537))).await.expect("send");
    assert_eq!(
        common::expect_close(&mut ws).await,
        (1009, "message over 65536 bytes".to_owned())
    );
    // The subscriber is unaffected.
    let mut http = server.http().await;
    http.post_json("/api/publish/big", "2").await;
    assert_eq!(recv_json(&mut subscriber).await["offset"], 2);
    assert_still_serves(&server).await;
}

/// The nesting limit exists so that no subscriber's JSON parser is handed a document deeper
/// than common parsers accept: serde_json parses at most 127 levels, and the envelope adds one,
/// so payloads may nest 126 levels and no more.
#[tokio::test]
async fn delivered_envelopes_stay_parseable_by_serde_json() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("channels=deep").await;
    let mut http = server.http().await;
    for depth in [125, 126] {
        let reply = http.post_json("/api/publish/deep", &nested(depth)).await;
        assert_eq!(
            reply.status, 200,
            "depth {depth} is within the documented limit"
        );
        let text = recv_text(&mut ws).await;
        let parsed = serde_json::from_str::<Value>(&text);
        assert!(parsed.is_ok(), "depth {depth}: {:?}", parsed.err());
    }
    let reply = http.post_json("/api/publish/deep", &nested(127)).await;
    assert_eq!(reply.status, 400, "one level more is refused");
}

/// The whole request is depth-checked, not only `data`: a deep `id` would otherwise be echoed
/// back in a reply the client's own parser cannot read, and a deep unknown field carried along.
#[tokio::test]
async fn request_nested_too_deep_anywhere_is_invalid_json() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("channels=deep").await;
    for depth in [10_000, 127] {
        let deep = nested(depth);
        for text in [
            format!(r#"{{"type":"publish","channel":"deep","id":{deep}}}"#),
            format!(r#"{{"type":"subscribe","channel":"deep","id":{{"a":{deep}}}}}"#),
            format!(r#"{{"type":"publish","channel":"deep","extra":{deep}}}"#),
        ] {
            ws.send(Message::text(text)).await.expect("send");
            let raw = recv_text(&mut ws).await;
            let reply: Value = serde_json::from_str(&raw).unwrap_or_else(|err| {
                panic!(
                    "depth {depth}: unparseable reply ({err}): {}",
                    &raw[..raw.len().min(120)]
                )
            });
            assert_eq!(reply["type"], "error", "depth {depth}: {reply}");
            assert_eq!(reply["code"], "invalid_json", "depth {depth}: {reply}");
        }
    }
}
