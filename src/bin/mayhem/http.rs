//! The optional metrics and health endpoint: a small HTTP/1.1 server that no client can hang.
//!
//! - `GET /metrics`: the Prometheus text exposition of the service's counters, the in-flight
//!   gauge and the handling-time histogram.
//! - `GET /healthz`: `200 ok` while running, `503 shutting down` once the shutdown began
//!   (liveness).
//! - `GET /readyz`: `200 ready` while the service takes work; `503` with the reason while it
//!   does not: shutting down, quiet (SIGTSTP), a circuit breaker open, or the source failing
//!   (the last pull failed: reconnecting, or down). A source that retries inside its pull
//!   without returning an error looks ready: the `Source` trait has no reconnecting state.
//!
//! `HEAD` is answered too; `OPTIONS` (on a path, or `OPTIONS *` for the server as a whole)
//! gets `200` with an `Allow` header; other methods get `405` with one. A query string is
//! ignored and a trailing slash tolerated (`/metrics?x=1`, `/metrics/`). Every response closes
//! its connection.
//!
//! # Why hand-written, and its shape
//!
//! tiny_http, used before, gave none of the guarantees an operator needs: one client sending
//! a large `Content-Length` and holding the socket open blocked every other client and the
//! exit; and it spawned a thread per connection (900 idle connections made 814 threads).
//!
//! Here one thread (`mayhem-http`) runs a single-threaded executor on which every connection
//! is a task over a non-blocking socket (`async-io`, the reactor the library's timers already
//! use): an idle or slow client costs a task and a socket, never a thread. Each request must
//! arrive whole within [`REQUEST_DEADLINE`], its head within [`MAX_HEAD`] bytes and its body
//! within [`MAX_BODY`] bytes; the response must be taken within [`WRITE_DEADLINE`]. At most
//! [`MAX_CONNECTIONS`] connections are open: a new one evicts the oldest, so a flood of idle
//! connections cannot lock a health probe out. Stopping drops the executor, which cancels
//! every connection task: shutdown never waits on a client.
//!
//! `/metrics` is built from the service's own counters (atomics, cheap) and from a snapshot
//! of the source's counters that a second thread (`mayhem-http-stats`) refreshes every
//! [`REFRESH`]. A slow backend (a Redis that takes seconds to answer) therefore delays only
//! that thread, never a response; the snapshot's age is exported as
//! `mayhem_source_stats_age_seconds`. `/healthz` reads one atomic flag, `/readyz` four.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::{Shutdown as SocketShutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use async_executor::{LocalExecutor, Task};
use async_io::{Async, Timer};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use log::{debug, info, warn};
use mayhem::{Metrics, Pause, Shutdown, SourceStats};

/// How long a client has to send a whole request (head and body).
pub(crate) const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long a client has to take the response.
pub(crate) const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// How long a closed connection's unread input is drained, so that the client reads the
/// response instead of a reset.
const LINGER: Duration = Duration::from_secs(1);
/// The largest request line plus headers accepted.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// The largest request body accepted (and discarded: no route takes a body).
pub(crate) const MAX_BODY: usize = 1024;
/// The most connections open at once; a new one evicts the oldest.
pub(crate) const MAX_CONNECTIONS: usize = 128;
/// How often the source's counters are read for `/metrics`.
pub(crate) const REFRESH: Duration = Duration::from_secs(1);
/// The pause after a failed `accept` (for example when out of file descriptors), so that
/// the accept loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The least time between two warnings about failed `accept`s (no log storm).
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// A running endpoint; `stop` ends it.
pub(crate) struct Endpoint {
    /// Dropping it ends the server thread's executor, and with it every connection.
    stop: async_channel::Sender<()>,
    /// The server thread.
    thread: JoinHandle<()>,
    /// Shared with the snapshot thread.
    snapshot: Arc<Snapshot>,
}

/// The source's counters as last read by the snapshot thread.
struct Snapshot {
    /// The counters and when they were read (`None` until the first read ends), and whether
    /// the endpoint stopped.
    state: Mutex<SnapshotState>,
    /// Wakes the snapshot thread when the endpoint stops.
    stopped: Condvar,
}

