//! History and recovery in cluster mode, against real redis-server processes: one stream per
//! channel for every node, recovery on another node under concurrent publishing on two nodes,
//! a node cut off from Redis healing from the history (with a gap only for what the history no
//! longer holds), the history API reading Redis, and Server-Sent Events streams resuming from
//! the history in Redis on another node.

mod common;

use std::time::Duration;

use common::cluster::{eventually, readyz, wait_numsub, wait_ready};
use common::positions::{expect_offsets, leave_and_come_back, spawn_publishers, subscribe};
use common::redis_server::RedisServer;
use common::sse::{Sse, positions};
use common::stall_proxy::StallProxy;
use common::{TestServer, metric, recv_json};
use herald::Config;
use serde_json::{Value, json};

fn cluster_config(url: &str, history: usize) -> Config {
    Config::default()
        .redis(Some(url.to_owned()))
        .history_size(history)
}

/// Two ready nodes on `redis`, keeping `history` messages a channel.
async fn node_pair(redis: &RedisServer, history: usize) -> (TestServer, TestServer) {
    let a = TestServer::start(cluster_config(&redis.url(), history)).await;
    let b = TestServer::start(cluster_config(&redis.url(), history)).await;
    wait_ready(&[&a, &b]).await;
    (a, b)
}

/// Two ready nodes keeping `history` messages a channel: A on `redis` itself, B through a
/// proxy that can cut it off.
async fn cut_off_pair(redis: &RedisServer, history: usize) -> (StallProxy, TestServer, TestServer) {
    let redis_addr = redis
        .url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("addr");
    let proxy = StallProxy::start(redis_addr).await;
    let a = TestServer::start(cluster_config(&redis.url(), history)).await;
    let b = TestServer::start(cluster_config(&format!("redis://{}/", proxy.addr), history)).await;
    wait_ready(&[&a, &b]).await;
    (proxy, a, b)
}

async fn publish(server: &TestServer, channel: &str, count: u64) {
    let mut http = server.http().await;
    for n in 0..count {
        let reply = http
            .post_json(&format!("/api/publish/{channel}"), &n.to_string())
            .await;
        assert_eq!(
            reply.status,
            200,
            "{:?}",
            String::from_utf8_lossy(&reply.body)
        );
    }
}

#[tokio::test]
async fn every_node_serves_one_stream_and_one_history() {
    let Some(redis) = RedisServer::start("cluster streams") else {
        return;
    };
    let (a, b) = node_pair(&redis, 100).await;
    let (mut on_a, _) = a.connect_json("").await;
    let (mut on_b, _) = b.connect_json("").await;
    let reply_a = subscribe(&mut on_a, "news", None).await;
    let reply_b = subscribe(&mut on_b, "news", None).await;
    assert_eq!(
        reply_a["epoch"], reply_b["epoch"],
        "one epoch on every node"
    );
    assert_eq!(
        (&reply_a["offset"], &reply_b["offset"]),
        (&json!(0), &json!(0))
    );
    let epoch = reply_a["epoch"].as_str().unwrap().to_owned();

    publish(&a, "news", 3).await;
    publish(&b, "news", 2).await;
    expect_offsets(&mut on_a, "news", 0, 5).await;
    expect_offsets(&mut on_b, "news", 0, 5).await;
    for server in [&a, &b] {
        let history = server.http().await.get("/api/history/news?limit=2").await;
        assert_eq!(history.status, 200);
        let history = history.json();
        assert_eq!(history["epoch"], epoch.as_str());
        assert_eq!(history["offset"], 5);
        assert_eq!(
            history["messages"],
            json!([{"offset":4,"data":0},{"offset":5,"data":1}])
        );
    }
    let page = a
        .http()
        .await
        .get(&format!("/api/history/news?since=1&epoch={epoch}&limit=2"))
        .await
        .json();
    assert_eq!(page["messages"][0]["offset"], 2);
    let welcome = {
        let mut ws = b
            .connect(&format!("/ws?channels=news&since=news:{epoch}:3"))
            .await;
        let welcome = recv_json(&mut ws).await;
        expect_offsets(&mut ws, "news", 3, 5).await;
        welcome
    };
    assert_eq!(welcome["channels"]["news"]["recovered"], true, "{welcome}");
}

