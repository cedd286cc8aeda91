//! Helpers for history and recovery tests: positions in replies, subscribing with one, and
//! reading a channel's offsets exactly.

use futures_util::StreamExt as _;
use serde_json::{Value, json};

use super::{TestServer, WAIT, Ws, recv_json, send_json};

/// The epoch and latest offset in a `subscribed` frame, a welcome's channel entry or a gap.
pub fn position(standing: &Value) -> (String, u64) {
    (
        standing["epoch"].as_str().expect("an epoch").to_owned(),
        standing["offset"].as_u64().expect("an offset"),
    )
}

/// Subscribes with a request (from `since`, an epoch and offset, when given) and returns the
/// `subscribed` reply.
pub async fn subscribe(ws: &mut Ws, channel: &str, since: Option<(&str, u64)>) -> Value {
    let mut request = json!({"type":"subscribe","channel":channel});
    if let Some((epoch, offset)) = since {
        request["since"] = json!({"epoch": epoch, "offset": offset});
    }
    send_json(ws, request).await;
    let reply = recv_json(ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

/// Reads `channel`'s messages after `after` up to `until`: each offset once, in order, and
/// nothing else (a gap frame fails the test).
pub async fn expect_offsets(ws: &mut Ws, channel: &str, after: u64, until: u64) {
    for want in after + 1..=until {
        let message = recv_json(ws).await;
        assert_eq!(message["type"], "message", "{message}");
        assert_eq!(message["channel"], channel);
        assert_eq!(message["offset"], want, "offsets in order, once each");
    }
}

/// A WebSocket client of `path_and_query` whose socket takes only 4 KiB at a time, so that a
/// client that does not read fills its server-side queue soon.
pub async fn connect_small_buffer(server: &TestServer, path_and_query: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let stream = socket.connect(server.addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(
        server.ws_url(path_and_query),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("upgrade");
    ws
}

/// Reads message frames until the server's close frame: asserts that the offsets run on from
/// 1 without a hole, and returns the last one and the close code and reason.
pub async fn read_until_close(ws: &mut Ws) -> (u64, u16, String) {
    use tokio_tungstenite::tungstenite::Message;
    let mut last = 0;
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("frames") {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).expect("json");
                if frame["type"] == "message" {
                    assert_eq!(frame["offset"], last + 1, "no hole in what it got");
                    last += 1;
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                return (last, u16::from(frame.code), frame.reason.to_string());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A client that recovers `channel` twice while it is being published to: it connects to
/// `first` with `since=<channel>:<epoch>:0` in the URL, reads up to offset `leave_after`,
/// leaves, connects to `second` and subscribes from there with the offset it read, then
/// reads up to `total`. Every offset must come exactly once, in order.
pub async fn leave_and_come_back(
    first: std::net::SocketAddr,
    second: std::net::SocketAddr,
    channel: &str,
    epoch: &str,
    leave_after: u64,
    total: u64,
) {
    let url = format!("ws://{first}/ws?channels={channel}&since={channel}:{epoch}:0");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["channels"][channel]["recovered"], true, "{welcome}");
    expect_offsets(&mut ws, channel, 0, leave_after).await;
    drop(ws);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{second}/ws"))
        .await
        .expect("reconnect");
    let _welcome = recv_json(&mut ws).await;
    let reply = subscribe(&mut ws, channel, Some((epoch, leave_after))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    expect_offsets(&mut ws, channel, leave_after, total).await;
}

/// One publisher per address in `nodes`, all publishing at once: each sends `count` messages
/// (0, 1, ...) to `channel` over one keep-alive connection and checks every reply. Await the
/// handles to know every message was published.
pub fn spawn_publishers(
    nodes: &[std::net::SocketAddr],
    channel: &str,
    count: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    nodes
        .iter()
        .map(|&addr| {
            let path = format!("/api/publish/{channel}");
            tokio::spawn(async move {
                let mut http = super::HttpClient::connect(addr).await;
                for n in 0..count {
                    let reply = http.post_json(&path, &n.to_string()).await;
                    assert_eq!(reply.status, 200);
                }
            })
        })
        .collect()
}
