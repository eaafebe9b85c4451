//! `X-Request-Id`: the client's id (or one made here) is echoed on the response and
//! named in the request's log lines, so a client's report and the server's logs meet.

use std::time::Instant;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

const HEADER: &str = "x-request-id";
/// Longest client id kept; a longer (or non-visible-ASCII) one is replaced by ours.
const MAX_LEN: usize = 256;

/// The client's id if it is short visible ASCII, else a fresh random one.
fn id_of(req: &Request) -> HeaderValue {
    req.headers()
        .get(HEADER)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= MAX_LEN && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&format!("{:032x}", rand::random::<u128>()))
                .expect("hex is a valid header value")
        })
}

/// Tags the request: a tracing span with its id around the handler, one log line when
/// it is answered, and the id on the response.
pub async fn tag(req: Request, next: Next) -> Response {
    let id = id_of(&req);
    let shown = id.to_str().unwrap_or("?").to_string();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = Instant::now();
    let span = tracing::info_span!("request", id = %shown);
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(
            %method,
            path,
            status = resp.status().as_u16(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "answered"
        );
    });
    resp.headers_mut().insert(HEADER, id);
    resp
}
