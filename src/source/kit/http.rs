//! What a broker with an HTTP API needs: JSON calls over one blocking `ureq` agent whose idle
//! connections are kept alive and shared by the threads (no async runtime), a bearer token
//! on each call, errors that say whether trying again may help, tokens that never print and
//! are renewed before they expire, and RS256 JSON Web Tokens (RFC 7515), as a service
//! account signs its own.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::sync::lock;

/// Largest response read (a pull of 1,000 messages of large data).
const MAX_RESPONSE: u64 = 1 << 30;

/// Why a call failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum HttpError {
    /// No answer: the connection failed or timed out.
    Transport(ureq::Error),
    /// The server answered with an error status.
    Status {
        /// The HTTP status.
        code: u16,
        /// The API's error status, like `NOT_FOUND` (empty when the body had none).
        status: String,
        /// The server's message.
        message: String,
    },
    /// The answer was not the JSON expected.
    Json(serde_json::Error),
    /// No token could be had for the request.
    Credentials(Box<dyn std::error::Error + Send + Sync>),
}

impl HttpError {
    /// Whether trying again may help: no answer, no token yet, a server error, or
    /// throttling.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            HttpError::Transport(_) | HttpError::Credentials(_) => true,
            HttpError::Status { code, .. } => *code >= 500 || *code == 429 || *code == 408,
            HttpError::Json(_) => false,
        }
    }

    /// Whether the server said the resource does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, HttpError::Status { code: 404, .. })
    }

    /// A short name of the kind of failure, for logging each kind once.
    pub(crate) fn kind(&self) -> String {
        match self {
            HttpError::Status { code, status, .. } => format!("{code} {status}"),
            other => other.to_string().chars().take(40).collect(),
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Transport(error) => write!(f, "no answer: {error}"),
            HttpError::Status {
                code,
                status,
                message,
            } => write!(f, "HTTP {code} {status}: {message}"),
            HttpError::Json(error) => write!(f, "unexpected answer: {error}"),
            HttpError::Credentials(error) => write!(f, "no credentials: {error}"),
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Transport(error) => Some(error),
            HttpError::Json(error) => Some(error),
            HttpError::Credentials(error) => Some(error.as_ref()),
            HttpError::Status { .. } => None,
        }
    }
}

/// A bearer token; `Debug` never shows it.
#[derive(Clone)]
pub(crate) struct Token(String);

impl Token {
    /// The token, for the `authorization` header only.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Where the bearer tokens of the calls come from.
pub(crate) trait Bearer: fmt::Debug + Send + Sync {
    /// The token for the next call; `None` for a server that takes none (an emulator).
    ///
    /// # Errors
    ///
    /// Why no token could be had, in one line naming where it was looked for.
    fn bearer(&self) -> Result<Option<Token>, Box<dyn std::error::Error + Send + Sync>>;
}

/// The token in use and when it expires, renewed `renew_before` its expiry.
#[derive(Debug, Default)]
pub(crate) struct Renewing {
    /// The token and its expiry.
    cached: Mutex<Option<(Token, SystemTime)>>,
}

impl Renewing {
    /// The token in use at `now`, or a new one from `issue` once the one in use is within
    /// `renew_before` of its expiry. The other threads wait while a token is made, instead
    /// of each asking the issuer.
    pub(crate) fn get<E>(
        &self,
        now: SystemTime,
        renew_before: Duration,
        issue: impl FnOnce() -> Result<(Token, SystemTime), E>,
    ) -> Result<Token, E> {
        let mut cached = lock(&self.cached);
        if let Some((token, expiry)) = cached.as_ref() {
            if now + renew_before < *expiry {
                return Ok(token.clone());
            }
        }
        let (token, expiry) = issue()?;
        *cached = Some((token.clone(), expiry));
        Ok(token)
    }
}

/// An RS256 JSON Web Token of `header` (to which `alg` and `typ` are added) and `claims`,
/// signed with `key`.
pub(crate) fn jwt_rs256(
    mut header: serde_json::Value,
    claims: &serde_json::Value,
    key: &RsaKeyPair,
) -> Token {
    header["alg"] = "RS256".into();
    header["typ"] = "JWT".into();
    let mut jwt = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    // Signing fails only when the buffer is not the modulus' length (it is, above) or the
    // system's random source fails, which RSA PKCS#1 v1.5 signing does not use; a failure
    // would give a token the service refuses, with its error logged by the caller.
    let _ = key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        jwt.as_bytes(),
        &mut signature,
    );
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
    Token(jwt)
}