/// What [`Snapshot`] guards.
struct SnapshotState {
    /// The last counters read.
    stats: SourceStats,
    /// When they were read.
    taken: Option<Instant>,
    /// Set by `stop`: the snapshot thread ends.
    stopped: bool,
}

/// What every connection task reads.
struct Shared {
    /// The handlers' metrics.
    metrics: Arc<Metrics>,
    /// The source's counters.
    snapshot: Arc<Snapshot>,
    /// Read by `/healthz` and `/readyz`.
    shutdown: Shutdown,
    /// Read by `/readyz`: quiet mode, open breakers, a failing source.
    pause: Pause,
}

/// A response: its status, headers and body.
struct Response {
    /// The status code.
    status: u16,
    /// The body.
    body: String,
    /// The `Content-Type`.
    content_type: &'static str,
    /// Whether to add `Allow: GET, HEAD, OPTIONS` (405 and `OPTIONS` responses).
    allow: bool,
    /// Whether the body is left out (the answer to `HEAD`).
    head: bool,
}

/// Why a request was not read whole.
enum Refusal {
    /// The client closed or reset the connection: nothing to answer.
    Gone,
    /// A response to send before closing.
    Answer(Response),
}

impl Endpoint {
    /// Binds `addr` and serves until `stop`; `stats` reads the source's counters (it may be
    /// slow: it runs on its own thread).
    ///
    /// # Errors
    ///
    /// A one-line description when the address cannot be bound or a thread not started.
    pub(crate) fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        stats: impl Fn() -> Option<SourceStats> + Send + 'static,
        shutdown: Shutdown,
        pause: Pause,
    ) -> Result<Endpoint, String> {
        let listener = Async::<TcpListener>::bind(addr)
            .map_err(|error| format!("cannot serve metrics on {addr}: {error}"))?;
        let bound = listener.get_ref().local_addr().unwrap_or(addr);
        let snapshot = Arc::new(Snapshot {
            state: Mutex::new(SnapshotState {
                stats: SourceStats::default(),
                taken: None,
                stopped: false,
            }),
            stopped: Condvar::new(),
        });
        {
            let snapshot = Arc::clone(&snapshot);
            // Not joined on stop: it may be inside a slow read of the source, and the exit
            // must not wait for that. It ends at its next look at the stop flag.
            thread::Builder::new()
                .name("mayhem-http-stats".into())
                .spawn(move || snapshot.refresh(stats))
                .map_err(|error| format!("cannot start the metrics thread: {error}"))?;
        }
        let shared = Arc::new(Shared {
            metrics,
            snapshot: Arc::clone(&snapshot),
            shutdown,
            pause,
        });
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let thread = thread::Builder::new()
            .name("mayhem-http".into())
            .spawn(move || {
                // A single-threaded executor: every connection is a task on this one thread,
                // so the thread count does not depend on the number of clients.
                let executor = LocalExecutor::new();
                async_io::block_on(executor.run(future::or(
                    accept_loop(&executor, listener, shared),
                    async {
                        // Ends when `stop` is dropped.
                        let _ = stopped.recv().await;
                    },
                )));
                // Dropping the executor here cancels every connection task and closes its
                // socket, whatever its client is doing.
            });
        let thread = match thread {
            Ok(thread) => thread,
            Err(error) => {
                snapshot.stop();
                return Err(format!("cannot start the metrics thread: {error}"));
            }
        };
        info!(
            "Serving metrics on http://{bound}/metrics, health on http://{bound}/healthz and \
             readiness on http://{bound}/readyz"
        );
        Ok(Endpoint {
            stop,
            thread,
            snapshot,
        })
    }

    /// Stops serving: closes every connection at once and joins the server thread, which
    /// never blocks on a client.
    pub(crate) fn stop(self) {
        self.snapshot.stop();
        drop(self.stop);
        let _ = self.thread.join();
    }
}

