//! Channel history and recovery in memory mode, over real sockets: positions in welcome and
//! subscribed frames, replays that switch to live messages exactly once under concurrent
//! publishing, replays larger than the queue, the failure reasons, raw clients recovering
//! from the URL, and `/api/history`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::positions::{
    connect_small_buffer, expect_offsets, leave_and_come_back, position, read_until_close,
    spawn_publishers, subscribe,
};
use common::{TestServer, recv, recv_json, send_json};
use herald::Config;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Publishes `count` messages `{"n":..}` to `channel` over one HTTP connection.
async fn publish_many(server: &TestServer, channel: &str, count: usize) {
    let mut http = server.http().await;
    for n in 0..count {
        let reply = http
            .post_json(
                &format!("/api/publish/{channel}"),
                &json!({ "n": n }).to_string(),
            )
            .await;
        assert_eq!(reply.status, 200);
    }
}

#[tokio::test]
async fn welcome_and_subscribed_say_where_each_channel_stands() {
    let server = TestServer::default().await;
    publish_many(&server, "news", 3).await;
    let mut ws = server.connect("/ws?channels=news,quiet").await;
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    let (epoch, offset) = position(&welcome["channels"]["news"]);
    assert_eq!(offset, 3);
    assert_eq!(epoch.len(), 8);
    assert_eq!(position(&welcome["channels"]["quiet"]).1, 0);
    assert!(welcome["channels"]["news"].get("recovered").is_none());

    // The same stream on another connection, and live messages continue the offsets.
    let (mut other, _) = server.connect_json("").await;
    let reply = subscribe(&mut other, "news", None).await;
    assert_eq!(position(&reply), (epoch.clone(), 3));
    publish_many(&server, "news", 1).await;
    for ws in [&mut ws, &mut other] {
        let message = recv_json(ws).await;
        assert_eq!(message["offset"], 4, "{message}");
    }
    // Subscribing again is not an error, and says where the channel stands now.
    let again = subscribe(&mut other, "news", Some((&epoch, 1))).await;
    assert_eq!(position(&again), (epoch, 4));
    assert_eq!(again["recovered"], false);
    assert_eq!(again["reason"], "already_subscribed");
}

#[tokio::test]
async fn subscribe_since_replays_what_was_missed_then_goes_live() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("").await;
    let (epoch, _) = position(&subscribe(&mut ws, "room", None).await);
    publish_many(&server, "room", 5).await;
    expect_offsets(&mut ws, "room", 0, 2).await;
    drop(ws); // the client leaves after offset 2

    let (mut back, _) = server.connect_json("").await;
    let reply = subscribe(&mut back, "room", Some((&epoch, 2))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(position(&reply), (epoch.clone(), 5));
    expect_offsets(&mut back, "room", 2, 5).await;
    publish_many(&server, "room", 1).await;
    expect_offsets(&mut back, "room", 5, 6).await;
    common::expect_silence(&mut back, Duration::from_millis(200)).await;

    // Nothing missed: recovered, nothing replayed.
    let (mut current, _) = server.connect_json("").await;
    let reply = subscribe(&mut current, "room", Some((&epoch, 6))).await;
    assert_eq!(reply["recovered"], true);
    common::expect_silence(&mut current, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn positions_that_cannot_be_recovered_say_why_and_replay_nothing() {
    let server = TestServer::start(Config::default().history_size(3)).await;
    let (mut ws, _) = server.connect_json("").await;
    let (epoch, _) = position(&subscribe(&mut ws, "feed", None).await);
    publish_many(&server, "feed", 10).await;
    expect_offsets(&mut ws, "feed", 0, 10).await;

    for (latest, (since, reason)) in (10..).zip([
        (("zzzzzzzz", 5), "epoch_changed"),
        ((epoch.as_str(), 6), "position_expired"),
        ((epoch.as_str(), 99), "position_ahead"),
    ]) {
        let (mut client, _) = server.connect_json("").await;
        let reply = subscribe(&mut client, "feed", Some(since)).await;
        assert_eq!(reply["recovered"], false, "{reply}");
        assert_eq!(reply["reason"], reason, "{reply}");
        assert_eq!(
            position(&reply),
            (epoch.clone(), latest),
            "where to go on from"
        );
        publish_many(&server, "feed", 1).await;
        let live = recv_json(&mut client).await;
        assert_eq!(live["type"], "message", "no replay, live at once: {live}");
        assert_eq!(recv_json(&mut ws).await["offset"], live["offset"]);
    }
    // Three more publishes: the window holds 11, 12 and 13.
    let (mut edge, _) = server.connect_json("").await;
    let reply = subscribe(&mut edge, "feed", Some((&epoch, 10))).await;
    assert_eq!(
        reply["recovered"], true,
        "the window's first message follows: {reply}"
    );
    expect_offsets(&mut edge, "feed", 10, 13).await;

    let (mut bad, _) = server.connect_json("").await;
    send_json(
        &mut bad,
        json!({"type":"subscribe","channel":"feed","since":{"epoch":"nope","offset":1}}),
    )
    .await;
    let error = recv_json(&mut bad).await;
    assert_eq!(error["code"], "invalid_position", "{error}");
}

/// Clients recovering while two publishers publish at full speed each see every offset
/// exactly once, in order, across the switch from replay to live.
#[tokio::test]
async fn recovery_under_concurrent_publishing_is_exactly_once() {
    const TOTAL: u64 = 4000;
    let server =
        TestServer::start(Config::default().history_size(10_000).queue_capacity(256)).await;
    let (mut first, _) = server.connect_json("").await;
    let (epoch, _) = position(&subscribe(&mut first, "load", None).await);
    let publishers = spawn_publishers(&[server.addr, server.addr], "load", TOTAL / 2);
    // Subscribers that come back at different points while publishing goes on: each reads a
    // little, leaves, and recovers from the last offset it read.
    let mut clients = Vec::new();
    for (delay_ms, leave_after) in [(0, 50), (5, 500), (20, 1500), (40, 3000)] {
        let addr = server.addr;
        let epoch = epoch.clone();
        clients.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            leave_and_come_back(addr, addr, "load", &epoch, leave_after, TOTAL).await;
        }));
    }
    for task in publishers.into_iter().chain(clients) {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("finishes")
            .expect("no assertion failed");
    }
    expect_offsets(&mut first, "load", 0, TOTAL).await;
}