/// An OAuth 2.0 access token fetched with `GET url` and `header`, as a metadata server gives
/// one (`{"access_token", "expires_in"}`), and when it expires, counted from `now`.
///
/// # Errors
///
/// What went wrong, in one line without the answer's text (it may hold a token).
pub(crate) fn fetch_token(
    agent: &ureq::Agent,
    url: &str,
    header: (&str, &str),
    now: SystemTime,
) -> Result<(Token, SystemTime), String> {
    #[derive(Deserialize)]
    struct Answer {
        access_token: String,
        expires_in: u64,
    }
    let mut response = agent
        .get(url)
        .header(header.0, header.1)
        .call()
        .map_err(|error| error.to_string())?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(format!("HTTP {status}"));
    }
    let body = response
        .body_mut()
        .read_to_vec()
        .map_err(|error| error.to_string())?;
    // The JSON error says where, not what: the text holds the token.
    let answer: Answer = serde_json::from_slice(&body)
        .map_err(|error| format!("unexpected answer at column {}", error.column()))?;
    Ok((
        Token(answer.access_token),
        now + Duration::from_secs(answer.expires_in),
    ))
}

/// The HTTP client of one source.
pub(crate) struct Http {
    /// Keeps connections alive between calls (HTTP/1.1), one per thread in use.
    agent: ureq::Agent,
    /// `http://host:port` or `https://host`, with the API's version when it has one.
    base: String,
    /// Where bearer tokens come from.
    bearer: Box<dyn Bearer>,
}

impl Http {
    /// A client of `base` whose calls carry `bearer`'s tokens and give up after `timeout`.
    pub(crate) fn new(base: String, bearer: Box<dyn Bearer>, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .max_idle_connections(256)
            .max_idle_connections_per_host(256)
            .user_agent("mayhem")
            .build()
            .into();
        Http {
            agent,
            base,
            bearer,
        }
    }

    /// One call: `method` on `{base}/{path}` with a JSON body; returns the answer's body.
    ///
    /// `path` holds names as the API keeps them, which may hold `%` (`topics/or%41ders`);
    /// it is escaped for the request line here, and only here, since JSON bodies name
    /// resources as they are.
    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, HttpError> {
        let url = format!("{}/{}", self.base, path.replace('%', "%25"));
        let token = self.bearer.bearer().map_err(HttpError::Credentials)?;
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json");
        let request = match &token {
            Some(token) => request.header("authorization", format!("Bearer {}", token.expose())),
            None => request,
        };
        let request = request
            .body(body.unwrap_or_default())
            .map_err(|error| HttpError::Transport(ureq::Error::BadUri(error.to_string())))?;
        let mut response = self.agent.run(request).map_err(HttpError::Transport)?;
        let code = response.status().as_u16();
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()
            .map_err(HttpError::Transport)?;
        if (200..300).contains(&code) {
            return Ok(bytes);
        }
        Err(status_error(code, &bytes))
    }

    /// `POST` of a body serialized straight to JSON bytes (no `serde_json::Value` in
    /// between: a request of thousands of elements would build one map per element first).
    pub(crate) fn post(&self, path: &str, body: &impl Serialize) -> Result<Vec<u8>, HttpError> {
        let bytes = serde_json::to_vec(body).map_err(HttpError::Json)?;
        self.call("POST", path, Some(bytes))
    }

