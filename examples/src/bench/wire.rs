//! A minimal HTTP/1.1 client for the load generator: one request in flight per connection, the
//! request written as prepared bytes, the reply parsed with `httparse`. A full client (hyper)
//! would spend more of the load core than the server under test spends per request.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Longest reply head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Longest reply body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// A reply: status, body and the server's own time from a `Server-Timing: app;dur=MS` header.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Milliseconds the server says it spent, if it said.
    pub server_ms: Option<f64>,
}

/// Builds the bytes of a request (`body` is sent as JSON when given).
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\n");
    for (k, v) in headers {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    if let Some(b) = body {
        out.push_str("content-type: application/json\r\n");
        out.push_str(&format!("content-length: {}\r\n", b.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct Conn<S> {
    io: S,
    buf: Vec<u8>,
}

/// A connection over TLS.
pub type TlsConn = Conn<TlsStream<TcpStream>>;

/// Connects over TCP (no delay) and completes a TLS handshake with `tls`.
pub async fn connect_tls(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<TlsConn> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").context("server name")?;
    let io = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    Ok(Conn::new(io))
}

/// Connects over plain TCP (the operator API).
pub async fn connect_plain(addr: SocketAddr) -> Result<Conn<TcpStream>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(Conn::new(tcp))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends `req` (bytes from [`request`]) and reads the whole reply.
    pub async fn send(&mut self, req: &[u8]) -> Result<Reply> {
        self.io
            .write_all(req)
            .await
            .context("writing the request")?;
        self.io.flush().await.context("flushing the request")?;
        loop {
            if let Some(reply) = self.parse()? {
                return Ok(reply);
            }
            if self.buf.len() > MAX_HEAD + MAX_BODY {
                bail!("reply too large");
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .context("reading the reply")?;
            if n == 0 {
                bail!("the server closed the connection");
            }
        }
    }

    /// Takes one complete reply off the buffer, if there is one.
    fn parse(&mut self) -> Result<Option<Reply>> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut head = httparse::Response::new(&mut headers);
        let head_len = match head.parse(&self.buf).context("parsing the reply")? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial if self.buf.len() > MAX_HEAD => bail!("reply head too long"),
            httparse::Status::Partial => return Ok(None),
        };
        let status = head.code.ok_or_else(|| anyhow!("reply without a status"))?;
        let mut length = None;
        let mut server_ms = None;
        for h in head.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value).context("content-length")?;
                length = Some(v.trim().parse::<usize>().context("content-length")?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("chunked replies are not supported by the bench client");
            } else if h.name.eq_ignore_ascii_case("server-timing") {
                server_ms = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.split("dur=").nth(1))
                    .and_then(|v| v.split([',', ';']).next())
                    .and_then(|v| v.trim().parse::<f64>().ok());
            }
        }
        let length = length.ok_or_else(|| anyhow!("reply without content-length"))?;
        if length > MAX_BODY {
            bail!("reply body of {length} bytes");
        }
        if self.buf.len() < head_len + length {
            return Ok(None);
        }
        let body = self.buf[head_len..head_len + length].to_vec();
        self.buf.drain(..head_len + length);
        Ok(Some(Reply {
            status,
            body,
            server_ms,
        }))
    }
}