impl Snapshot {
    /// The snapshot thread: reads the counters every [`REFRESH`] until stopped.
    fn refresh(&self, stats: impl Fn() -> Option<SourceStats>) {
        loop {
            // Read outside the lock: this is the call that may be slow.
            let read = stats();
            let mut state = self.lock();
            if let Some(read) = read {
                state.stats = read;
                state.taken = Some(Instant::now());
            }
            let deadline = Instant::now() + REFRESH;
            while !state.stopped {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self
                    .stopped
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if state.stopped {
                return;
            }
        }
    }

    /// Ends the snapshot thread at its next look.
    fn stop(&self) {
        self.lock().stopped = true;
        self.stopped.notify_all();
    }

    /// The last counters read, and their age (`None` before the first read).
    fn read(&self) -> (SourceStats, Option<Duration>) {
        let state = self.lock();
        (state.stats, state.taken.map(|taken| taken.elapsed()))
    }

    /// The state; a panic elsewhere while holding the lock cannot leave it inconsistent
    /// (every write is one assignment), so a poisoned lock is used as is.
    fn lock(&self) -> std::sync::MutexGuard<'_, SnapshotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Accepts connections and spawns one task each, evicting the oldest beyond
/// [`MAX_CONNECTIONS`].
async fn accept_loop(
    executor: &LocalExecutor<'static>,
    listener: Async<TcpListener>,
    shared: Arc<Shared>,
) {
    // The connection tasks, oldest first. Dropping a `Task` cancels it and closes its socket.
    let mut connections: VecDeque<Task<()>> = VecDeque::new();
    let mut last_warning: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if connections.len() >= MAX_CONNECTIONS {
                    connections.retain(|task| !task.is_finished());
                }
                if connections.len() >= MAX_CONNECTIONS {
                    debug!("Closing the oldest of {MAX_CONNECTIONS} HTTP connections");
                    connections.pop_front();
                }
                let shared = Arc::clone(&shared);
                connections.push_back(executor.spawn(async move {
                    serve(stream, &shared).await;
                }));
            }
            Err(error) => {
                if last_warning.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                    warn!("Could not accept an HTTP connection: {error}");
                    last_warning = Some(Instant::now());
                }
                Timer::after(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves one request on one connection, then closes it.
async fn serve(mut stream: Async<TcpStream>, shared: &Shared) {
    let deadline = async {
        Timer::after(REQUEST_DEADLINE).await;
        Err(Refusal::Answer(Response::text(408, "request timeout\n")))
    };
    let response = match future::or(read_request(&mut stream), deadline).await {
        Ok((method, target)) => route(&method, &target, shared),
        Err(Refusal::Answer(response)) => response,
        Err(Refusal::Gone) => return,
    };
    let bytes = response.to_bytes();
    let write = async {
        let _ = stream.write_all(&bytes).await;
        let _ = stream.flush().await;
    };
    future::or(write, async {
        Timer::after(WRITE_DEADLINE).await;
    })
    .await;
    // Half-close, then drain what the client still sends for a moment: closing a socket with
    // unread input makes the kernel send a reset, which can destroy the response in flight.
    let _ = stream.get_ref().shutdown(SocketShutdown::Write);
    let drain = async {
        let mut sink = [0u8; 1024];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(read) => left = left.saturating_sub(read),
            }
        }
    };
    future::or(drain, async {
        Timer::after(LINGER).await;
    })
    .await;
}

/// Reads one request: its method and target. The body, if any, is read and discarded.
async fn read_request(stream: &mut Async<TcpStream>) -> Result<(String, String), Refusal> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(end) = find_head_end(&buffer) {
            break end;
        }
        if buffer.len() > MAX_HEAD {
            return Err(Refusal::Answer(Response::text(
                431,
                "request header fields too large\n",
            )));
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(Refusal::Gone),
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
    };
    if head_end > MAX_HEAD {
        return Err(Refusal::Answer(Response::text(
            431,
            "request header fields too large\n",
        )));
    }
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Answer(Response::text(400, "bad request\n")));
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Err(Refusal::Answer(Response::text(400, "bad request\n")));
    }
    let mut body_length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Refusal::Answer(Response::text(
                411,
                "length required: no route takes a body\n",
            )));
        }
        if name.eq_ignore_ascii_case("content-length") {
            body_length = match value.trim().parse::<usize>() {
                Ok(length) if length <= MAX_BODY => length,
                Ok(_) => {
                    return Err(Refusal::Answer(Response::text(
                        413,
                        "payload too large: no route takes a body\n",
                    )))
                }
                Err(_) => return Err(Refusal::Answer(Response::text(400, "bad request\n"))),
            };
        }
    }
    // The body is read (and discarded) so that the response is not lost to a reset.
    let mut have = buffer.len() - head_end;
    while have < body_length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(Refusal::Gone),
            Ok(read) => have += read,
        }
    }
    Ok((method.to_owned(), target.to_owned()))
}

