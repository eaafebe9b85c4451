//! Accepting and serving connections under hostile load: every connection is bounded in
//! time and the set of them in number, so idle or half-sent connections cannot hold
//! the server's file descriptors (1,100 idle sockets under `ulimit -n 1024` used to make
//! `/health` time out while the accept loop logged `Too many open files` forever).
//!
//! - A connection without a request in flight is closed after the header-read timeout
//!   (before its first request: a client that connects and sends nothing, or half a
//!   head) or the keep-alive timeout (after one). Request bodies have their own timeout
//!   (the handlers read them under it).
//! - At most `max_connections` are open, fewer when the descriptor limit is lower. At
//!   the cap, or when accept itself runs out of descriptors, the oldest connection with
//!   no request in flight is closed to make room, so a new client waits for no timeout;
//!   connections in the middle of a request are never closed for room.
//! - hyper's own answers to unparseable requests get a JSON body (`error_bodies`).

mod error_bodies;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;

use self::error_bodies::ErrorBodies;

/// Time and number limits of connections (`ServerConfig::connections`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionLimits {
    /// From accept to a complete request head (the first request of a connection).
    pub header_read_timeout: Duration,
    /// From the start of a request body to its end.
    pub body_read_timeout: Duration,
    /// How long a connection may wait for its next request after answering one.
    pub keep_alive_timeout: Duration,
    /// Open connections at most (lowered to fit the process's descriptor limit).
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        // vLLM (uvicorn) keeps idle connections 5 s; nginx gives headers and bodies 60 s.
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(5),
            max_connections: 4096,
        }
    }
}

/// The request line and headers at most (nginx allows 4 × 8 KiB by default).
const MAX_HEADER_BYTES: usize = 64 << 10;

/// Descriptors kept for everything but client connections (the listener, the runtime,
/// logs, model files, the engine).
const RESERVED_FDS: u64 = 64;

impl ConnectionLimits {
    /// `max_connections`, lowered to what the descriptor limit leaves.
    pub fn effective_max_connections(&self) -> usize {
        let cap = self.max_connections.max(1);
        match open_files_limit() {
            Some(limit) => cap.min(limit.saturating_sub(RESERVED_FDS).max(1) as usize),
            None => cap,
        }
    }
}

/// The soft limit on open descriptors (`ulimit -n`), where there is one.
fn open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
        #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every unix
        (ok && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}

/// One open connection, as the accept loop and its own task see it.
struct Conn {
    id: u64,
    /// Requests being answered (until their response body is done).
    active: AtomicUsize,
    served: AtomicU64,
    /// When it last had no request in flight (accept, or the end of a response).
    idle_since: Mutex<Instant>,
    /// Close it now (evicted for room, or the server is stopping).
    close: Notify,
    closing: AtomicBool,
}

impl Conn {
    /// When this connection's idle time runs out, if it is idle.
    fn idle_deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        let limit = match self.served.load(Ordering::SeqCst) {
            0 => limits.header_read_timeout,
            _ => limits.keep_alive_timeout,
        };
        Some(since + limit)
    }

    fn close_now(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.close.notify_one();
    }
}

/// Marks a request in flight on its connection until its response body is done.
struct InFlight(Arc<Conn>);

impl InFlight {
    fn new(conn: Arc<Conn>) -> Self {
        conn.active.fetch_add(1, Ordering::SeqCst);
        Self(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.served.fetch_add(1, Ordering::SeqCst);
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted in flight until hyper drops it.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
}

impl Registry {
    fn open(&self) -> Arc<Conn> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            active: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
            close: Notify::new(),
            closing: AtomicBool::new(false),
        });
        self.lock().insert(id, conn.clone());
        conn
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the oldest connection with no request in flight; false if there is none.
    fn evict_oldest_idle(&self) -> bool {
        let conns = self.lock();
        let idle = conns
            .values()
            .find(|c| c.active.load(Ordering::SeqCst) == 0 && !c.closing.load(Ordering::SeqCst));
        match idle {
            Some(c) => {
                tracing::debug!(connection = c.id, "closing an idle connection to make room");
                c.close_now();
                true
            }
            None => false,
        }
    }

    /// Closes every connection with no request in flight (the server is stopping).
    fn close_idle(&self) {
        for c in self.lock().values() {
            if c.active.load(Ordering::SeqCst) == 0 {
                c.close_now();
            }
        }
    }

