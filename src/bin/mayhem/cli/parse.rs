//! The value parsers of the flags: durations, `auto` windows and deadlines, addresses,
//! rates, names, and `--source` (whose errors hide any password).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use mayhem::database::Outage;

use super::{AckDeadline, MaxInFlight, SourceKind};

/// Parses a duration like `250ms`, `2s` or `1m 30s`; a bare `0` means none.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim())
        .map_err(|error| format!("{error} (write a duration like 250ms or 2s)"))
}

/// Checks `--amqp-ca-file`: a readable file holding a PEM certificate.
#[cfg(feature = "amqp")]
pub(crate) fn ca_file(text: &str) -> Result<std::path::PathBuf, String> {
    let path = std::path::PathBuf::from(text);
    mayhem::source::amqp::read_ca_file(&path)
        .map(|_| path)
        .map_err(|error| match error {
            mayhem::SourceError::Backend(text) => text,
            other => other.to_string(),
        })
}

/// Parses `--max-in-flight`: a count, or `auto` (any case).
pub(super) fn max_in_flight(text: &str) -> Result<MaxInFlight, String> {
    if text.trim().eq_ignore_ascii_case("auto") {
        return Ok(MaxInFlight::Auto);
    }
    text.trim()
        .parse()
        .map(MaxInFlight::Fixed)
        .map_err(|error| format!("{error} (write a count, or auto)"))
}

/// Parses `--ack-deadline`: a duration, or `auto` (any case).
pub(super) fn ack_deadline(text: &str) -> Result<AckDeadline, String> {
    if text.trim().eq_ignore_ascii_case("auto") {
        return Ok(AckDeadline::Auto);
    }
    duration(text)
        .map(AckDeadline::Fixed)
        .map_err(|error| format!("{error}, or auto"))
}

/// Parses `--db-outage AT+FOR`.
pub(super) fn outage(text: &str) -> Result<Outage, String> {
    text.parse()
}

/// Parses `HOST:PORT` (a name is resolved once, at start).
pub(super) fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    match text.to_socket_addrs().map(|mut addrs| addrs.next()) {
        Ok(Some(addr)) => Ok(addr),
        _ => Err("expected HOST:PORT, like 127.0.0.1:9090".to_owned()),
    }
}

/// Parses a probability between 0 and 1.
pub(super) fn rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err("must be a number between 0 and 1".to_owned()),
    }
}

/// The parser of `--source`: its error repeats the value with any password replaced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceParser;

impl clap::builder::TypedValueParser for SourceParser {
    type Value = SourceKind;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<SourceKind, clap::Error> {
        let flag = arg.map_or_else(|| "--source".to_owned(), ToString::to_string);
        let invalid = |shown: &str, reason: &str| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value '{shown}' for '{flag}': {reason}\n"),
            )
            .with_cmd(cmd)
        };
        let Some(text) = value.to_str() else {
            return Err(invalid(
                "(not utf-8)",
                "write memory, redis://HOST:PORT/DB, amqp://USER:PASS@HOST:PORT/VHOST or pubsub://PROJECT/SUBSCRIPTION",
            ));
        };
        let shown = redact(text);
        source(text).map_err(|reason| invalid(&shown, &reason))
    }
}

/// `--source` with any password replaced by `***`, for error messages: one rule for every
/// broker's URL.
fn redact(text: &str) -> String {
    mayhem::source::redact_url(text)
}

/// Parses `--source`: `memory`, a `redis://` URL the Redis client accepts, or an `amqp://`
/// URL.
fn source(text: &str) -> Result<SourceKind, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("memory") {
        return Ok(SourceKind::Memory);
    }
    if text.starts_with("amqps://") && !cfg!(feature = "amqp-tls") {
        return Err(
            "amqps:// needs TLS, which this build lacks: build with the cargo feature amqp-tls"
                .to_owned(),
        );
    }
    if text.starts_with("pubsub://") {
        #[cfg(feature = "pubsub")]
        return mayhem::source::pubsub::PubSubUrl::parse(text)
            .map(|_| SourceKind::PubSub(text.to_owned()))
            .map_err(|error| error.reason);
        #[cfg(not(feature = "pubsub"))]
        return Err("this build has no pubsub support (feature pubsub)".to_owned());
    }
    if text.starts_with("amqp://") || text.starts_with("amqps://") {
        #[cfg(feature = "amqp")]
        return mayhem::source::amqp::parse_url(text)
            .map(|()| SourceKind::Amqp(text.to_owned()))
            .map_err(|error| format!("{error} (write amqp://USER:PASS@HOST:PORT/VHOST)"));
        #[cfg(not(feature = "amqp"))]
        return Err("this build has no amqp support (feature amqp)".to_owned());
    }
    if !text.starts_with("redis://") {
        return Err(
            "write memory, redis://HOST:PORT/DB, amqp://USER:PASS@HOST:PORT/VHOST or pubsub://PROJECT/SUBSCRIPTION".to_owned(),
        );
    }
    #[cfg(feature = "redis")]
    {
        use mayhem::source::redis::parse_url;
        parse_url(text)
            .map(|()| SourceKind::Redis(text.to_owned()))
            .map_err(|error| format!("{error} (write redis://HOST:PORT/DB)"))
    }
    #[cfg(not(feature = "redis"))]
    Err("this build has no redis support (feature redis)".to_owned())
}

/// A duration as the command line writes it, for the defaults `--help` shows: the defaults
/// themselves live in the library's configuration sections, stated once.
pub(super) fn human(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Parses a stream, group or consumer name: not empty, no whitespace.
pub(crate) fn name(text: &str) -> Result<String, String> {
    if text.is_empty() || text.chars().any(char::is_whitespace) {
        return Err("must be a non-empty name without spaces".to_owned());
    }
    Ok(text.to_owned())
}

/// `hostname-pid`: unique per running instance on a host. A hostname that is empty or not
/// valid UTF-8 is replaced by `mayhem`.
#[cfg(feature = "redis")]
pub(super) fn default_consumer_name() -> String {
    let host = gethostname::gethostname()
        .into_string()
        .ok()
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty() && !host.chars().any(char::is_whitespace))
        .unwrap_or_else(|| "mayhem".to_owned());
    format!("{host}-{}", std::process::id())
}