/// The end of the request head (after its blank line), if it arrived.
fn find_head_end(buffer: &[u8]) -> Option<usize> {
    let crlf = buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|at| at + 4);
    let lf = buffer
        .windows(2)
        .position(|window| window == b"\n\n")
        .map(|at| at + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The response to a request.
fn route(method: &str, target: &str, shared: &Shared) -> Response {
    // The query string is ignored and a trailing slash tolerated; a target in absolute
    // form (`http://host/metrics`, which RFC 9112 asks servers to accept) is its path.
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let path = absolute_form_path(path).unwrap_or(path);
    let path = match path.strip_suffix('/') {
        Some(stripped) if !stripped.is_empty() => stripped,
        _ => path,
    };
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        // RFC 9110 9.3.7: the methods a path (or, for `*`, the server) allows.
        "OPTIONS" if known || path == "*" => {
            let mut response = Response::text(200, "");
            response.allow = true;
            return response;
        }
        _ if known => {
            let mut response = Response::text(405, "method not allowed\n");
            response.allow = true;
            return response;
        }
        _ => return Response::text(404, "not found\n"),
    };
    let mut response = match path {
        "/metrics" => Response {
            status: 200,
            body: metrics_text(shared),
            content_type: "text/plain; version=0.0.4",
            allow: false,
            head: false,
        },
        "/healthz" if shared.shutdown.is_triggered() => Response::text(503, "shutting down\n"),
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => match not_ready(shared) {
            Some(reason) => Response::text(503, reason),
            None => Response::text(200, "ready\n"),
        },
        _ => Response::text(404, "not found\n"),
    };
    response.head = head;
    response
}

/// The path of a target in absolute form (`http://host:port/path`, any case of the scheme),
/// `/` when it names no path; `None` for any other form.
fn absolute_form_path(target: &str) -> Option<&str> {
    let scheme_end = target.find("://")?;
    let scheme = &target[..scheme_end];
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    Some(rest.find('/').map_or("/", |at| &rest[at..]))
}

/// Why the service takes no work now, or `None` when it does (the body of a 503 `/readyz`).
fn not_ready(shared: &Shared) -> Option<&'static str> {
    if shared.shutdown.is_triggered() {
        Some("shutting down\n")
    } else if shared.pause.is_quiet() {
        Some("quiet\n")
    } else if shared.pause.breakers_open() > 0 {
        Some("circuit breaker open\n")
    } else if shared.pause.source_failing() {
        Some("source failing\n")
    } else {
        None
    }
}

/// The exposition: the service's counters, the source's snapshot, and the snapshot's age.
fn metrics_text(shared: &Shared) -> String {
    let (stats, age) = shared.snapshot.read();
    let mut text = shared.metrics.prometheus(&stats);
    // A missing first read shows as an age of +Inf, so an alert on the age also catches a
    // source that never answered.
    let age = age.map_or_else(
        || "+Inf".to_owned(),
        |age| format!("{:.3}", age.as_secs_f64()),
    );
    let _ = write!(
        text,
        "# HELP mayhem_source_stats_age_seconds Age of the source's counters in this exposition.\n\
         # TYPE mayhem_source_stats_age_seconds gauge\n\
         mayhem_source_stats_age_seconds {age}\n"
    );
    text
}

