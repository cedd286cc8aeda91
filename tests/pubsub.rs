//! Channels end to end: subscribing, publishing over HTTP and from clients, offsets, direct
//! sends, broadcasts, raw delivery and error frames.

mod common;

use std::time::Duration;

use common::{TestServer, expect_silence, recv, recv_json, send_json};
use futures_util::SinkExt as _;
use herald::Config;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn http_publish_reaches_every_subscriber_of_the_channel_only() {
    let server = TestServer::default().await;
    let (mut a, _) = server.connect_json("channels=news").await;
    let (mut b, _) = server.connect_json("channels=news,sports").await;
    let (mut other, _) = server.connect_json("channels=sports").await;
    let mut http = server.http().await;

    let reply = http
        .post_json("/api/publish/news", r#"{"title":"hi"}"#)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json(),
        json!({"channel":"news","offset":1,"subscribers":2})
    );

    for ws in [&mut a, &mut b] {
        let message = recv_json(ws).await;
        assert_eq!(
            message,
            json!({"type":"message","channel":"news","offset":1,"data":{"title":"hi"}})
        );
    }
    expect_silence(&mut other, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn bodies_are_delivered_as_json_text_or_base64() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("channels=c").await;
    let mut http = server.http().await;
    http.request(
        "POST",
        "/api/publish/c",
        &[("content-type", "text/plain")],
        "plain \"text\"".as_bytes(),
    )
    .await;
    http.request("POST", "/api/publish/c", &[], &[0xff, 0x00, 0x01])
        .await;
    http.request(
        "POST",
        "/api/publish/c",
        &[("content-type", "application/vnd.x+json; charset=utf-8")],
        b"[1, 2]",
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["data"], "plain \"text\"");
    let binary = recv_json(&mut ws).await;
    assert_eq!(binary["data_b64"], "/wAB");
    assert!(binary.get("data").is_none());
    assert_eq!(recv_json(&mut ws).await["data"], json!([1, 2]));
}

#[tokio::test]
async fn offsets_are_contiguous_and_ordered_across_many_publishes() {
    let server = TestServer::default().await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(server.connect_json("channels=seq").await.0);
    }
    // Two publishers at once: offsets must still reach every subscriber in order, no gaps.
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut http = common::HttpClient::connect(addr).await;
                for i in 0..200 {
                    let reply = http
                        .post_json("/api/publish/seq", &format!(r#"{{"p":{p},"i":{i}}}"#))
                        .await;
                    assert_eq!(reply.status, 200);
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    for ws in &mut clients {
        let mut last_by_publisher = [-1i64; 2];
        for expected in 1..=400u64 {
            let message = recv_json(ws).await;
            assert_eq!(message["offset"], expected);
            let p = message["data"]["p"].as_u64().unwrap() as usize;
            let i = message["data"]["i"].as_i64().unwrap();
            assert_eq!(
                i,
                last_by_publisher[p] + 1,
                "each publisher's messages in order"
            );
            last_by_publisher[p] = i;
        }
    }
}

#[tokio::test]
async fn subscribe_publish_and_unsubscribe_over_the_socket() {
    let server = TestServer::default().await;
    let (mut alice, alice_id) = server.connect_json("client_id=alice").await;
    assert_eq!(alice_id, "alice");
    let (mut bob, _) = server.connect_json("client_id=bob").await;
    let mut epochs = Vec::new();
    for ws in [&mut alice, &mut bob] {
        send_json(
            ws,
            json!({"type":"subscribe","channel":"room:lobby","id":1}),
        )
        .await;
        let mut reply = recv_json(ws).await;
        let epoch = reply["epoch"].take();
        assert_eq!(epoch.as_str().map(str::len), Some(8), "{epoch}");
        epochs.push(epoch);
        assert_eq!(
            reply,
            json!({"type":"subscribed","id":1,"channel":"room:lobby","epoch":null,"offset":0})
        );
    }
    assert_eq!(epochs[0], epochs[1], "one stream, one epoch");

    send_json(
        &mut alice,
        json!({"type":"publish","channel":"room:lobby","data":{"text":"hello"},"id":"p1"}),
    )
    .await;
    let mut got_ack = false;
    let mut got_message = false;
    for _ in 0..2 {
        let frame = recv_json(&mut alice).await;
        match frame["type"].as_str() {
            Some("published") => {
                assert_eq!(
                    frame,
                    json!({"type":"published","id":"p1","channel":"room:lobby","offset":1,"subscribers":2})
                );
                got_ack = true;
            }
            Some("message") => {
                assert_eq!(frame["from"], "alice", "the sender gets its own message");
                got_message = true;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert!(got_ack && got_message);
    assert_eq!(
        recv_json(&mut bob).await,
        json!({"type":"message","channel":"room:lobby","offset":1,"from":"alice","data":{"text":"hello"}})
    );

    send_json(
        &mut bob,
        json!({"type":"unsubscribe","channel":"room:lobby"}),
    )
    .await;
    assert_eq!(
        recv_json(&mut bob).await,
        json!({"type":"unsubscribed","channel":"room:lobby"})
    );
    send_json(
        &mut bob,
        json!({"type":"unsubscribe","channel":"room:lobby"}),
    )
    .await;
    assert_eq!(recv_json(&mut bob).await["code"], "not_subscribed");
    let mut http = server.http().await;
    let reply = http.post_json("/api/publish/room:lobby", "2").await;
    assert_eq!(reply.json()["subscribers"], 1);
    assert_eq!(recv_json(&mut alice).await["offset"], 2);
    expect_silence(&mut bob, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn direct_send_reaches_every_connection_of_the_client_id() {
    let server = TestServer::default().await;
    let (mut phone, _) = server.connect_json("client_id=carol").await;
    let (mut laptop, _) = server.connect_json("client_id=carol").await;
    let (mut dave, _) = server.connect_json("client_id=dave").await;
    let mut http = server.http().await;

    let reply = http.post_json("/api/send/carol", r#"{"n":1}"#).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"client_id":"carol","connections":2}));
    for ws in [&mut phone, &mut laptop] {
        assert_eq!(recv_json(ws).await, json!({"type":"direct","data":{"n":1}}));
    }

    send_json(
        &mut dave,
        json!({"type":"send","to":"carol","data":"psst","id":9}),
    )
    .await;
    assert_eq!(
        recv_json(&mut dave).await,
        json!({"type":"sent","id":9,"to":"carol","connections":2})
    );
    for ws in [&mut phone, &mut laptop] {
        assert_eq!(
            recv_json(ws).await,
            json!({"type":"direct","from":"dave","data":"psst"})
        );
    }

    let missing = http.post_json("/api/send/nobody", "1").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "client_not_found");
    send_json(&mut dave, json!({"type":"send","to":"nobody","data":1})).await;
    assert_eq!(recv_json(&mut dave).await["code"], "client_not_found");
}

#[tokio::test]
async fn broadcast_reaches_every_connection() {
    let server = TestServer::default().await;
    let (mut a, _) = server.connect_json("").await;
    let (mut b, _) = server.connect_json("channels=x").await;
    let mut http = server.http().await;
    let reply = http
        .post_json("/api/broadcast", r#"{"maintenance":true}"#)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["connections"], 2);
    for ws in [&mut a, &mut b] {
        assert_eq!(
            recv_json(ws).await,
            json!({"type":"broadcast","data":{"maintenance":true}})
        );
    }
}

#[tokio::test]
async fn raw_format_delivers_payload_bytes_unchanged() {
    let server = TestServer::default().await;
    let mut raw = server.connect("/ws?channels=bin&format=raw").await;
    let mut http = server.http().await;
    let payload = [0u8, 159, 146, 150, 255];
    http.request("POST", "/api/publish/bin", &[], &payload)
        .await;
    http.request(
        "POST",
        "/api/publish/bin",
        &[("content-type", "application/json")],
        br#"{"a":1}"#,
    )
    .await;
    assert_eq!(recv(&mut raw).await, Message::binary(payload.to_vec()));
    assert_eq!(recv(&mut raw).await, Message::text(r#"{"a":1}"#));

    let rejected = http.get("/ws?format=raw&channels=a,b").await;
    assert_eq!(rejected.status, 400, "raw needs exactly one channel");
    raw.send(Message::text("hi")).await.expect("send");
    let (code, _) = common::expect_close(&mut raw).await;
    assert_eq!(code, 1003, "raw connections are receive-only");
}

/// A raw subscriber gets a JSON string as its text, however it was published, and any other
/// JSON value as JSON text; the same for direct sends and broadcasts.
#[tokio::test]
async fn raw_subscribers_get_json_strings_as_their_text() {
    let server = TestServer::default().await;
    let mut raw = server
        .connect("/ws?channels=t&format=raw&client_id=r")
        .await;
    let (mut publisher, _) = server.connect_json("client_id=p").await;
    let mut http = server.http().await;
    let text_body = http
        .request(
            "POST",
            "/api/publish/t",
            &[("content-type", "text/plain")],
            b"hi",
        )
        .await;
    assert_eq!(text_body.status, 200);
    assert_eq!(recv(&mut raw).await, Message::text("hi"));
    let json_string = http.post_json("/api/publish/t", r#" "hi \"you\"" "#).await;
    assert_eq!(json_string.status, 200);
    assert_eq!(recv(&mut raw).await, Message::text(r#"hi "you""#));
    for (data, expected) in [
        (json!("line\nbreak \u{e9}"), "line\nbreak \u{e9}"),
        (json!({"a": "b"}), r#"{"a":"b"}"#),
        (json!(["x", 1]), r#"["x",1]"#),
        (json!(7), "7"),
        (json!(null), "null"),
    ] {
        send_json(
            &mut publisher,
            json!({"type":"publish","channel":"t","data":data}),
        )
        .await;
        assert_eq!(recv_json(&mut publisher).await["type"], "published");
        assert_eq!(recv(&mut raw).await, Message::text(expected), "for {data}");
    }
    // The escapes reach the raw subscriber decoded, not as the JSON escapes the client wrote.
    publisher
        .send(Message::text(
            r#"{"type":"publish","channel":"t","data":"tab\t\u00e9\ud83d\ude00"}"#,
        ))
        .await
        .expect("send");
    assert_eq!(recv_json(&mut publisher).await["type"], "published");
    assert_eq!(recv(&mut raw).await, Message::text("tab\t\u{e9}\u{1f600}"));
    send_json(
        &mut publisher,
        json!({"type":"send","to":"r","data":"direct \"d\""}),
    )
    .await;
    assert_eq!(recv_json(&mut publisher).await["type"], "sent");
    assert_eq!(recv(&mut raw).await, Message::text(r#"direct "d""#));
    let broadcast = http.post_json("/api/broadcast", r#""to all""#).await;
    assert_eq!(broadcast.status, 200);
    assert_eq!(recv(&mut raw).await, Message::text("to all"));
    let sent = http.post_json("/api/send/r", r#"{"k":"v"}"#).await;
    assert_eq!(sent.status, 200);
    assert_eq!(recv(&mut raw).await, Message::text(r#"{"k":"v"}"#));
}

/// `publish` and `send` without `data` are refused (nothing is delivered); `"data":null` is
/// a payload like any other.
#[tokio::test]
async fn publish_and_send_need_data_and_null_is_data() {
    let server = TestServer::default().await;
    let (mut subscriber, _) = server.connect_json("channels=c&client_id=sub").await;
    let (mut publisher, _) = server.connect_json("client_id=pub").await;
    for request in [
        json!({"type":"publish","channel":"c","id":1}),
        json!({"type":"send","to":"sub","id":2}),
    ] {
        send_json(&mut publisher, request.clone()).await;
        let error = recv_json(&mut publisher).await;
        assert_eq!(error["type"], "error", "{request}");
        assert_eq!(error["code"], "missing_field", "{request}");
        assert_eq!(error["id"], request["id"], "{request}");
        assert_eq!(error["message"], "missing field `data`", "{request}");
    }
    send_json(
        &mut publisher,
        json!({"type":"publish","channel":"c","data":null,"id":3}),
    )
    .await;
    assert_eq!(
        recv_json(&mut publisher).await,
        json!({"type":"published","id":3,"channel":"c","offset":1,"subscribers":1})
    );
    send_json(
        &mut publisher,
        json!({"type":"send","to":"sub","data":null,"id":4}),
    )
    .await;
    assert_eq!(recv_json(&mut publisher).await["type"], "sent");
    // The refused requests came first: had either reached the subscriber, it would be here
    // before these (and the publish would not have offset 1).
    assert_eq!(
        recv_json(&mut subscriber).await,
        json!({"type":"message","channel":"c","offset":1,"from":"pub","data":null})
    );
    assert_eq!(
        recv_json(&mut subscriber).await,
        json!({"type":"direct","from":"pub","data":null})
    );
}

#[tokio::test]
async fn bad_requests_get_error_frames_and_the_connection_stays_open() {
    let server = TestServer::start(Config::default().max_subscriptions(2)).await;
    let (mut ws, _) = server.connect_json("").await;
    let cases = [
        ("not json", "invalid_json"),
        (r#"{"type":"fly","id":7}"#, "unknown_type"),
        (r#"{"type":"subscribe"}"#, "missing_field"),
        (
            r#"{"type":"subscribe","channel":"has space"}"#,
            "invalid_channel",
        ),
        (
            r#"{"type":"send","to":"x y","data":1}"#,
            "invalid_client_id",
        ),
    ];
    for (text, code) in cases {
        ws.send(Message::text(text)).await.expect("send");
        let error = recv_json(&mut ws).await;
        assert_eq!(error["type"], "error");
        assert_eq!(error["code"], code, "for {text}");
    }
    ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
    assert_eq!(recv_json(&mut ws).await["code"], "binary_not_supported");
    for channel in ["a", "b"] {
        send_json(&mut ws, json!({"type":"subscribe","channel":channel})).await;
        assert_eq!(recv_json(&mut ws).await["type"], "subscribed");
    }
    send_json(&mut ws, json!({"type":"subscribe","channel":"c","id":3})).await;
    let error = recv_json(&mut ws).await;
    assert_eq!(error["code"], "too_many_subscriptions");
    assert_eq!(error["id"], 3);
    // Still serving.
    let mut http = server.http().await;
    http.post_json("/api/publish/a", "1").await;
    assert_eq!(recv_json(&mut ws).await["channel"], "a");
}

#[tokio::test]
async fn channel_listing_counts_subscribers() {
    let server = TestServer::default().await;
    let (_a, _) = server.connect_json("channels=news,alerts").await;
    let (_b, _) = server.connect_json("channels=news").await;
    let mut http = server.http().await;
    let reply = http.get("/api/channels").await;
    assert_eq!(
        reply.json(),
        json!({"channels":[{"name":"alerts","subscribers":1},{"name":"news","subscribers":2}]})
    );
}
