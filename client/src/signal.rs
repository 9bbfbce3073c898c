//! The signaling WebSocket as a client sees it: connect, send typed or raw frames, and read
//! typed messages, raw text frames or the close frame, each with an optional timeout.

use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use signaling::protocol::{ClientMessage, ServerMessage};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Error, Result};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Signaling sends small messages in bursts (an answer, then candidates); with Nagle's
/// algorithm each after the first would wait for the server's delayed ACK (~40 ms).
const NO_NAGLE: bool = true;

/// tungstenite zero-fills its read buffer before every read attempt; at the 128 KiB default
/// that is most of what an idle signaling socket costs a load tester with hundreds of peers.
fn socket_config() -> Option<tokio_tungstenite::tungstenite::protocol::WebSocketConfig> {
    Some(
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096),
    )
}

/// One frame as it came off the socket, for tests that look below the JSON layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A text frame, verbatim.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
    /// The server closed the socket: the close code (if the frame had one) and reason.
    /// A connection that ends without a close frame reads as `Closed { code: None, .. }`.
    Closed {
        /// The WebSocket close code, e.g. 1000 (normal) or 1009 (too big).
        code: Option<u16>,
        /// The reason text of the close frame.
        reason: String,
    },
}

/// What [`SignalClient::recv_event`] returns: a parsed server message, a text frame that did
/// not parse as one, or the end of the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalEvent {
    /// A server message.
    Message(ServerMessage),
    /// A text frame that is not a valid `ServerMessage` (the server broke the contract).
    Unparsed(String),
    /// A binary frame (the server never sends these).
    Binary(Vec<u8>),
    /// The socket closed; `code` is the close frame's code, if there was one.
    Closed {
        /// The WebSocket close code.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
}

/// A WebSocket connection to the signaling server.
///
/// Sending and receiving are independent: each half has its own lock, so one task may wait in
/// `recv` while others send.
pub struct SignalClient {
    /// The write half; locked per frame so concurrent senders never interleave.
    sink: Mutex<SplitSink<Ws, Message>>,
    /// The read half; locked by whoever is receiving.
    stream: Mutex<SplitStream<Ws>>,
}

impl SignalClient {
    /// Opens `url` (e.g. `ws://127.0.0.1:8080/ws`).
    pub async fn connect(url: &str) -> Result<SignalClient> {
        let (ws, _response) =
            tokio_tungstenite::connect_async_with_config(url, socket_config(), NO_NAGLE).await?;
        Ok(SignalClient::from_socket(ws))
    }

