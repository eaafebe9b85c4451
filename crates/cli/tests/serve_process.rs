//! `radix-sparse serve` as a process (issue 23): out of file descriptors it still answers
//! /health at once, and SIGTERM drains open streams, refusing new requests with 503,
//! then exits as soon as they are done. Each test starts its own server; the descriptor
//! limit is lowered in the child only (between fork and exec), so nothing else in this
//! binary runs under it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Served {
    child: Child,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `radix-sparse serve` on a free port with `args`, the child's descriptor limit
/// set to `nofile` when given; returns once it listens.
fn serve(args: &[&str], nofile: Option<u64>) -> Served {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_radix-sparse"));
    cmd.args(["serve", "--port", "0", "--device", "cpu"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(n) = nofile {
        // SAFETY: runs in the child between fork and exec; setrlimit is async-signal-safe
        // and touches nothing of the parent's.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit { rlim_cur: n as libc::rlim_t, rlim_max: n as libc::rlim_t };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("starting radix-sparse serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // Keeps reading the log so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[serve] {line}");
            if let Some(at) = line.find("http://") {
                let addr = line[at + 7..].split('/').next().unwrap_or("").to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("the server did not come up");
    Served { child, addr }
}

/// One HTTP/1.1 exchange on a fresh connection (closed after it); the whole answer.
fn http(addr: &str, method: &str, path: &str, body: Option<&str>, limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn status(answer: &str) -> u16 {
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn idle_sockets_past_the_descriptor_limit_do_not_stop_health() {
    // The issue's repro, scaled down: a 256-descriptor server and 300 idle sockets.
    let s = serve(&[], Some(256));
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(&s.addr).unwrap());
    }
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let health = http(&s.addr, "GET", "/health", None, Duration::from_secs(5));
    assert_eq!(status(&health), 200, "{health:?} after {:?}", t.elapsed());
    let body = r#"{"prompt": "still here", "max_tokens": 3}"#;
    let answer = http(&s.addr, "POST", "/v1/completions", Some(body), Duration::from_secs(5));
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(idle);
}

#[test]
fn sigterm_drains_open_streams_then_exits() {
    let mut s = serve(&["--grace-period", "60"], None);
    let body = r#"{"prompt": "drain", "max_tokens": 2000, "ignore_eos": true, "stream": true}"#;
    let (done_tx, done_rx) = mpsc::channel();
    for _ in 0..2 {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        c.write_all(req.as_bytes()).unwrap();
        // The first bytes of the stream: it is in flight.
        let mut first = [0u8; 64];
        let n = c.read(&mut first).unwrap();
        assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first));
        let tx = done_tx.clone();
        std::thread::spawn(move || {
            let mut rest = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = c.read(&mut buf) {
                rest.extend_from_slice(&buf[..n]);
                if rest.windows(12).any(|w| w == b"data: [DONE]") {
                    break;
                }
            }
            let _ = tx.send((String::from_utf8_lossy(&rest).into_owned(), Instant::now()));
        });
    }
    // A half-sent head must not hold the exit up.
    let mut half = TcpStream::connect(&s.addr).unwrap();
    half.write_all(b"GET /health HTTP/1.1\r\n").unwrap();

    // SAFETY: kill(2) with a child's pid that we have not waited for yet.
    assert_eq!(unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    let health = http(&s.addr, "GET", "/health", None, Duration::from_secs(5));
    assert_eq!(status(&health), 503, "{health}");
    let late = http(
        &s.addr,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt": "late"}"#),
        Duration::from_secs(5),
    );
    assert_eq!(status(&late), 503, "{late}");
    assert!(late.contains("shutting down"), "{late}");

    let mut last_done = Instant::now();
    for _ in 0..2 {
        let (rest, at) = done_rx.recv_timeout(Duration::from_secs(60)).expect("a stream hung");
        assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
        assert!(rest.ends_with("data: [DONE]") || rest.contains("data: [DONE]\n"), "{rest}");
        last_done = last_done.max(at);
    }
    let exit = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            last_done.elapsed() < Duration::from_secs(5),
            "still running after the streams ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    eprintln!("exited {:?} after the last stream ended (grace 60 s)", last_done.elapsed());
}