impl Response {
    /// A plain-text response.
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            body: body.to_owned(),
            content_type: "text/plain",
            allow: false,
            head: false,
        }
    }

    /// The bytes on the wire. The answer to `HEAD` has the headers `GET` would get,
    /// `Content-Length` included, and no body.
    fn to_bytes(&self) -> Vec<u8> {
        let body = self.body.as_str();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD, OPTIONS\r\n");
        }
        out.push_str("\r\n");
        if !self.head {
            out.push_str(body);
        }
        out.into_bytes()
    }
}

/// The reason phrase of a status code.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Sends a GET and returns the status line and how long the answer took.
    fn get(addr: SocketAddr, path: &str) -> (String, Duration) {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        let status = response.lines().next().unwrap_or_default().to_owned();
        (status, started.elapsed())
    }

    #[test]
    fn a_slow_source_delays_neither_metrics_nor_health() {
        let free = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("address");
        drop(free);
        // Every read of the source's counters takes 3 s, like a stalled Redis.
        let slow = || {
            thread::sleep(Duration::from_secs(3));
            Some(SourceStats::default())
        };
        let endpoint = Endpoint::start(addr, Arc::default(), slow, Shutdown::new(), Pause::new())
            .expect("start the endpoint");
        for path in ["/metrics", "/healthz", "/readyz", "/metrics", "/healthz"] {
            let (status, took) = get(addr, path);
            assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
            assert!(took < Duration::from_millis(500), "{path} took {took:?}");
        }
        // Stopping does not wait for the read in progress either.
        let started = Instant::now();
        endpoint.stop();
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn the_exposition_says_how_old_the_source_s_counters_are() {
        let snapshot = Snapshot {
            state: Mutex::new(SnapshotState {
                stats: SourceStats::default(),
                taken: None,
                stopped: false,
            }),
            stopped: Condvar::new(),
        };
        let shared = Shared {
            metrics: Arc::default(),
            snapshot: Arc::new(snapshot),
            shutdown: Shutdown::new(),
            pause: Pause::new(),
        };
        assert!(metrics_text(&shared).ends_with("\nmayhem_source_stats_age_seconds +Inf\n"));
        shared.snapshot.lock().taken = Some(Instant::now());
        let text = metrics_text(&shared);
        assert!(
            text.contains("\nmayhem_source_stats_age_seconds 0.0"),
            "{text}"
        );
    }

    /// What the endpoint reads, with no source counters taken yet.
    fn idle_shared() -> Shared {
        Shared {
            metrics: Arc::default(),
            snapshot: Arc::new(Snapshot {
                state: Mutex::new(SnapshotState {
                    stats: SourceStats::default(),
                    taken: None,
                    stopped: false,
                }),
                stopped: Condvar::new(),
            }),
            shutdown: Shutdown::new(),
            pause: Pause::new(),
        }
    }

    #[test]
    fn readiness_names_what_holds_the_service_back() {
        let shared = idle_shared();
        let status = |shared: &Shared| {
            let response = route("GET", "/readyz", shared);
            (response.status, response.body)
        };
        assert_eq!(status(&shared), (200, "ready\n".to_owned()));
        shared.pause.set_quiet(true);
        assert_eq!(status(&shared), (503, "quiet\n".to_owned()));
        shared.pause.set_quiet(false);
        shared.shutdown.trigger(mayhem::ShutdownReason::Requested);
        assert_eq!(status(&shared), (503, "shutting down\n".to_owned()));
        assert_eq!(route("POST", "/readyz", &shared).status, 405);
    }

    #[test]
    fn options_names_the_allowed_methods_for_a_path_and_for_the_server() {
        let shared = idle_shared();
        for target in ["*", "/metrics", "/healthz/", "/readyz?probe=1"] {
            let response = route("OPTIONS", target, &shared);
            assert_eq!(
                (response.status, response.allow, response.body.as_str()),
                (200, true, ""),
                "{target}"
            );
        }
        assert_eq!(route("OPTIONS", "/nothing", &shared).status, 404);
        let response = route("DELETE", "/metrics", &shared);
        assert_eq!((response.status, response.allow), (405, true));
    }
}