    fn close_all(&self) {
        for c in self.lock().values() {
            c.close_now();
        }
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The connections of one server: accepting them and closing them.
pub(crate) struct Connections {
    limits: ConnectionLimits,
    registry: Arc<Registry>,
    slots: Arc<Semaphore>,
    builder: Arc<http1::Builder>,
    /// Set when the server stops: connections finish their response and close.
    stopping: watch::Sender<bool>,
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Self {
        let max = limits.effective_max_connections();
        if max < limits.max_connections {
            tracing::warn!(
                max_connections = max,
                asked = limits.max_connections,
                "connections capped by the open-file limit (ulimit -n)"
            );
        }
        // HTTP/1.1 only, as axum::serve served here before (without its http2 feature)
        // and as vLLM's uvicorn does.
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // A request head is bounded too (431 beyond), not only its arrival time.
            .max_header_size(MAX_HEADER_BYTES);
        Self {
            limits,
            registry: Arc::default(),
            slots: Arc::new(Semaphore::new(max)),
            builder: Arc::new(builder),
            stopping: watch::channel(false).0,
        }
    }

    /// Accepts and serves connections until `stop_accepting` is set.
    pub async fn accept_loop(
        &self,
        listener: TcpListener,
        router: Router,
        close_after_response: Arc<AtomicBool>,
        mut stop_accepting: watch::Receiver<bool>,
    ) {
        let mut last_warning: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop_accepting.wait_for(|&s| s) => return,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (or another transient failure): make room and
                    // retry shortly; never give up on accepting.
                    let evicted = self.registry.evict_oldest_idle();
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(error = %e, evicted, "accept failed; retrying");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(if evicted { 5 } else { 50 })).await;
                    continue;
                }
            };
            let permit = match self.slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    // At the cap: the oldest idle connection gives way; when every
                    // connection is in a request, this one waits for a slot.
                    self.registry.evict_oldest_idle();
                    tokio::select! {
                        _ = stop_accepting.wait_for(|&s| s) => return,
                        p = self.slots.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => return,
                        },
                    }
                }
            };
            self.spawn(stream, permit, router.clone(), close_after_response.clone());
        }
    }

    fn spawn(
        &self,
        stream: TcpStream,
        permit: OwnedSemaphorePermit,
        router: Router,
        close_after_response: Arc<AtomicBool>,
    ) {
        let _ = stream.set_nodelay(true);
        let conn = self.registry.open();
        let registry = self.registry.clone();
        let builder = self.builder.clone();
        let limits = self.limits.clone();
        let mut stopping = self.stopping.subscribe();
        tokio::spawn(async move {
            let tracked = conn.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let in_flight = InFlight::new(tracked.clone());
                let router = router.clone();
                let close = close_after_response.load(Ordering::SeqCst);
                async move {
                    let Ok(mut resp) = router.oneshot(req.map(Body::new)).await;
                    if close {
                        // Draining: clients reconnect elsewhere instead of reusing this.
                        let close = HeaderValue::from_static("close");
                        resp.headers_mut().insert(header::CONNECTION, close);
                    }
                    Ok::<_, Infallible>(
                        resp.map(|inner| TrackedBody { inner, _in_flight: in_flight }),
                    )
                }
            });
            let io = TokioIo::new(ErrorBodies::new(stream));
            let served = builder.serve_connection(io, service).with_upgrades();
            tokio::pin!(served);
            let mut draining = false;
            loop {
                let deadline = conn.idle_deadline(&limits);
                tokio::select! {
                    r = served.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(connection = conn.id, "connection ended: {e}");
                        }
                        break;
                    }
                    _ = conn.close.notified() => break,
                    _ = sleep_until(deadline, &limits) => {
                        if conn.idle_deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                            tracing::debug!(connection = conn.id, "closing an idle connection");
                            break;
                        }
                    }
                    _ = stopping.wait_for(|&s| s), if !draining => {
                        served.as_mut().graceful_shutdown();
                        draining = true;
                    }
                }
            }
            registry.lock().remove(&conn.id);
            drop(permit);
        });
    }

    /// Stops the connections left once nothing is in flight: idle ones close now, the
    /// rest finish their response (within `limit`) and close.
    pub async fn close(&self, limit: Duration) {
        let _ = self.stopping.send(true);
        self.registry.close_idle();
        let t = Instant::now();
        while self.registry.len() > 0 && t.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.registry.close_all();
    }
}

/// Sleeps until `deadline`; without one (a request in flight), for a keep-alive period,
/// after which the caller looks again.
async fn sleep_until(deadline: Option<Instant>, limits: &ConnectionLimits) {
    let deadline = deadline.unwrap_or_else(|| Instant::now() + limits.keep_alive_timeout);
    tokio::time::sleep_until(deadline.into()).await;
}
