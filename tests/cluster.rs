//! Cluster mode end to end: several real Herald nodes sharing channels through a real
//! `redis-server` (started here on a free port; the tests skip with a loud notice when it is
//! not installed, unless `HERALD_REQUIRE_REDIS=1`). Every wait polls a condition with a
//! deadline; nothing asserts on timing.

mod common;

use std::time::Duration;

use common::cluster::{eventually, node, readyz, recv_message, wait_numsub, wait_ready};
use common::redis_server::{RedisServer, available, free_port};
use common::{TestServer, expect_silence, metric, recv_json, send_json};
use futures_util::SinkExt as _;
use herald::Config;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Three ready nodes sharing `redis`.
async fn three_nodes(redis: &RedisServer) -> (TestServer, TestServer, TestServer) {
    let nodes = (
        node(&redis.url()).await,
        node(&redis.url()).await,
        node(&redis.url()).await,
    );
    wait_ready(&[&nodes.0, &nodes.1, &nodes.2]).await;
    nodes
}

#[tokio::test]
async fn publishes_reach_every_node_once_with_the_same_offsets_in_one_order() {
    let Some(redis) = RedisServer::start("cluster publish") else {
        return;
    };
    let (a, b, c) = three_nodes(&redis).await;
    let (mut b1, _) = b.connect_json("channels=news").await;
    let (mut b2, _) = b.connect_json("channels=news").await;
    let (mut c1, _) = c.connect_json("channels=news").await;
    wait_numsub(&redis, "herald:{news}:messages", 2).await;

    // HTTP publishes on A, which has no subscriber of its own.
    let mut http = a.http().await;
    for n in 1..=50u64 {
        let reply = http
            .post_json("/api/publish/news", &json!({"n": n}).to_string())
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json(), json!({"channel":"news","offset":n,"nodes":2}));
    }
    for ws in [&mut b1, &mut b2, &mut c1] {
        for n in 1..=50u64 {
            assert_eq!(
                recv_json(ws).await,
                json!({"type":"message","channel":"news","offset":n,"data":{"n":n}})
            );
        }
    }

    // A client publish over WebSocket on A.
    let (mut publisher, publisher_id) = a.connect_json("").await;
    send_json(
        &mut publisher,
        json!({"type":"publish","channel":"news","data":"hi","id":1}),
    )
    .await;
    assert_eq!(
        recv_json(&mut publisher).await,
        json!({"type":"published","id":1,"channel":"news","offset":51,"nodes":2})
    );
    for ws in [&mut b1, &mut b2, &mut c1] {
        assert_eq!(
            recv_json(ws).await,
            json!({"type":"message","channel":"news","offset":51,"from":publisher_id,"data":"hi"})
        );
    }

    // Concurrent publishers on two nodes: every subscriber sees one and the same order.
    let mut tasks = Vec::new();
    for (server, tag) in [(&a, "a"), (&b, "b")] {
        let mut http = server.http().await;
        tasks.push(tokio::spawn(async move {
            for n in 0..20 {
                let body = json!({"from": tag, "n": n}).to_string();
                let reply = http.post_json("/api/publish/news", &body).await;
                assert_eq!(reply.status, 200);
            }
        }));
    }
    for task in tasks {
        task.await.expect("publisher task");
    }
    let mut sequences = Vec::new();
    for ws in [&mut b1, &mut b2, &mut c1] {
        let mut sequence = Vec::new();
        for offset in 52..=91u64 {
            let message = recv_json(ws).await;
            assert_eq!(message["offset"], offset, "offsets are consecutive");
            sequence.push(message["data"].clone());
        }
        sequences.push(sequence);
    }
    assert!(sequences.windows(2).all(|pair| pair[0] == pair[1]));
    for ws in [&mut b1, &mut b2, &mut c1] {
        expect_silence(ws, Duration::from_millis(200)).await;
    }

    // The stream lives in Redis, and expires (5 minutes after the last publish); its history
    // holds the last 100 messages.
    let counter = redis
        .command(&["HGET", "herald:{news}:stream", "offset"])
        .expect("redis answers");
    assert!(counter.ends_with("91\r\n"), "{counter:?}");
    let kept = redis
        .command(&["LLEN", "herald:{news}:history"])
        .expect("redis answers");
    assert_eq!(kept.trim(), ":91", "{kept:?}");
    let ttl = redis
        .command(&["PTTL", "herald:{news}:stream"])
        .expect("redis answers");
    let ttl: i64 = ttl
        .trim()
        .trim_start_matches(':')
        .parse()
        .expect("PTTL is a number");
    assert!((1..=300_000).contains(&ttl), "offset counter TTL {ttl} ms");
}

