//! A plain HTTP/1.1 client (hyper's) for the HTTP front end's tests: one
//! connection per call, the whole answer read.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Status, headers and body of one answer.
pub struct HttpAnswer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The V2 error message, or OpenAI's `error.message`.
    pub fn error(&self) -> String {
        let v = self.json();
        v["error"]["message"].as_str().or(v["error"].as_str()).unwrap_or_else(|| panic!("no error in {v}")).to_string()
    }
}

/// Sends one request and reads the whole answer.
pub async fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> HttpAnswer {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    let mut request = http::Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).expect("request");
    let response = sender.send_request(request).await.expect("answered");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    HttpAnswer { status: parts.status.as_u16(), headers: parts.headers, body }
}

pub async fn get(addr: SocketAddr, path: &str) -> HttpAnswer {
    call(addr, "GET", path, &[], Vec::new()).await
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> HttpAnswer {
    call(addr, "POST", path, &[("content-type", "application/json")], serde_json::to_vec(body).expect("json")).await
}