/// A client with a small receive buffer that stops reading is dropped as a slow consumer after
/// far more messages than its queue holds; reconnecting with the last offset it read, it gets
/// everything it missed, streamed through its 64-frame queue.
#[tokio::test]
async fn a_dropped_slow_consumer_comes_back_and_misses_nothing() {
    const TOTAL: u64 = 3000;
    let server = TestServer::start(Config::default().queue_capacity(64).history_size(5000)).await;
    let mut slow = connect_small_buffer(&server, "/ws?channels=ticker").await;
    let welcome = recv_json(&mut slow).await;
    let (epoch, _) = position(&welcome["channels"]["ticker"]);
    let payload = json!("x".repeat(4096)).to_string();
    let mut http = server.http().await;
    let publishing = tokio::spawn(async move {
        for _ in 0..TOTAL {
            let reply = http.post_json("/api/publish/ticker", &payload).await;
            assert_eq!(reply.status, 200);
        }
    });
    // The server waits a bounded time (2 s) for room for the close frame of a consumer it
    // dropped: the client starts reading once it is dropped, not when publishing ends.
    let mut stats = server.http().await;
    common::cluster::eventually("the slow consumer is dropped", async || {
        stats.get("/api/stats").await.json()["slow_consumer_drops"] == 1
    })
    .await;
    // What reached the socket before the drop, then the close.
    let (last, close, _) = read_until_close(&mut slow).await;
    publishing.await.expect("every publish answered");
    assert_eq!(close, 1008, "dropped as a slow consumer");
    assert!(last < TOTAL - 64, "it really missed messages: read {last}");

    let (mut back, _) = server
        .connect_json(&format!("channels=ticker&since=ticker:{epoch}:{last}"))
        .await;
    expect_offsets(&mut back, "ticker", last, TOTAL).await;
    common::expect_silence(&mut back, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn raw_clients_recover_from_the_url_or_are_refused_before_the_upgrade() {
    let server = TestServer::default().await;
    let (mut json_client, _) = server.connect_json("").await;
    let (epoch, _) = position(&subscribe(&mut json_client, "prices", None).await);
    let mut http = server.http().await;
    for body in ["1.5", "\"up\"", "{\"p\":2}"] {
        assert_eq!(
            http.post_json("/api/publish/prices", body).await.status,
            200
        );
    }
    assert_eq!(
        http.request("POST", "/api/publish/prices", &[], &[0xff, 0x00])
            .await
            .status,
        200
    );
    let mut raw = server
        .connect(&format!(
            "/ws?format=raw&channels=prices&since=prices:{epoch}:1"
        ))
        .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(recv(&mut raw).await);
    }
    assert_eq!(
        got[0],
        Message::text("up"),
        "a JSON string arrives as its text"
    );
    assert_eq!(got[1], Message::text("{\"p\":2}"));
    assert_eq!(got[2], Message::binary(vec![0xff, 0x00]));
    assert_eq!(http.post_json("/api/publish/prices", "7").await.status, 200);
    assert_eq!(recv(&mut raw).await, Message::text("7"), "then live");

    for (query, status, code) in [
        (
            "channels=prices&since=prices:zzzzzzzz:1".to_owned(),
            409,
            "epoch_changed",
        ),
        (
            format!("channels=prices&since=prices:{epoch}:99"),
            409,
            "position_ahead",
        ),
        (
            format!("channels=prices&since=other:{epoch}:1"),
            400,
            "invalid_query",
        ),
        (
            format!("channels=prices&since=prices:{epoch}"),
            400,
            "invalid_query",
        ),
        (
            format!("channels=prices&since=prices:{epoch}:-1"),
            400,
            "invalid_query",
        ),
        (
            format!("channels=prices&since=prices:{epoch}:1,prices:{epoch}:2"),
            400,
            "invalid_query",
        ),
    ] {
        let request = common::upgrade_request_for(&format!("/ws?format=raw&{query}"), "");
        let (got_status, reply) = common::raw_exchange(server.addr, request.as_bytes()).await;
        assert_eq!(got_status, status, "{query}: {reply}");
        assert!(reply.contains(code), "{query}: {reply}");
    }
}

#[tokio::test]
async fn a_restarted_server_is_a_new_epoch() {
    let server = TestServer::default().await;
    let (mut ws, _) = server.connect_json("").await;
    let (epoch, _) = position(&subscribe(&mut ws, "news", None).await);
    publish_many(&server, "news", 2).await;
    drop(ws);
    server.shutdown().await.expect("clean shutdown");

    let restarted = TestServer::default().await;
    let (mut ws, _) = restarted.connect_json("").await;
    let reply = subscribe(&mut ws, "news", Some((&epoch, 2))).await;
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["reason"], "epoch_changed");
    assert_ne!(reply["epoch"], epoch.as_str());
    assert_eq!(reply["offset"], 0, "offsets start again in the new epoch");
}

