//! Signaling clients for the binary's end-to-end tests: a WebSocket to `/v1/signal`, JSON in
//! and out.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::serve::WAIT;

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

pub(crate) async fn recv_type(ws: &mut Ws, t: &str) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {t} in time"))
            .expect("socket ended")
            .unwrap();
        if let Message::Text(text) = m {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == t {
                return v;
            }
        }
    }
}

/// Connects to `control`'s `/v1/signal` and authenticates: (socket, welcome).
pub(crate) async fn connect(control: SocketAddr, token: &str) -> (Ws, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{control}/v1/signal"))
        .await
        .unwrap();
    send(&mut ws, json!({"v":1,"type":"auth","token":token})).await;
    let w = recv_type(&mut ws, "welcome").await;
    (ws, w)
}