/// Clients that leave one node and come back on the other, while two publishers publish on
/// both nodes at full speed, get every offset exactly once, in order.
#[tokio::test]
async fn recovery_on_another_node_under_concurrent_publishing_is_exactly_once() {
    const TOTAL: u64 = 2000;
    let Some(redis) = RedisServer::start("cluster recovery under load") else {
        return;
    };
    let (a, b) = node_pair(&redis, 5000).await;
    let (mut watcher, _) = a.connect_json("").await;
    let epoch = subscribe(&mut watcher, "load", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_numsub(&redis, "herald:{load}:messages", 1).await;
    let publishers = spawn_publishers(&[a.addr, b.addr], "load", TOTAL / 2);
    let mut clients = Vec::new();
    for (delay_ms, leave_after, first, second) in [
        (0, 30, a.addr, b.addr),
        (5, 400, b.addr, a.addr),
        (20, 1200, a.addr, b.addr),
    ] {
        let epoch = epoch.clone();
        clients.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            leave_and_come_back(first, second, "load", &epoch, leave_after, TOTAL).await;
        }));
    }
    for task in publishers.into_iter().chain(clients) {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("finishes")
            .expect("no assertion failed");
    }
    expect_offsets(&mut watcher, "load", 0, TOTAL).await;
}

/// A node cut off from Redis (here by a proxy that drops its connections) while another node
/// publishes reads what it missed from the history when it is back: its subscriber gets every
/// message once, in order, and no gap frame.
#[tokio::test]
async fn a_node_cut_off_from_redis_heals_from_the_history() {
    let Some(redis) = RedisServer::start("cluster heal") else {
        return;
    };
    let (proxy, a, b) = cut_off_pair(&redis, 100).await;
    let (mut on_b, _) = b.connect_json("channels=feed").await;
    wait_numsub(&redis, "herald:{feed}:messages", 1).await;
    publish(&a, "feed", 10).await;
    expect_offsets(&mut on_b, "feed", 0, 10).await;

    proxy.sever(true);
    eventually("node B notices", async || readyz(&b).await == 503).await;
    wait_numsub(&redis, "herald:{feed}:messages", 0).await;
    publish(&a, "feed", 50).await;
    proxy.sever(false);
    wait_ready(&[&b]).await;
    expect_offsets(&mut on_b, "feed", 10, 60).await;
    publish(&a, "feed", 1).await;
    expect_offsets(&mut on_b, "feed", 60, 61).await;
    assert_eq!(metric(&b, "herald_broker_gaps_announced_total").await, 0);
    assert!(metric(&b, "herald_broker_healed_total").await >= 50);
}

/// When the history no longer holds all that a cut-off node missed, its subscribers get a gap
/// frame saying where messages go on from, then the rest of the history, then live messages.
#[tokio::test]
async fn what_the_history_lost_is_announced_with_the_position_to_go_on_from() {
    let Some(redis) = RedisServer::start("cluster heal past the window") else {
        return;
    };
    let (proxy, a, b) = cut_off_pair(&redis, 10).await;
    let (mut on_b, _) = b.connect_json("").await;
    let epoch = subscribe(&mut on_b, "feed", None).await["epoch"].clone();
    publish(&a, "feed", 5).await;
    expect_offsets(&mut on_b, "feed", 0, 5).await;

    proxy.sever(true);
    eventually("node B notices", async || readyz(&b).await == 503).await;
    wait_numsub(&redis, "herald:{feed}:messages", 0).await;
    publish(&a, "feed", 30).await; // offsets 6..=35; the history keeps 26..=35
    proxy.sever(false);
    wait_ready(&[&b]).await;
    let gap = recv_json(&mut on_b).await;
    assert_eq!(
        gap,
        json!({"type":"gap","channel":"feed","epoch":epoch,"offset":25})
    );
    expect_offsets(&mut on_b, "feed", 25, 35).await;
    assert_eq!(metric(&b, "herald_broker_gaps_announced_total").await, 1);

    // A client's own recovery from before the window says so.
    let (mut late, _) = a.connect_json("").await;
    let reply = subscribe(&mut late, "feed", Some((epoch.as_str().unwrap(), 5))).await;
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["reason"], "position_expired");
    assert_eq!(reply["offset"], 35);
}

#[tokio::test]
async fn without_redis_a_recovery_says_the_history_is_unavailable() {
    if !common::redis_server::available("cluster history unavailable") {
        return;
    }
    let port = common::redis_server::free_port();
    let node = TestServer::start(cluster_config(&format!("redis://127.0.0.1:{port}/"), 100)).await;
    let (mut ws, _) = node.connect_json("").await;
    let reply = subscribe(&mut ws, "news", Some(("abcd1234", 3))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["reason"], "history_unavailable");
    let history = node.http().await.get("/api/history/news").await;
    assert_eq!(history.status, 503);
    assert_eq!(history.json()["error"], "broker_unavailable");
}