#[tokio::test]
async fn history_api_pages_through_stored_messages() {
    let server = TestServer::start(Config::default().history_size(5)).await;
    let mut http = server.http().await;
    let empty = http.get("/api/history/news").await;
    assert_eq!(empty.status, 200);
    let empty = empty.json();
    let epoch = empty["epoch"].as_str().unwrap().to_owned();
    assert_eq!(empty["messages"], json!([]));
    assert_eq!(empty["offset"], 0);

    for body in ["{\"a\":1}", "[2]"] {
        assert_eq!(http.post_json("/api/publish/news", body).await.status, 200);
    }
    assert_eq!(
        http.request("POST", "/api/publish/news", &[], b"plain text")
            .await
            .status,
        200
    );
    assert_eq!(
        http.request("POST", "/api/publish/news", &[], &[0xfe])
            .await
            .status,
        200
    );
    let (mut client, _) = server.connect_json("client_id=carol").await;
    send_json(
        &mut client,
        json!({"type":"publish","channel":"news","data":{"from":"a client"}}),
    )
    .await;
    assert_eq!(recv_json(&mut client).await["type"], "published");

    let all = http.get("/api/history/news").await.json();
    assert_eq!(
        all,
        json!({"channel":"news","epoch":epoch,"offset":5,"messages":[
            {"offset":1,"data":{"a":1}},
            {"offset":2,"data":[2]},
            {"offset":3,"data":"plain text"},
            {"offset":4,"data_b64":"/g=="},
            {"offset":5,"from":"carol","data":{"from":"a client"}},
        ]})
    );
    let page = http
        .get(&format!("/api/history/news?since=2&epoch={epoch}&limit=2"))
        .await
        .json();
    let offsets: Vec<_> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [3, 4]);
    let newest = http.get("/api/history/news?limit=2").await.json();
    assert_eq!(
        newest["messages"][0]["offset"], 4,
        "without since: the newest, oldest first"
    );

    // Two more: offsets 1 and 2 leave the five-message window.
    publish_many(&server, "news", 2).await;
    let expired = http
        .get(&format!("/api/history/news?since=1&epoch={epoch}"))
        .await;
    assert_eq!(expired.status, 409);
    assert_eq!(
        expired.json(),
        json!({"error":"position_expired","channel":"news","epoch":epoch,"offset":7,
               "message":expired.json()["message"]})
    );
    let other_epoch = http.get("/api/history/news?since=1&epoch=abcdefgh").await;
    assert_eq!(other_epoch.status, 409);
    assert_eq!(other_epoch.json()["error"], "epoch_changed");
    for bad in [
        "/api/history/news?since=1",
        "/api/history/news?limit=0",
        "/api/history/news?limit=1001",
        "/api/history/news?since=x&epoch=abcdefgh",
        "/api/history/news?page=2",
        "/api/history/bad%20name",
    ] {
        let reply = http.get(bad).await;
        assert_eq!(reply.status, 400, "{bad}");
    }
    let keyed = TestServer::start(Config::default().api_keys(vec!["k".into()])).await;
    assert_eq!(
        keyed.http().await.get("/api/history/news").await.status,
        401
    );
}

