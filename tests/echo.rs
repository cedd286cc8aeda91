//! The `/echo` endpoint and basic WebSocket control frames.

mod common;

use common::{TestServer, recv};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn echoes_text_and_binary_unchanged() {
    let server = TestServer::default().await;
    let mut ws = server.connect("/echo").await;
    let big = "é".repeat(30_000);
    let messages = [
        Message::text("hello"),
        Message::binary(vec![0, 1, 2, 255]),
        Message::text(""),
        Message::text(big),
    ];
    for message in messages {
        ws.send(message.clone()).await.expect("send");
        assert_eq!(recv(&mut ws).await, message);
    }
}

#[tokio::test]
async fn answers_ping_with_pong_and_close_with_close() {
    let server = TestServer::default().await;
    let mut ws = server.connect("/echo").await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    let pong = tokio::time::timeout(common::WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));
    ws.close(None).await.expect("close");
    let closing = tokio::time::timeout(common::WAIT, ws.next()).await.unwrap();
    assert!(matches!(closing, Some(Ok(Message::Close(_))) | None));
}