#[tokio::test]
async fn a_raw_client_whose_position_is_gone_is_closed_with_4002() {
    let Some(redis) = RedisServer::start("cluster raw recovery") else {
        return;
    };
    let node = TestServer::start(cluster_config(&redis.url(), 100)).await;
    wait_ready(&[&node]).await;
    publish(&node, "prices", 3).await;
    let mut raw = node
        .connect("/ws?format=raw&channels=prices&since=prices:zzzzzzzz:1")
        .await;
    assert_eq!(
        common::expect_close(&mut raw).await,
        (4002, "recovery failed".to_owned())
    );
    let epoch = node.http().await.get("/api/history/prices").await.json()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut raw = node
        .connect(&format!(
            "/ws?format=raw&channels=prices&since=prices:{epoch}:1"
        ))
        .await;
    for n in [1, 2] {
        assert_eq!(
            common::recv(&mut raw).await,
            tokio_tungstenite::tungstenite::Message::text(n.to_string())
        );
    }
}

/// Redis killed and restarted (keeping its data) while a publisher goes on publishing through
/// the outage (retrying each `503` with its `Idempotency-Key`): the subscriber on the other node
/// gets every message once, in order, healed from the history, with no gap frame.
#[tokio::test]
async fn redis_killed_and_restarted_mid_stream_heals_subscribers_from_the_history() {
    const TOTAL: u64 = 300;
    let Some(mut redis) = RedisServer::start_persistent("cluster redis restart heals") else {
        return;
    };
    let (a, b) = node_pair(&redis, 1000).await;
    let (mut on_b, _) = b.connect_json("channels=orders").await;
    wait_numsub(&redis, "herald:{orders}:messages", 1).await;
    let addr = a.addr;
    let publisher = tokio::spawn(async move {
        for n in 0..TOTAL {
            let key = format!("order-{n}");
            loop {
                let mut http = common::HttpClient::connect(addr).await;
                let reply = http
                    .request(
                        "POST",
                        "/api/publish/orders",
                        &[
                            ("content-type", "application/json"),
                            ("idempotency-key", &key),
                        ],
                        n.to_string().as_bytes(),
                    )
                    .await;
                match reply.status {
                    200 => break,
                    503 => tokio::time::sleep(Duration::from_millis(20)).await,
                    other => panic!("publish {n}: {other}"),
                }
            }
        }
    });
    expect_offsets(&mut on_b, "orders", 0, 50).await;
    redis.kill();
    eventually("node B notices", async || readyz(&b).await == 503).await;
    redis.restart();
    expect_offsets(&mut on_b, "orders", 50, TOTAL).await;
    tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("the publisher finishes")
        .expect("every publish succeeded once");
    assert_eq!(metric(&b, "herald_broker_gaps_announced_total").await, 0);
    let history = a
        .http()
        .await
        .get("/api/history/orders?limit=1")
        .await
        .json();
    assert_eq!(
        history["offset"], TOTAL,
        "one offset per message: no retry published twice"
    );
}

/// The offsets of every message event of `channel` in `events`.
fn offsets_of(events: &[(String, Value)], channel: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|(_, event)| event["type"] == "message" && event["channel"] == channel)
        .map(|(_, event)| event["offset"].as_u64().expect("an offset"))
        .collect()
}

/// Reads message events until `channel` reaches offset `until` (other channels' events are
/// kept too), checking that each event's id moved to its offset.
async fn read_until(sse: &mut Sse, channel: &str, until: u64) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    while offsets_of(&events, channel).last() < Some(&until) {
        let (id, event) = sse.next_event().await;
        assert_eq!(event["type"], "message", "{event}");
        let at = positions(&id);
        let index = usize::from(event["channel"] == "quiet");
        assert_eq!(at[index].1, event["offset"], "the id moved with {event}");
        events.push((id, event));
    }
    events
}