#[tokio::test]
async fn history_forgets_messages_past_the_ttl() {
    let server = TestServer::start(
        Config::default()
            .history_ttl(Duration::from_secs(60))
            .ping_interval(Duration::from_secs(3600))
            .idle_timeout(Duration::from_secs(7200)),
    )
    .await;
    publish_many(&server, "news", 2).await;
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(30)).await;
    publish_many(&server, "news", 1).await;
    tokio::time::advance(Duration::from_secs(31)).await;
    let mut http = server.http().await;
    let history = http.get("/api/history/news").await.json();
    let offsets: Vec<_> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [3], "the first two are older than the ttl");
    let epoch = history["epoch"].as_str().unwrap().to_owned();
    let (mut ws, _) = server.connect_json("").await;
    let reply = subscribe(&mut ws, "news", Some((&epoch, 1))).await;
    assert_eq!(reply["reason"], "position_expired");
    let reply = subscribe(&mut ws, "other", None).await;
    assert_eq!(reply["offset"], 0);
}

#[tokio::test]
async fn history_memory_is_capped_node_wide_oldest_first() {
    // Each stored 1 KiB message costs a little over 1 KiB: 64 KiB hold about 60.
    let server = TestServer::start(
        Config::default()
            .history_size(1000)
            .history_memory(64 * 1024),
    )
    .await;
    let body = json!("y".repeat(1024)).to_string();
    let mut http = server.http().await;
    for channel in ["old", "new"] {
        for _ in 0..100 {
            assert_eq!(
                http.post_json(&format!("/api/publish/{channel}"), &body)
                    .await
                    .status,
                200
            );
        }
    }
    let old = http.get("/api/history/old?limit=1000").await.json();
    let new = http.get("/api/history/new?limit=1000").await.json();
    let kept = |page: &Value| page["messages"].as_array().unwrap().len();
    assert_eq!(kept(&old), 0, "the older channel's messages went first");
    assert!(
        (40..=64).contains(&kept(&new)),
        "the newest fit the budget: {}",
        kept(&new)
    );
    let offsets: HashSet<u64> = new["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert!(offsets.contains(&100), "the newest stays");
}

/// A client that stops reading in the middle of a replay while the window moves on past what
/// it still has to get is closed with 4002, not handed a replay with a hole in it.
#[tokio::test]
async fn a_replay_the_window_overtakes_is_closed_with_4002() {
    let server = TestServer::start(Config::default().queue_capacity(16).history_size(300)).await;
    let (mut first, _) = server.connect_json("").await;
    let (epoch, _) = position(&subscribe(&mut first, "fast", None).await);
    drop(first);
    // 300 messages of 60 KB: more than the kernel's socket buffers take, so the replay has to
    // wait for the client.
    let body = json!("z".repeat(60_000)).to_string();
    let mut http = server.http().await;
    for _ in 0..300 {
        assert_eq!(http.post_json("/api/publish/fast", &body).await.status, 200);
    }
    let mut slow =
        connect_small_buffer(&server, &format!("/ws?channels=fast&since=fast:{epoch}:0")).await;
    // The replay starts; the client reads nothing while 600 more messages push its place out
    // of the 300-message window.
    for _ in 0..600 {
        assert_eq!(http.post_json("/api/publish/fast", &body).await.status, 200);
    }
    let (last, code, reason) = read_until_close(&mut slow).await;
    assert_eq!((code, reason.as_str()), (4002, "recovery failed"));
    assert!(last < 900, "read {last}");
}

/// A replay goes on one frame at a time through the smallest queue there is.
#[tokio::test]
async fn a_replay_streams_through_a_one_frame_queue() {
    let server = TestServer::start(Config::default().queue_capacity(1)).await;
    publish_many(&server, "tiny", 5).await;
    let epoch = server.http().await.get("/api/history/tiny").await.json()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut raw = server
        .connect(&format!(
            "/ws?format=raw&channels=tiny&since=tiny:{epoch}:0"
        ))
        .await;
    for n in 0..5 {
        assert_eq!(
            recv(&mut raw).await,
            Message::text(json!({ "n": n }).to_string())
        );
    }
    let (mut ws, _) = server.connect_json("").await;
    let reply = subscribe(&mut ws, "tiny", Some((&epoch, 2))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    expect_offsets(&mut ws, "tiny", 2, 5).await;
}