#[tokio::test]
async fn direct_sends_and_broadcasts_cross_nodes() {
    let Some(redis) = RedisServer::start("cluster direct") else {
        return;
    };
    let (a, b, c) = three_nodes(&redis).await;
    let (mut alice_b, _) = b.connect_json("client_id=alice").await;
    let (mut alice_c, _) = c.connect_json("client_id=alice").await;
    let (mut sender, sender_id) = a.connect_json("").await;
    wait_numsub(&redis, "herald:client:alice", 2).await;

    let mut http = a.http().await;
    let reply = http.post_json("/api/send/alice", r#"{"x":1}"#).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"client_id":"alice","nodes":2}));
    for ws in [&mut alice_b, &mut alice_c] {
        assert_eq!(recv_json(ws).await, json!({"type":"direct","data":{"x":1}}));
    }

    let reply = http.post_json("/api/send/nobody", "1").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"], "client_not_found");

    send_json(
        &mut sender,
        json!({"type":"send","to":"alice","data":"psst","id":"s"}),
    )
    .await;
    assert_eq!(
        recv_json(&mut sender).await,
        json!({"type":"sent","id":"s","to":"alice","nodes":2})
    );
    for ws in [&mut alice_b, &mut alice_c] {
        assert_eq!(
            recv_json(ws).await,
            json!({"type":"direct","from":sender_id,"data":"psst"})
        );
    }

    let reply = http.post_json("/api/broadcast", r#""all""#).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"nodes":3}));
    for ws in [&mut alice_b, &mut alice_c, &mut sender] {
        assert_eq!(
            recv_json(ws).await,
            json!({"type":"broadcast","data":"all"})
        );
    }
}

#[tokio::test]
async fn a_node_subscribes_in_redis_only_while_it_has_local_subscribers() {
    let Some(redis) = RedisServer::start("cluster unsubscribe") else {
        return;
    };
    let a = node(&redis.url()).await;
    wait_ready(&[&a]).await;
    let channels = |pattern: &str| redis.pubsub_channels(pattern);
    assert!(
        channels("herald:{*}:messages").is_empty(),
        "no channel without subscribers"
    );

    let (mut first, _) = a.connect_json("channels=temp").await;
    let (mut second, _) = a.connect_json("").await;
    send_json(&mut second, json!({"type":"subscribe","channel":"temp"})).await;
    recv_json(&mut second).await;
    wait_numsub(&redis, "herald:{temp}:messages", 1).await;

    // One of two subscribers leaves: still subscribed. A marker channel subscribed after it
    // shows that the node has handled the change.
    send_json(&mut first, json!({"type":"unsubscribe","channel":"temp"})).await;
    recv_json(&mut first).await;
    send_json(&mut first, json!({"type":"subscribe","channel":"marker"})).await;
    recv_json(&mut first).await;
    wait_numsub(&redis, "herald:{marker}:messages", 1).await;
    assert_eq!(redis.numsub("herald:{temp}:messages"), Some(1));

    // The last one leaves by unsubscribing, the marker's by disconnecting.
    send_json(&mut second, json!({"type":"unsubscribe","channel":"temp"})).await;
    recv_json(&mut second).await;
    wait_numsub(&redis, "herald:{temp}:messages", 0).await;
    first.send(Message::Close(None)).await.expect("close");
    wait_numsub(&redis, "herald:{marker}:messages", 0).await;
    assert!(
        channels("herald:{*}:messages").is_empty(),
        "{:?}",
        channels("*")
    );
    assert_eq!(channels("herald:broadcast"), ["herald:broadcast"]);

    // A client id's direct-send route lives as long as its last connection.
    let (mut bob, _) = a.connect_json("client_id=bob").await;
    wait_numsub(&redis, "herald:client:bob", 1).await;
    bob.send(Message::Close(None)).await.expect("close");
    wait_numsub(&redis, "herald:client:bob", 0).await;
}

#[tokio::test]
async fn a_channel_left_and_joined_at_once_is_never_reported_heard_while_unsubscribing() {
    let Some(redis) = RedisServer::start("cluster leave and join") else {
        return;
    };
    let a = node(&redis.url()).await;
    let b = node(&redis.url()).await;
    wait_ready(&[&a, &b]).await;
    let (mut first, _) = b.connect_json("channels=x").await;
    let (mut second, _) = b.connect_json("").await;
    let mut http = a.http().await;
    // The last subscriber leaves and another joins right after: the node's UNSUBSCRIBE may be
    // under way when the second `subscribe` arrives, and its reply must wait for the new
    // SUBSCRIBE, or the publish after it reaches no node.
    for i in 0..200 {
        let (leaver, joiner) = if i % 2 == 0 {
            (&mut first, &mut second)
        } else {
            (&mut second, &mut first)
        };
        send_json(leaver, json!({"type":"unsubscribe","channel":"x"})).await;
        assert_eq!(recv_json(leaver).await["type"], "unsubscribed");
        send_json(joiner, json!({"type":"subscribe","channel":"x"})).await;
        assert_eq!(recv_json(joiner).await["type"], "subscribed");
        let reply = http.post_json("/api/publish/x", &i.to_string()).await;
        assert_eq!(
            reply.json()["nodes"],
            1,
            "round {i}: the publish reached no node"
        );
        assert_eq!(recv_message(joiner).await["data"], i);
    }
}

#[tokio::test]
async fn an_undecodable_message_in_redis_is_announced_as_a_gap() {
    let Some(redis) = RedisServer::start("cluster garbage") else {
        return;
    };
    let a = node(&redis.url()).await;
    wait_ready(&[&a]).await;
    let (mut subscriber, _) = a.connect_json("channels=news").await;
    wait_numsub(&redis, "herald:{news}:messages", 1).await;
    let published = redis.command(&["PUBLISH", "herald:{news}:messages", "not a herald message"]);
    assert_eq!(published.as_deref(), Some(":1\r\n"));
    let gap = recv_json(&mut subscriber).await;
    assert_eq!(
        (gap["type"].as_str(), gap["channel"].as_str()),
        (Some("gap"), Some("news"))
    );
    let reply = a.http().await.post_json("/api/publish/news", "1").await;
    assert_eq!(reply.status, 200, "still serving");
    assert_eq!(recv_message(&mut subscriber).await["data"], 1);
}

#[tokio::test]
async fn a_node_started_without_redis_serves_locally_and_turns_ready_when_it_comes() {
    if !available("cluster redis down at start") {
        return;
    }
    let port = free_port();
    let a = node(&format!("redis://127.0.0.1:{port}/")).await;
    let reply = a.http().await.get("/readyz").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"], "broker_unavailable");
    let reply = a.http().await.post_json("/api/publish/news", "1").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"], "broker_unavailable");
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(a.http().await.get("/healthz").await.status, 200);
    let (mut subscriber, _) = a.connect_json("channels=news").await;

    let redis = RedisServer::start_on(port);
    wait_ready(&[&a]).await;
    wait_numsub(&redis, "herald:{news}:messages", 1).await;
    let reply = a.http().await.post_json("/api/publish/news", "2").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        recv_message(&mut subscriber).await,
        json!({"type":"message","channel":"news","offset":1,"data":2})
    );
}

#[tokio::test]
async fn redis_dying_mid_stream_is_refused_announced_and_recovered() {
    let Some(mut redis) = RedisServer::start("cluster redis dies") else {
        return;
    };
    let (a, b) = (node(&redis.url()).await, node(&redis.url()).await);
    wait_ready(&[&a, &b]).await;
    let (mut live, _) = b.connect_json("channels=live,other").await;
    let (mut client_b, _) = b.connect_json("").await;
    wait_numsub(&redis, "herald:{live}:messages", 1).await;
    let mut http = a.http().await;
    for n in 1..=5u64 {
        assert_eq!(
            http.post_json("/api/publish/live", &n.to_string())
                .await
                .status,
            200
        );
        assert_eq!(recv_json(&mut live).await["offset"], n);
    }

    redis.kill();
    eventually("node A notices", async || readyz(&a).await == 503).await;
    eventually("node B notices", async || readyz(&b).await == 503).await;
    let reply = a.http().await.post_json("/api/publish/live", "6").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"], "broker_unavailable");
    assert_eq!(
        a.http().await.post_json("/api/broadcast", "1").await.status,
        503
    );
    assert_eq!(
        a.http().await.post_json("/api/send/x", "1").await.status,
        503
    );
    send_json(
        &mut client_b,
        json!({"type":"publish","channel":"live","data":7,"id":7}),
    )
    .await;
    let refused = recv_json(&mut client_b).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "broker_unavailable");
    assert_eq!(refused["id"], 7);

    redis.restart();
    wait_ready(&[&a, &b]).await;
    // Redis restarted empty: its streams start again in new epochs, and the history that
    // could have covered the outage is gone, so each channel gets a gap saying where the new
    // stream goes on from.
    let mut gaps = [recv_json(&mut live).await, recv_json(&mut live).await];
    gaps.sort_by_key(|gap| gap["channel"].as_str().map(str::to_owned));
    let mut epochs = Vec::new();
    for (gap, channel) in gaps.iter_mut().zip(["live", "other"]) {
        let epoch = gap["epoch"].take();
        assert_eq!(epoch.as_str().map(str::len), Some(8), "{gap}");
        epochs.push(epoch);
        assert_eq!(
            *gap,
            json!({"type":"gap","channel":channel,"epoch":null,"offset":0})
        );
    }
    wait_numsub(&redis, "herald:{live}:messages", 1).await;
    let reply = a.http().await.post_json("/api/publish/live", "8").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        recv_json(&mut live).await,
        json!({"type":"message","channel":"live","offset":1,"data":8})
    );
    let history = a.http().await.get("/api/history/live").await.json();
    assert_eq!(history["epoch"], epochs[0], "the gap named the new stream");
    send_json(
        &mut client_b,
        json!({"type":"publish","channel":"live","data":9}),
    )
    .await;
    assert_eq!(recv_json(&mut client_b).await["type"], "published");
    assert_eq!(recv_json(&mut live).await["data"], 9);

    // Nobody was disconnected, both nodes still serve, and the metrics tell the story.
    for server in [&a, &b] {
        assert_eq!(server.http().await.get("/healthz").await.status, 200);
    }
    assert_eq!(
        b.http().await.get("/api/stats").await.json()["connections"],
        2
    );
    assert!(metric(&b, "herald_broker_reconnects_total").await >= 1);
    assert!(metric(&b, "herald_broker_gaps_announced_total").await >= 2);
}

