//! The optional metrics and health endpoint: a small synchronous HTTP server (tiny_http) on
//! its own std thread, so no async runtime is involved.
//!
//! - `GET /metrics`: the Prometheus text exposition of the service's counters, the in-flight
//!   gauge and the handling-time histogram.
//! - `GET /healthz`: `200 ok` while running, `503 shutting down` once the shutdown began.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use log::{info, warn};
use mayhem::{Metrics, Shutdown, Source};
use tiny_http::{Header, Response, Server};

/// A running endpoint; `stop` ends its thread.
pub(crate) struct Endpoint {
    /// The server, shared with its thread so `stop` can unblock it.
    server: Arc<Server>,
    /// The serving thread.
    thread: JoinHandle<()>,
}

impl Endpoint {
    /// Binds `addr` and serves until `stop`.
    ///
    /// # Errors
    ///
    /// A one-line description when the address cannot be bound.
    pub(crate) fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        source: Arc<dyn Source>,
        shutdown: Shutdown,
    ) -> Result<Endpoint, String> {
        let server = Arc::new(
            Server::http(addr)
                .map_err(|error| format!("cannot serve metrics on {addr}: {error}"))?,
        );
        let bound = server
            .server_addr()
            .to_ip()
            .map_or_else(|| addr.to_string(), |ip| ip.to_string());
        info!("Serving metrics on http://{bound}/metrics and health on http://{bound}/healthz");
        let serving = server.clone();
        let thread = thread::Builder::new()
            .name("mayhem-http".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let (status, body, content_type) = match request.url() {
                        "/metrics" => (
                            200,
                            metrics.prometheus(&source.stats()),
                            "text/plain; version=0.0.4",
                        ),
                        "/healthz" if shutdown.is_triggered() => {
                            (503, "shutting down\n".to_owned(), "text/plain")
                        }
                        "/healthz" => (200, "ok\n".to_owned(), "text/plain"),
                        _ => (404, "not found\n".to_owned(), "text/plain"),
                    };
                    let mut response = Response::from_string(body).with_status_code(status);
                    if let Ok(header) = Header::from_bytes("Content-Type", content_type) {
                        response = response.with_header(header);
                    }
                    if let Err(error) = request.respond(response) {
                        warn!("Could not answer an HTTP request: {error}");
                    }
                }
            })
            .map_err(|error| format!("cannot start the metrics thread: {error}"))?;
        Ok(Endpoint { server, thread })
    }

    /// Stops serving and joins the thread.
    pub(crate) fn stop(self) {
        self.server.unblock();
        let _ = self.thread.join();
    }
}