    /// `POST` of `body`, and its answer read as `T`.
    pub(crate) fn post_for<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, HttpError> {
        serde_json::from_slice(&self.post(path, body)?).map_err(HttpError::Json)
    }

    /// `GET` of a resource, read as `T`.
    pub(crate) fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, HttpError> {
        serde_json::from_slice(&self.call("GET", path, None)?).map_err(HttpError::Json)
    }

    /// `PUT` of a resource to create it; one that exists already (409) is fine.
    pub(crate) fn create(&self, path: &str, body: &serde_json::Value) -> Result<(), HttpError> {
        match self.call("PUT", path, Some(body.to_string().into_bytes())) {
            Err(HttpError::Status { code: 409, .. }) => Ok(()),
            other => other.map(drop),
        }
    }
}

impl fmt::Debug for Http {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http")
            .field("base", &self.base)
            .field("bearer", &self.bearer)
            .finish_non_exhaustive()
    }
}

/// The error of a non-2xx answer: `{"error": {"code", "message", "status"}}` (Google's APIs,
/// and others, answer so), or the start of whatever else came.
fn status_error(code: u16, body: &[u8]) -> HttpError {
    #[derive(Deserialize)]
    struct Wrapper {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        message: String,
        #[serde(default)]
        status: String,
    }
    match serde_json::from_slice::<Wrapper>(body) {
        Ok(Wrapper { error }) => HttpError::Status {
            code,
            status: error.status,
            message: error.message,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            HttpError::Status {
                code,
                status: String::new(),
                message: text.trim().to_owned(),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::Arc;

    use super::*;

    /// The request heads a fake server received (lines, lowercased).
    pub(crate) type Heads = Arc<Mutex<Vec<Vec<String>>>>;

    /// A fake HTTP server on 127.0.0.1 answering each request with what `answer` makes of
    /// its head and its number: a status line and a JSON body.
    pub(crate) fn fake_http(
        answer: impl Fn(&[String], usize) -> (&'static str, String) + Send + 'static,
    ) -> (String, Heads) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let heads: Heads = Arc::default();
        let seen = Arc::clone(&heads);
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_ascii_lowercase());
                }
                let (status, body) = answer(&head, n);
                seen.lock().unwrap().push(head);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (host, heads)
    }

    #[test]
    fn errors_keep_the_apis_status_and_say_whether_to_try_again() {
        let error = status_error(
            404,
            br#"{"error":{"code":404,"message":"Subscription does not exist","status":"NOT_FOUND"}}"#,
        );
        assert!(error.is_not_found());
        assert_eq!(
            error.to_string(),
            "HTTP 404 NOT_FOUND: Subscription does not exist"
        );
        assert_eq!(error.kind(), "404 NOT_FOUND");
        assert!(!error.is_transient());
        let busy = status_error(503, b"<html>busy</html>");
        assert!(busy.is_transient());
        assert_eq!(busy.to_string(), "HTTP 503 : <html>busy</html>");
        assert!(status_error(429, b"").is_transient());
    }

    #[test]
    fn a_token_is_kept_until_it_is_near_its_expiry() {
        let renewing = Renewing::default();
        let now = SystemTime::now();
        let issued = std::cell::Cell::new(0);
        let issue = || {
            issued.set(issued.get() + 1);
            Ok::<_, ()>((
                Token(format!("t{}", issued.get())),
                now + Duration::from_secs(600),
            ))
        };
        let before = Duration::from_secs(300);
        assert_eq!(renewing.get(now, before, issue).unwrap().expose(), "t1");
        let soon = now + Duration::from_secs(200);
        assert_eq!(renewing.get(soon, before, issue).unwrap().expose(), "t1");
        let near = now + Duration::from_secs(400);
        assert_eq!(renewing.get(near, before, issue).unwrap().expose(), "t2");
        assert_eq!(format!("{:?}", Token("secret".into())), "Token(***)");
    }
}