#[tokio::test]
async fn a_redis_that_stops_answering_never_holds_a_publisher() {
    let Some(redis) = RedisServer::start("cluster redis paused") else {
        return;
    };
    let config = Config::default()
        .redis(Some(redis.url()))
        .redis_timeout(Duration::from_millis(300));
    let a = TestServer::start(config).await;
    wait_ready(&[&a]).await;
    let (mut subscriber, _) = a.connect_json("channels=news").await;
    wait_numsub(&redis, "herald:{news}:messages", 1).await;

    // Redis holds every client's commands for 3 s: the publish fails after the 300 ms timeout
    // (or at once, once the node has noticed), with 503, not after Redis wakes up.
    let paused = redis.command(&["CLIENT", "PAUSE", "3000", "ALL"]);
    assert!(paused.is_some_and(|reply| reply.starts_with("+OK")));
    let reply = a.http().await.post_json("/api/publish/news", "1").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"], "broker_unavailable");

    wait_ready(&[&a]).await;
    wait_numsub(&redis, "herald:{news}:messages", 1).await;
    let reply = a.http().await.post_json("/api/publish/news", "2").await;
    assert_eq!(reply.status, 200);
    assert_eq!(recv_message(&mut subscriber).await["data"], 2);
}

#[tokio::test]
async fn a_subscribed_reply_means_messages_from_every_node_arrive() {
    let Some(redis) = RedisServer::start("cluster subscribe then publish") else {
        return;
    };
    let a = node(&redis.url()).await;
    let b = node(&redis.url()).await;
    wait_ready(&[&a, &b]).await;
    let (mut subscriber, _) = b.connect_json("").await;
    let mut publisher = a.http().await;
    // Fresh channels, each published on the other node the moment `subscribed` arrives: the
    // reply must wait for the node's Redis subscription, or these messages go nowhere.
    for i in 0..50 {
        let channel = format!("fresh:{i}");
        send_json(
            &mut subscriber,
            json!({"type":"subscribe","channel":&channel}),
        )
        .await;
        assert_eq!(recv_json(&mut subscriber).await["type"], "subscribed");
        assert_eq!(
            redis.numsub(&format!("herald:{{{channel}}}:messages")),
            Some(1),
            "subscribed before the node's Redis subscription"
        );
        let reply = publisher
            .post_json(&format!("/api/publish/{channel}"), &i.to_string())
            .await;
        assert_eq!(reply.json()["nodes"], 1, "{channel}: {:?}", reply.json());
        let message = recv_message(&mut subscriber).await;
        assert_eq!(
            (message["channel"].as_str(), message["data"].as_i64()),
            (Some(&*channel), Some(i))
        );
    }
    // The same for channels asked for on connect and for the client id's direct sends: from
    // the welcome frame on.
    for i in 0..20 {
        let channel = format!("connect:{i}");
        let (mut ws, id) = b
            .connect_json(&format!("channels={channel}&client_id=fresh-{i}"))
            .await;
        assert_eq!(
            redis.numsub(&format!("herald:{{{channel}}}:messages")),
            Some(1),
            "{channel}"
        );
        let sent = publisher
            .post_json(&format!("/api/send/{id}"), "\"dm\"")
            .await;
        assert_eq!(
            sent.status,
            200,
            "a direct send right after the welcome: {:?}",
            sent.json()
        );
        assert_eq!(recv_message(&mut ws).await["data"], "dm");
        publisher
            .post_json(&format!("/api/publish/{channel}"), "1")
            .await;
        assert_eq!(recv_message(&mut ws).await["channel"], channel.as_str());
    }
}
