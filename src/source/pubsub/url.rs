//! `pubsub://PROJECT/SUBSCRIPTION[?topic=NAME&ordering=true]`: what it names, and where the
//! REST API is (the emulator of `PUBSUB_EMULATOR_HOST`, or the service).

use std::fmt;

use crate::error::SourceError;

/// The service's REST endpoint, used when no emulator is named.
pub const SERVICE_ENDPOINT: &str = "https://pubsub.googleapis.com";

/// Longest topic or subscription name Pub/Sub accepts.
const NAME_MAX: usize = 255;
/// What the dead-letter topic adds to the subscription's name.
const DEAD_SUFFIX: &str = "-dead";

/// What a `pubsub://` URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubSubUrl {
    /// The Google Cloud project.
    pub project: String,
    /// The subscription consumed from (created when missing).
    pub subscription: String,
    /// The topic published to, and the one a missing subscription is created on: `?topic=`,
    /// else the subscription's own name.
    pub topic: String,
    /// Whether a subscription created by the source delivers messages of one ordering key in
    /// order (`?ordering=true`).
    pub ordering: bool,
}

/// Why a `pubsub://` URL is refused: the value, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlError {
    /// The URL as given.
    pub url: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid pubsub url '{}': {} (write pubsub://PROJECT/SUBSCRIPTION[?topic=NAME&ordering=true])",
            self.url, self.reason
        )
    }
}

impl std::error::Error for UrlError {}

impl PubSubUrl {
    /// Parses `pubsub://PROJECT/SUBSCRIPTION[?topic=NAME&ordering=true]`.
    ///
    /// # Errors
    ///
    /// [`UrlError`] naming the URL and what is wrong with it.
    ///
    /// ```
    /// use mayhem::source::pubsub::PubSubUrl;
    /// let url = PubSubUrl::parse("pubsub://demo/orders?topic=events&ordering=true").unwrap();
    /// assert_eq!((url.project.as_str(), url.subscription.as_str()), ("demo", "orders"));
    /// assert_eq!((url.topic.as_str(), url.ordering), ("events", true));
    /// assert_eq!(PubSubUrl::parse("pubsub://demo/jobs").unwrap().topic, "jobs");
    /// assert!(PubSubUrl::parse("pubsub://demo/ab").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let refuse = |reason: String| UrlError {
            url: url.to_owned(),
            reason,
        };
        let rest = url
            .strip_prefix("pubsub://")
            .ok_or_else(|| refuse("it does not start with pubsub://".to_owned()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (project, subscription) = path
            .split_once('/')
            .ok_or_else(|| refuse("no subscription after the project".to_owned()))?;
        check_project(project).map_err(refuse)?;
        check_name("subscription", subscription).map_err(refuse)?;
        if subscription.len() + DEAD_SUFFIX.len() > NAME_MAX {
            return Err(refuse(format!(
                "subscription '{subscription}' is {} characters: its dead-letter topic \
                 '{subscription}{DEAD_SUFFIX}' must fit Pub/Sub's {NAME_MAX}, so at most {}",
                subscription.len(),
                NAME_MAX - DEAD_SUFFIX.len()
            )));
        }
        let mut parsed = PubSubUrl {
            project: project.to_owned(),
            subscription: subscription.to_owned(),
            topic: subscription.to_owned(),
            ordering: false,
        };
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            match pair.split_once('=') {
                Some(("topic", topic)) => {
                    check_name("topic", topic).map_err(refuse)?;
                    parsed.topic = topic.to_owned();
                }
                Some(("ordering", "true")) => parsed.ordering = true,
                Some(("ordering", "false")) => parsed.ordering = false,
                _ => return Err(refuse(format!("unknown parameter '{pair}'"))),
            }
        }
        Ok(parsed)
    }

    /// `projects/{project}/subscriptions/{subscription}`.
    pub fn subscription_path(&self) -> String {
        format!(
            "projects/{}/subscriptions/{}",
            self.project, self.subscription
        )
    }

    /// `projects/{project}/topics/{topic}`.
    pub fn topic_path(&self) -> String {
        format!("projects/{}/topics/{}", self.project, self.topic)
    }

    /// The dead-letter topic: `projects/{project}/topics/{subscription}-dead`.
    pub fn dead_topic_path(&self) -> String {
        format!(
            "projects/{}/topics/{}{DEAD_SUFFIX}",
            self.project, self.subscription
        )
    }
}

impl fmt::Display for PubSubUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pubsub://{}/{}", self.project, self.subscription)
    }
}

