//! `GET /metrics`: Prometheus text format with the documented series.

mod common;

use std::time::Duration;

use common::{TestServer, recv_json};
use herald::Config;

/// The value of the first sample line starting with `series` (name plus labels).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_connections_publishes_and_deliveries() {
    let server = TestServer::start(Config::default().shards(2)).await;
    let (mut a, _) = server.connect_json("channels=news,other").await;
    let (mut b, _) = server.connect_json("channels=news").await;
    let mut http = server.http().await;
    for _ in 0..3 {
        http.post_json("/api/publish/news", r#"{"n":1}"#).await;
    }
    for _ in 0..3 {
        recv_json(&mut a).await;
        recv_json(&mut b).await;
    }
    let reply = http.get("/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(reply.body).unwrap();
    assert_eq!(sample(&text, "herald_connections"), 2.0);
    assert_eq!(sample(&text, "herald_connections_opened_total"), 2.0);
    assert_eq!(sample(&text, "herald_subscriptions"), 3.0);
    assert_eq!(sample(&text, "herald_channels"), 2.0);
    assert_eq!(sample(&text, "herald_publishes_total"), 3.0);
    // 2 welcome frames are queued directly; the 6 channel deliveries go through the writers.
    assert_eq!(sample(&text, "herald_deliveries_total"), 6.0);
    assert_eq!(
        sample(&text, "herald_publish_to_enqueue_seconds_count"),
        3.0 * 2.0,
        "once per publish per shard"
    );
    assert!(sample(&text, "herald_queue_depth_frames_count") >= 2.0);
    assert!(sample(&text, "herald_websocket_sent_bytes_total") > 6.0 * 20.0);

    b.close(None).await.expect("close");
    drop(b);
    let mut closed = 0.0;
    for _ in 0..100 {
        let text = String::from_utf8(http.get("/metrics").await.body).unwrap();
        closed = sample(
            &text,
            r#"herald_connections_closed_total{reason="client_close"}"#,
        );
        if closed == 1.0 {
            assert_eq!(sample(&text, "herald_subscriptions"), 2.0);
            assert_eq!(sample(&text, "herald_connections"), 1.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed, 1.0);
}
