//! OpenAI's JSON error body for the answers hyper writes by itself. A request hyper
//! cannot parse (a garbage request line: 400; headers over the limit: 431; a URI too
//! long: 414) never reaches the router: hyper writes a bare status line with
//! `content-length: 0` and closes. Clients then see an empty body where every other
//! error has `{"error": {...}}`. hyper has no hook for these, so this wrapper of the
//! connection's socket recognises such a head as it is written (a 4xx without a
//! content type and with an empty body: every response of ours carries a JSON or text
//! body) and writes the JSON error in its place.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ApiError;

/// A socket whose hyper-made error answers get a JSON body. Writes are not vectored, so
/// hyper hands each head over in one piece.
pub struct ErrorBodies<S> {
    inner: S,
    /// A rewritten answer not yet fully written (hyper was told it was).
    pending: Vec<u8>,
    written: usize,
}

impl<S> ErrorBodies<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, pending: Vec::new(), written: 0 }
    }
}

/// The JSON answer for a head hyper wrote on its own, if `head` is one.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    // Cheap checks first: this sees every write of the connection.
    let client_error = head.starts_with(b"HTTP/1.1 4") || head.starts_with(b"HTTP/1.0 4");
    if !client_error || !head.ends_with(b"\r\n\r\n") || head.len() > 1024 {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let code: u16 = text.get(9..12)?.parse().ok()?;
    let status = StatusCode::from_u16(code).ok()?;
    let lower = text.to_ascii_lowercase();
    if !status.is_client_error()
        || !lower.contains("\r\ncontent-length: 0\r\n")
        || lower.contains("\r\ncontent-type:")
    {
        return None;
    }
    let message = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            "the request's headers are too large".to_string()
        }
        StatusCode::URI_TOO_LONG => "the request's URI is too long".to_string(),
        _ => format!("malformed HTTP request ({status})"),
    };
    let body = serde_json::to_string(&ApiError::Http { status, message }.body()).ok()?;
    let status_line = text.split("\r\n").next()?;
    let date = text.split("\r\n").find(|l| l.to_ascii_lowercase().starts_with("date:"));
    let mut out = format!(
        "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n",
        body.len()
    );
    if let Some(date) = date {
        out.push_str(date);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Some(out.into_bytes())
}

impl<S: AsyncWrite + Unpin> ErrorBodies<S> {
    /// Writes what is left of a rewritten answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ErrorBodies<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ErrorBodies<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some(answer) = rewrite(buf) {
            this.pending = answer;
            // hyper's bytes count as written; `poll_pending` delivers ours.
            let _ = this.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_error_heads_get_a_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
                     date: Sun, 29 Nov 2026 10:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite(head).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("date: Sun"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("headers"), "{v}");
    }

    #[test]
    fn our_own_answers_pass_untouched() {
        for head in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            b"data: {\"x\": 1}\n\n",
        ] {
            assert!(rewrite(head).is_none(), "{}", String::from_utf8_lossy(head));
        }
    }
}
