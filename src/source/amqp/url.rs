//! The address: parsing and the CA file (redaction is the kit's, one rule for every broker).

use std::path::Path;
use std::str::FromStr;

use lapin::uri::AMQPUri;

use super::HEARTBEAT_SECS;
use crate::error::SourceError;
use crate::source::kit::Secrets;

/// The host as written in the URL's authority (brackets of an IPv6 address removed).
pub(super) fn written_host(url: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..end];
    let host_port = authority
        .rfind('@')
        .map_or(authority, |at| &authority[at + 1..]);
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// Parses an `amqp://USER:PASS@HOST:PORT/VHOST` address (or `amqps://` with the feature
/// `amqp-tls`), without connecting.
///
/// ```
/// use mayhem::source::amqp::parse_url;
/// assert!(parse_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
/// assert!(parse_url("amqp://127.0.0.1:notaport").is_err());
/// // `amqps://` needs the feature `amqp-tls`.
/// assert_eq!(parse_url("amqps://127.0.0.1").is_ok(), cfg!(feature = "amqp-tls"));
/// ```
///
/// # Errors
///
/// [`SourceError::Backend`] saying what is wrong (the address itself, which may hold a
/// password, is not repeated).
pub fn parse_url(url: &str) -> Result<(), SourceError> {
    parse_uri(url).map(|_| ())
}

/// The parsed address. lapin's parser takes the host from the URL's domain only, so an IP
/// address would become `localhost`: the host is set again as written. The heartbeat is
/// [`HEARTBEAT_SECS`] unless the URL sets one.
pub(super) fn parse_uri(url: &str) -> Result<AMQPUri, SourceError> {
    let secrets = Secrets::of(url);
    if url.starts_with("amqps://") && !cfg!(feature = "amqp-tls") {
        return Err(SourceError::Backend(
            "amqps:// needs TLS, which this build lacks: build with the cargo feature amqp-tls"
                .to_owned(),
        ));
    }
    if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
        return Err(SourceError::Backend(
            "invalid amqp url: the scheme must be amqp:// or amqps://".to_owned(),
        ));
    }
    let mut uri = AMQPUri::from_str(url).map_err(|error| {
        SourceError::Backend(format!("invalid amqp url: {}", secrets.scrub(&error)))
    })?;
    if uri.authority.port == 0 {
        // Nothing listens there: connecting would be retried as an outage.
        return Err(SourceError::Backend(
            "invalid amqp url: port 0 cannot be connected to".to_owned(),
        ));
    }
    if let Some(host) = written_host(url) {
        uri.authority.host = host;
    }
    uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
    Ok(uri)
}

/// Reads a PEM file of CA certificates for [`AmqpConfig::ca_file`](super::AmqpConfig::ca_file).
///
/// ```
/// use mayhem::source::amqp::read_ca_file;
/// let error = read_ca_file("/nonexistent/ca.pem".as_ref()).unwrap_err();
/// assert!(error.to_string().contains("/nonexistent/ca.pem"));
/// ```
///
/// # Errors
///
/// [`SourceError::Backend`] naming the file when it cannot be read or holds no PEM
/// certificate.
pub fn read_ca_file(path: &Path) -> Result<String, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        SourceError::Backend(format!(
            "cannot read the amqp CA file {}: {error}",
            path.display()
        ))
    })?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(SourceError::Backend(format!(
            "the amqp CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::amqp::AmqpConfig;

    #[test]
    fn the_password_never_shows() {
        let config = AmqpConfig {
            url: "amqp://user:s3cret@127.0.0.1:1/%2f".to_owned(),
            ..AmqpConfig::default()
        };
        for shown in [format!("{config:?}"), config.to_string()] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("amqp://user:***@127.0.0.1:1/%2f"), "{shown}");
        }
        let error = parse_url("amqp://user:s3cret@127.0.0.1:notaport").expect_err("bad port");
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }

    #[test]
    fn an_ip_host_is_kept_as_written() {
        let uri = parse_uri("amqp://guest:guest@127.0.0.1:5673/v").expect("parses");
        assert_eq!(
            (
                uri.authority.host.as_str(),
                uri.authority.port,
                uri.vhost.as_str()
            ),
            ("127.0.0.1", 5673, "v")
        );
        let uri = parse_uri("amqp://[::1]:5673").expect("parses");
        assert_eq!(uri.authority.host, "::1");
    }

    #[test]
    fn the_heartbeat_is_short_unless_the_url_sets_one() {
        let uri = parse_uri("amqp://guest:guest@127.0.0.1:5673/v").expect("parses");
        assert_eq!(uri.query.heartbeat, Some(HEARTBEAT_SECS));
        let uri = parse_uri("amqp://127.0.0.1:5673/v?heartbeat=30").expect("parses");
        assert_eq!(uri.query.heartbeat, Some(30));
    }
}