/// An event stream that leaves one node and comes back on the other with its last event id
/// resumes every channel from the history in Redis while both nodes publish: every offset
/// once, in order, then live.
#[tokio::test]
async fn an_event_stream_resumes_on_another_node_under_concurrent_publishing() {
    const TOTAL: u64 = 600;
    let Some(redis) = RedisServer::start("cluster sse resume") else {
        return;
    };
    let (a, b) = node_pair(&redis, 5000).await;
    let mut sse = Sse::open(a.addr, "channels=load,quiet", "").await;
    assert_eq!(sse.next_event().await.1["type"], "welcome");
    publish(&b, "load", 10).await;
    publish(&b, "quiet", 20).await;
    let before = read_until(&mut sse, "quiet", 20).await;
    assert_eq!(offsets_of(&before, "load"), (1..=10).collect::<Vec<_>>());
    let (last_id, _) = before.last().expect("events").clone();
    drop(sse);

    publish(&a, "quiet", 10).await;
    let publishers = spawn_publishers(&[a.addr, b.addr], "load", TOTAL / 2);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut back = Sse::open(
        b.addr,
        "channels=load,quiet",
        &format!("last-event-id: {last_id}\r\n"),
    )
    .await;
    let (_, welcome) = back.next_event().await;
    for channel in ["load", "quiet"] {
        assert_eq!(welcome["channels"][channel]["recovered"], true, "{welcome}");
    }
    let after = read_until(&mut back, "load", 10 + TOTAL).await;
    assert_eq!(
        offsets_of(&after, "load"),
        (11..=10 + TOTAL).collect::<Vec<_>>()
    );
    assert_eq!(offsets_of(&after, "quiet"), (21..=30).collect::<Vec<_>>());
    for task in publishers {
        task.await.expect("no assertion failed");
    }
    publish(&a, "quiet", 1).await;
    let (_, live) = back.next_event().await;
    assert_eq!(
        (&live["channel"], &live["offset"]),
        (&json!("quiet"), &json!(31))
    );
}

/// A stream's replay from the history in Redis streams through a queue far smaller than it,
/// as the client reads.
#[tokio::test]
async fn an_event_stream_replays_from_redis_through_a_small_queue() {
    let Some(redis) = RedisServer::start("cluster sse small queue") else {
        return;
    };
    let config = |url: &str| cluster_config(url, 500).queue_capacity(16);
    let a = TestServer::start(config(&redis.url())).await;
    let b = TestServer::start(config(&redis.url())).await;
    wait_ready(&[&a, &b]).await;
    let (welcome_id, _) = Sse::open(a.addr, "channels=load", "")
        .await
        .next_event()
        .await;
    publish(&a, "load", 200).await;
    let mut back = Sse::open(
        b.addr,
        &format!("channels=load&last_event_id={welcome_id}"),
        "",
    )
    .await;
    assert_eq!(
        back.next_event().await.1["channels"]["load"]["recovered"],
        true
    );
    let replayed = read_until(&mut back, "load", 200).await;
    assert_eq!(offsets_of(&replayed, "load"), (1..=200).collect::<Vec<_>>());
    let stats = b.http().await.get("/api/stats").await.json();
    assert_eq!(stats["slow_consumer_drops"], 0, "the replay streamed");
}

/// A gap announced to a stream moves its event id to where the channel goes on from, so the
/// client, coming back with that id, recovers what follows instead of being told its
/// position expired.
#[tokio::test]
async fn a_gap_moves_the_event_id_to_the_position_to_go_on_from() {
    let Some(redis) = RedisServer::start("cluster sse gap") else {
        return;
    };
    let (proxy, a, b) = cut_off_pair(&redis, 10).await;
    let mut sse = Sse::open(b.addr, "channels=feed", "").await;
    let (_, welcome) = sse.next_event().await;
    let epoch = welcome["channels"]["feed"]["epoch"].clone();
    publish(&a, "feed", 5).await;
    read_until(&mut sse, "feed", 5).await;

    proxy.sever(true);
    eventually("node B notices", async || readyz(&b).await == 503).await;
    wait_numsub(&redis, "herald:{feed}:messages", 0).await;
    publish(&a, "feed", 30).await; // offsets 6..=35; the history keeps 26..=35
    proxy.sever(false);
    wait_ready(&[&b]).await;
    let (gap_id, gap) = sse.next_event().await;
    assert_eq!(
        gap,
        json!({"type":"gap","channel":"feed","epoch":epoch,"offset":25})
    );
    assert_eq!(
        positions(&gap_id),
        [(epoch.as_str().unwrap().to_owned(), 25)]
    );
    let healed = read_until(&mut sse, "feed", 35).await;
    assert_eq!(offsets_of(&healed, "feed"), (26..=35).collect::<Vec<_>>());
    drop(sse);

    let mut back = Sse::open(
        a.addr,
        "channels=feed",
        &format!("last-event-id: {gap_id}\r\n"),
    )
    .await;
    let (_, welcome) = back.next_event().await;
    assert_eq!(welcome["channels"]["feed"]["recovered"], true, "{welcome}");
    let replayed = read_until(&mut back, "feed", 35).await;
    assert_eq!(offsets_of(&replayed, "feed"), (26..=35).collect::<Vec<_>>());
}
