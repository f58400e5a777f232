//! Secrets kept out of log lines and errors, by one rule for every broker's URL: the
//! password of the authority (`user:PASSWORD@`, or a lone `SECRET@`, which Redis reads as a
//! password) and a `password=` or `pass=` query value are shown as `***`; an error text is
//! made one line of at most [`MAX_ERROR_TEXT`] bytes without them.

/// The longest error text a log line carries; a longer one is cut and ends in `...`.
const MAX_ERROR_TEXT: usize = 240;

/// The URL with its secrets replaced by `***` (the address is left as written otherwise).
///
/// ```
/// use mayhem::source::redact_url;
/// assert_eq!(redact_url("redis://:hunter2@db:6379/0"), "redis://:***@db:6379/0");
/// assert_eq!(redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
/// assert_eq!(redact_url("redis://db:6379/0?password=x"), "redis://db:6379/0?password=***");
/// assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
/// ```
pub fn redact_url(url: &str) -> String {
    let parts = Parts::of(url);
    let authority = match parts.userinfo {
        Some(userinfo) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{}", parts.host),
            None => format!("***@{}", parts.host),
        },
        None => parts.host.to_owned(),
    };
    let tail = match parts.query {
        Some(query) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if is_secret_key(key) => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{}?{}", parts.path, query.join("&"))
        }
        None => parts.path.to_owned(),
    };
    format!("{}{authority}{tail}", parts.scheme)
}

/// What a URL holds that no log line may show, each as written and percent-decoded.
#[derive(Clone, Default)]
pub(crate) struct Secrets(Vec<String>);

impl Secrets {
    /// The secrets of `url` (see the module's rule).
    pub(crate) fn of(url: &str) -> Secrets {
        let parts = Parts::of(url);
        let mut written: Vec<&str> = Vec::new();
        if let Some(userinfo) = parts.userinfo {
            written.push(userinfo.split_once(':').map_or(userinfo, |(_, pass)| pass));
        }
        if let Some(query) = parts.query {
            written.extend(query.split('&').filter_map(|pair| {
                pair.split_once('=')
                    .filter(|(key, _)| is_secret_key(key))
                    .map(|(_, value)| value)
            }));
        }
        let mut all: Vec<String> = Vec::new();
        for secret in written.into_iter().filter(|secret| !secret.is_empty()) {
            all.push(secret.to_owned());
            all.push(percent_decoded(secret));
        }
        // The longest first, so a secret that holds another is hidden whole.
        all.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        all.dedup();
        Secrets(all)
    }

    /// `text` as one line of at most [`MAX_ERROR_TEXT`] bytes without any of the secrets:
    /// each is replaced by `***` where it stands as a word (see [`hide`]), control
    /// characters become spaces, and runs of white space one space.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut line = self
            .0
            .iter()
            .fold(text.to_owned(), |text, secret| hide(&text, secret));
        line = line
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if line.len() > MAX_ERROR_TEXT {
            let mut end = MAX_ERROR_TEXT;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push_str("...");
        }
        line
    }
}

/// `text` with `secret` replaced by `***` wherever it stands as a word of its own: no
/// letter or digit right before or after it, as an address quotes a password between `:`
/// and `@`. An occurrence inside a longer word is not the password echoed, and replacing it
/// mangled the message (a password `p` turned `invalid port number` into
/// `invalid ***ort number`, naming nothing).
fn hide(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return text.to_owned();
    }
    let alone = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric());
    let mut out = String::with_capacity(text.len());
    let mut start = 0;
    let mut from = 0;
    while let Some(found) = text[from..].find(secret) {
        let at = from + found;
        let end = at + secret.len();
        if alone(text[..at].chars().next_back()) && alone(text[end..].chars().next()) {
            out.push_str(&text[start..at]);
            out.push_str("***");
            start = end;
            from = end;
        } else {
            // Past the first character of this occurrence: a later one may overlap it.
            from = at + text[at..].chars().next().map_or(1, char::len_utf8);
        }
    }
    out.push_str(&text[start..]);
    out
}

/// Whether a query key names a secret.
fn is_secret_key(key: &str) -> bool {
    key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("pass")
}

/// `text` with its `%XX` escapes decoded (bytes that are not UTF-8 become U+FFFD).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        });
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A URL cut as written: `scheme://` `userinfo@` `host` `path` `?query`.
struct Parts<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    host: &'a str,
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> Parts<'a> {
    fn of(url: &'a str) -> Parts<'a> {
        let (scheme, rest) = match url.find("://") {
            Some(at) => url.split_at(at + 3),
            None => ("", url),
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };
        Parts {
            scheme,
            userinfo,
            host,
            path,
            query,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_by_one_rule_for_every_scheme() {
        assert_eq!(
            redact_url("redis://user:pw@h:1/0?password=x&db=2"),
            "redis://user:***@h:1/0?password=***&db=2"
        );
        assert_eq!(redact_url("redis://pw@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("redis://:a@b@h/0"), "redis://:***@h/0");
        assert_eq!(
            redact_url("amqp://user:s3cret@127.0.0.1:1/%2f"),
            "amqp://user:***@127.0.0.1:1/%2f"
        );
        assert_eq!(redact_url("amqp://h/v?pass=x"), "amqp://h/v?pass=***");
    }

    #[test]
    fn a_secret_is_hidden_where_it_stands_alone_and_words_around_it_are_kept() {
        assert_eq!(hide("invalid port number", "p"), "invalid port number");
        assert_eq!(hide("amqp://u:p@h: bad p", "p"), "amqp://u:***@h: bad ***");
        assert_eq!(hide("bad s3cret\nthing", "s3cret"), "bad ***\nthing");
        assert_eq!(hide("x:pw@h pw1 apw", "pw"), "x:***@h pw1 apw");
        assert_eq!(hide("'é' é", "é"), "'***' ***");
        assert_eq!(hide("same", ""), "same");
        assert_eq!(hide("aab:ab@", "ab"), "aab:***@");
    }

    #[test]
    fn error_texts_become_one_bounded_line_without_the_secrets() {
        let none = Secrets::default();
        assert_eq!(
            none.scrub("bad\nreply: 'HTTP/1.1'\r\n"),
            "bad reply: 'HTTP/1.1'"
        );
        let secrets = Secrets::of("amqp://user:s3cret@h/v");
        assert_eq!(secrets.scrub("bad s3cret\nthing"), "bad *** thing");
        let long = "é".repeat(500);
        assert!(none.scrub(&long).len() <= MAX_ERROR_TEXT + 3);
    }

    #[test]
    fn a_password_is_hidden_as_written_and_decoded_and_from_the_query() {
        let secrets = Secrets::of("redis://:p%40ss@h:1/0?password=q1");
        assert_eq!(
            secrets.scrub("auth p@ss failed, p%40ss, q1"),
            "auth *** failed, ***, ***"
        );
        let lone = Secrets::of("redis://tok@h");
        assert_eq!(lone.scrub("tok refused"), "*** refused");
        assert_eq!(percent_decoded("a%zz%4"), "a%zz%4");
    }
}