    /// Opens `url` asking for the WebSocket subprotocol `protocol` (Janus wants
    /// `janus-protocol`); fails if the server does not agree to it.
    pub async fn connect_with_subprotocol(
        url: &str,
        protocol: &'static str,
    ) -> Result<SignalClient> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::HeaderValue;
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
        let (ws, _response) =
            tokio_tungstenite::connect_async_with_config(request, socket_config(), NO_NAGLE)
                .await?;
        Ok(SignalClient::from_socket(ws))
    }

    fn from_socket(ws: Ws) -> SignalClient {
        let (sink, stream) = ws.split();
        SignalClient {
            sink: Mutex::new(sink),
            stream: Mutex::new(stream),
        }
    }

    /// Sends one message as a JSON text frame.
    pub async fn send(&self, message: &ClientMessage) -> Result<()> {
        let text = serde_json::to_string(message)?;
        self.send_raw(&text).await
    }

    /// Sends `text` verbatim as one text frame (for tests that send malformed input).
    pub async fn send_raw(&self, text: &str) -> Result<()> {
        self.sink
            .lock()
            .await
            .send(Message::text(text.to_owned()))
            .await?;
        Ok(())
    }

    /// Sends one binary frame (the server must answer `error` `bad_request`).
    pub async fn send_binary(&self, bytes: &[u8]) -> Result<()> {
        self.sink
            .lock()
            .await
            .send(Message::binary(bytes.to_vec()))
            .await?;
        Ok(())
    }

    /// Closes the socket with a normal close frame. Errors are ignored: the socket may already
    /// be gone.
    pub async fn close(&self) {
        let mut sink = self.sink.lock().await;
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            })))
            .await;
        let _ = sink.close().await;
    }

    /// The next frame, skipping pings and pongs. `Closed` is returned once the socket ends
    /// (and again on every later call).
    pub async fn recv_frame(&self) -> Frame {
        let mut stream = self.stream.lock().await;
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(text))) => return Frame::Text(text.as_str().to_owned()),
                Some(Ok(Message::Binary(bytes))) => return Frame::Binary(bytes.to_vec()),
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(f) => Frame::Closed {
                            code: Some(u16::from(f.code)),
                            reason: f.reason.as_str().to_owned(),
                        },
                        None => Frame::Closed {
                            code: None,
                            reason: String::new(),
                        },
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Err(e)) => {
                    tracing::debug!("signaling socket error: {e}");
                    return Frame::Closed {
                        code: None,
                        reason: e.to_string(),
                    };
                }
                None => {
                    return Frame::Closed {
                        code: None,
                        reason: String::new(),
                    }
                }
            }
        }
    }

    /// [`recv_frame`](Self::recv_frame) with a deadline; `None` if nothing arrived in time.
    pub async fn recv_frame_timeout(&self, timeout: Duration) -> Option<Frame> {
        tokio::time::timeout(timeout, self.recv_frame()).await.ok()
    }

    /// The next frame, parsed.
    pub async fn recv_event(&self) -> SignalEvent {
        match self.recv_frame().await {
            Frame::Text(text) => match serde_json::from_str::<ServerMessage>(&text) {
                Ok(message) => SignalEvent::Message(message),
                Err(e) => {
                    tracing::warn!("unparseable server frame ({e}): {text}");
                    SignalEvent::Unparsed(text)
                }
            },
            Frame::Binary(bytes) => SignalEvent::Binary(bytes),
            Frame::Closed { code, reason } => SignalEvent::Closed { code, reason },
        }
    }

    /// The next server message; `None` once the socket has closed. Frames that are not valid
    /// server messages are logged and skipped.
    pub async fn recv(&self) -> Option<ServerMessage> {
        loop {
            match self.recv_event().await {
                SignalEvent::Message(message) => return Some(message),
                SignalEvent::Unparsed(_) | SignalEvent::Binary(_) => continue,
                SignalEvent::Closed { .. } => return None,
            }
        }
    }

    /// [`recv`](Self::recv) with a deadline: `Err(Error::Timeout)` if nothing arrived in time,
    /// `Ok(None)` if the socket closed.
    pub async fn recv_timeout(&self, timeout: Duration) -> Result<Option<ServerMessage>> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| Error::Timeout("a server message"))
    }

    /// The next text frame verbatim, skipping nothing but pings; `None` if the socket closed,
    /// a binary frame arrived, or nothing arrived before `timeout`.
    pub async fn recv_text_raw(&self, timeout: Duration) -> Option<String> {
        match self.recv_frame_timeout(timeout).await? {
            Frame::Text(text) => Some(text),
            _ => None,
        }
    }

    /// Waits up to `timeout` for the first message `pick` accepts, discarding the others;
    /// `Ok(None)` if the socket closed first.
    pub async fn recv_until<T>(
        &self,
        timeout: Duration,
        mut pick: impl FnMut(&ServerMessage) -> Option<T>,
    ) -> Result<Option<T>> {
        let wait = async {
            while let Some(message) = self.recv().await {
                if let Some(found) = pick(&message) {
                    return Some(found);
                }
            }
            None
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout("the expected server message"))
    }

    /// Waits up to `timeout` for the socket to close, discarding messages; returns the close
    /// code (`Some(None)`: closed without a code), or `None` if it stayed open.
    pub async fn wait_closed(&self, timeout: Duration) -> Option<Option<u16>> {
        let wait = async {
            loop {
                if let Frame::Closed { code, .. } = self.recv_frame().await {
                    return code;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }
}
