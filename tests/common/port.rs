//! A free loopback port: for the tests (through `common`) and for the soaks, whose examples
//! include this file alone.

use std::net::TcpListener;

/// A loopback port free when asked.
///
/// # Errors
///
/// The system's refusal to bind one.
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|error| format!("free port: {error}"))
}