/// Checks a `PUBSUB_EMULATOR_HOST` value: `host:port` (a name or an IPv4 address, or an IPv6
/// address in brackets, and a port from 1 to 65535), optionally behind `http://` or
/// `https://`.
///
/// ```
/// use mayhem::source::pubsub::check_emulator_host;
/// assert!(check_emulator_host("127.0.0.1:8085").is_ok());
/// assert!(check_emulator_host("http://[::1]:8085").is_ok());
/// assert!(check_emulator_host("localhost").is_err());
/// assert!(check_emulator_host("127.0.0.1:1/x y").is_err());
/// ```
///
/// # Errors
///
/// [`SourceError::Backend`] naming the value and what is wrong with it.
pub fn check_emulator_host(value: &str) -> Result<(), SourceError> {
    let bad = |why: &str| {
        SourceError::Backend(format!(
            "invalid PUBSUB_EMULATOR_HOST '{value}': {why} (write host:port)"
        ))
    };
    let rest = value.trim();
    let rest = rest
        .strip_prefix("http://")
        .or_else(|| rest.strip_prefix("https://"))
        .unwrap_or(rest);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(1..) => {}
        _ => return Err(bad("the port is not a number from 1 to 65535")),
    }
    let name_ok = |name: &str| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => name_ok(host),
    };
    if !host_ok {
        return Err(bad("the host is not a name or an address"));
    }
    Ok(())
}

/// The REST base URL: `http://{PUBSUB_EMULATOR_HOST}` when an emulator is named (plain HTTP,
/// no credentials, as Google's clients do), else the service.
pub fn endpoint(emulator_host: Option<&str>) -> String {
    match emulator_host.map(str::trim).filter(|host| !host.is_empty()) {
        Some(host) if host.starts_with("http://") || host.starts_with("https://") => {
            host.trim_end_matches('/').to_owned()
        }
        Some(host) => format!("http://{host}"),
        None => SERVICE_ENDPOINT.to_owned(),
    }
}

/// A project id: 1 to 100 characters of `[a-z0-9-.:]` (domain-scoped ids hold `.` and `:`).
fn check_project(project: &str) -> Result<(), String> {
    let good = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.:".contains(c);
    if project.is_empty() || project.len() > 100 || !project.chars().all(good) {
        return Err(format!(
            "project '{project}' must be 1 to 100 characters of a-z, 0-9, '-', '.' and ':'"
        ));
    }
    Ok(())
}

/// Pub/Sub's rule for topic and subscription names: 3 to 255 characters, starting with a
/// letter, of letters, digits and `-_.~+%`, not starting with `goog`.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let good = |c: char| c.is_ascii_alphanumeric() || "-_.~+%".contains(c);
    if !(3..=NAME_MAX).contains(&name.len())
        || !name.starts_with(|c: char| c.is_ascii_alphabetic())
        || !name.chars().all(good)
        || name.to_ascii_lowercase().starts_with("goog")
    {
        return Err(format!(
            "{what} '{name}' must be 3 to 255 characters of letters, digits and -_.~+%, \
             starting with a letter (and not with goog)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_name_the_value_and_the_fault() {
        let long = format!("pubsub://demo/s{}", "x".repeat(250));
        for (url, fault) in [
            ("redis://x/y", "pubsub://"),
            ("pubsub://demo", "no subscription"),
            ("pubsub://Demo/orders", "project 'Demo'"),
            ("pubsub://demo/ab", "subscription 'ab'"),
            ("pubsub://demo/orders?topic=x", "topic 'x'"),
            (
                "pubsub://demo/orders?ordering=yes",
                "unknown parameter 'ordering=yes'",
            ),
            ("pubsub://demo/goog-x", "subscription 'goog-x'"),
            (&long, "dead-letter topic"),
        ] {
            let error = PubSubUrl::parse(url).unwrap_err().to_string();
            assert!(error.contains(url) && error.contains(fault), "{error}");
        }
    }

    #[test]
    fn the_emulator_is_plain_http_and_the_service_https() {
        assert_eq!(endpoint(Some("127.0.0.1:8085")), "http://127.0.0.1:8085");
        assert_eq!(endpoint(Some(" ")), SERVICE_ENDPOINT);
        assert_eq!(endpoint(None), SERVICE_ENDPOINT);
        let url = PubSubUrl::parse("pubsub://p1/sub?topic=top").unwrap();
        assert_eq!(url.subscription_path(), "projects/p1/subscriptions/sub");
        assert_eq!(url.topic_path(), "projects/p1/topics/top");
        assert_eq!(url.dead_topic_path(), "projects/p1/topics/sub-dead");
    }
}
