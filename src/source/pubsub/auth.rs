//! Credentials for the service, as Application Default Credentials find them:
//! `GOOGLE_APPLICATION_CREDENTIALS` naming a service-account key gives a self-signed JWT
//! (RS256, signed with ring), otherwise the metadata server's token (`GCE_METADATA_HOST`
//! overrides its address). A token is kept until five minutes before it expires.
//!
//! No token or key is ever shown: the kit's `Token` and [`Credentials`] print `***` for
//! them, and error texts name files and addresses, never their secrets. The token cache, the
//! JWT signing and the metadata server's fetch are the kit's (`kit/http.rs`).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::signature::RsaKeyPair;
use serde::Deserialize;

use crate::source::kit::{fetch_token, jwt_rs256, Bearer, Renewing, Token};

/// The audience of a self-signed JWT for Pub/Sub.
const AUDIENCE: &str = "https://pubsub.googleapis.com/";
/// The lifetime of a self-signed JWT (Google accepts at most an hour).
const JWT_LIFETIME: Duration = Duration::from_secs(3600);
/// A token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// The metadata server's address when `GCE_METADATA_HOST` does not name one.
const METADATA_HOST: &str = "metadata.google.internal";
/// The metadata server's token of the instance's default service account.
const METADATA_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// Why no token could be had.
#[derive(Debug)]
#[non_exhaustive]
pub enum AuthError {
    /// The key file named by `GOOGLE_APPLICATION_CREDENTIALS` could not be read.
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The key file is not a service-account key this source can use.
    BadKey {
        /// The file.
        path: String,
        /// What is wrong (never the key).
        reason: String,
    },
    /// The metadata server did not give a token.
    Metadata {
        /// Its address.
        host: String,
        /// What went wrong.
        reason: String,
    },
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::KeyFile { path, error } => {
                write!(
                    f,
                    "cannot read the key file {path} (GOOGLE_APPLICATION_CREDENTIALS): {error}"
                )
            }
            AuthError::BadKey { path, reason } => {
                write!(
                    f,
                    "the key file {path} is not a usable service-account key: {reason}"
                )
            }
            AuthError::Metadata { host, reason } => write!(
                f,
                "no token from the metadata server at {host} (set GOOGLE_APPLICATION_CREDENTIALS \
                 to a service-account key, or PUBSUB_EMULATOR_HOST for the emulator): {reason}"
            ),
        }
    }
}

impl std::error::Error for AuthError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AuthError::KeyFile { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Where tokens come from.
pub(super) enum Credentials {
    /// None: the emulator.
    None,
    /// A service account's key: each token is a JWT it signs itself.
    ServiceAccount {
        /// The account's e-mail, the JWT's issuer and subject.
        email: String,
        /// The key's id, the JWT's `kid`.
        key_id: String,
        /// The private key (boxed: it is large, and the other kinds small).
        key: Box<RsaKeyPair>,
        /// The token in use and when it expires.
        cached: Renewing,
    },
    /// The metadata server of the machine.
    Metadata {
        /// `host[:port]`.
        host: String,
        /// Asks it (plain HTTP, as the metadata server speaks).
        agent: ureq::Agent,
        /// The token in use and when it expires.
        cached: Renewing,
    },
}

/// The fields of a service-account key file that are used.
#[derive(Deserialize)]
struct KeyFile {
    /// `service_account`.
    #[serde(rename = "type")]
    kind: String,
    /// The account.
    client_email: String,
    /// The key's id.
    #[serde(default)]
    private_key_id: String,
    /// PKCS#8, PEM.
    private_key: String,
}

impl Credentials {
    /// The credentials of the environment: a key named by `GOOGLE_APPLICATION_CREDENTIALS`,
    /// else the metadata server (at `GCE_METADATA_HOST`, else its usual address).
    ///
    /// # Errors
    ///
    /// [`AuthError`] when the key file cannot be read or used.
    pub(super) fn from_environment() -> Result<Self, AuthError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Credentials::from_environment`] with the variables read by `var`.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, AuthError> {
        match var("GOOGLE_APPLICATION_CREDENTIALS").filter(|path| !path.is_empty()) {
            Some(path) => Self::service_account(&path),
            None => {
                let host = var("GCE_METADATA_HOST")
                    .filter(|host| !host.is_empty())
                    .unwrap_or_else(|| METADATA_HOST.to_owned());
                let agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(5)))
                    .http_status_as_error(false)
                    .build()
                    .into();
                Ok(Credentials::Metadata {
                    host,
                    agent,
                    cached: Renewing::default(),
                })
            }
        }
    }

    /// The credentials of a service-account key file.
    fn service_account(path: &str) -> Result<Self, AuthError> {
        let bad = |reason: String| AuthError::BadKey {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|error| AuthError::KeyFile {
            path: path.to_owned(),
            error,
        })?;
        // The JSON error says where, not what: the text holds the key.
        let file: KeyFile = serde_json::from_str(&text).map_err(|error| {
            bad(format!(
                "not the JSON of a key (line {}, column {})",
                error.line(),
                error.column()
            ))
        })?;
        if file.kind != "service_account" {
            return Err(bad(format!(
                "its type is '{}', not 'service_account'",
                file.kind
            )));
        }
        let body: String = file
            .private_key
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        let der = STANDARD
            .decode(body.trim())
            .map_err(|_| bad("private_key is not PEM".to_owned()))?;
        let key = RsaKeyPair::from_pkcs8(&der)
            .map_err(|error| bad(format!("private_key is not an RSA PKCS#8 key: {error}")))?;
        Ok(Credentials::ServiceAccount {
            email: file.client_email,
            key_id: file.private_key_id,
            key: Box::new(key),
            cached: Renewing::default(),
        })
    }

    /// The token for the next request, if any: the one in use, or a new one once it is
    /// within five minutes of expiring.
    ///
    /// # Errors
    ///
    /// [`AuthError::Metadata`] when the metadata server gives none.
    pub(super) fn bearer(&self) -> Result<Option<Token>, AuthError> {
        self.bearer_at(SystemTime::now())
    }

    /// [`Credentials::bearer`] at `now`.
    fn bearer_at(&self, now: SystemTime) -> Result<Option<Token>, AuthError> {
        match self {
            Credentials::None => Ok(None),
            Credentials::ServiceAccount {
                email,
                key_id,
                key,
                cached,
            } => cached
                .get(now, RENEW_BEFORE, || {
                    Ok((sign_jwt(email, key_id, key, now), now + JWT_LIFETIME))
                })
                .map(Some),
            Credentials::Metadata {
                host,
                agent,
                cached,
            } => cached
                .get(now, RENEW_BEFORE, || {
                    let url = format!("http://{host}{METADATA_TOKEN_PATH}");
                    fetch_token(agent, &url, ("Metadata-Flavor", "Google"), now).map_err(|reason| {
                        AuthError::Metadata {
                            host: host.clone(),
                            reason,
                        }
                    })
                })
                .map(Some),
        }
    }
}

impl Bearer for Credentials {
    fn bearer(&self) -> Result<Option<Token>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Credentials::bearer(self)?)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::ServiceAccount { email, .. } => f
                .debug_struct("ServiceAccount")
                .field("email", email)
                .field("key", &"***")
                .finish(),
            Credentials::Metadata { host, .. } => {
                f.debug_struct("Metadata").field("host", host).finish()
            }
        }
    }
}

/// A self-signed JWT for Pub/Sub, valid an hour from `now`.
fn sign_jwt(email: &str, key_id: &str, key: &RsaKeyPair, now: SystemTime) -> Token {
    let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let claims = serde_json::json!({
        "iss": email,
        "sub": email,
        "aud": AUDIENCE,
        "iat": iat,
        "exp": iat + JWT_LIFETIME.as_secs(),
    });
    jwt_rs256(serde_json::json!({ "kid": key_id }), &claims, key)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::process::Command;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

    use super::*;
    use crate::source::kit::http::tests::{fake_http, Heads};

    /// A key file of a new RSA key made with `openssl`, or `None` without it.
    fn key_file(dir: &std::path::Path) -> Option<String> {
        let pem = dir.join("key.pem");
        let made = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .arg("-out")
            .arg(&pem)
            .output()
            .ok()?;
        if !made.status.success() {
            return None;
        }
        let key = std::fs::read_to_string(&pem).ok()?;
        let file = dir.join("key.json");
        let json = serde_json::json!({
            "type": "service_account",
            "client_email": "mayhem@demo.iam.gserviceaccount.com",
            "private_key_id": "k1",
            "private_key": key,
        });
        std::fs::write(&file, json.to_string()).ok()?;
        Some(file.to_string_lossy().into_owned())
    }

    #[test]
    fn a_service_account_key_signs_a_jwt_that_is_renewed_before_it_expires() {
        let dir = std::env::temp_dir().join(format!("mayhem-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let Some(path) = key_file(&dir) else {
            // The unit tests of `make test` run where openssl is (CI installs it).
            eprintln!("SKIPPED: openssl cannot make an RSA key here");
            return;
        };
        let credentials = Credentials::from_vars(|name| {
            (name == "GOOGLE_APPLICATION_CREDENTIALS").then(|| path.clone())
        })
        .unwrap();
        let now = SystemTime::now();
        let token = credentials.bearer_at(now).unwrap().unwrap();
        let parts: Vec<&str> = token.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], AUDIENCE);
        assert_eq!(claims["iss"], "mayhem@demo.iam.gserviceaccount.com");
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(
            (header["alg"].as_str(), header["kid"].as_str()),
            (Some("RS256"), Some("k1"))
        );
        let Credentials::ServiceAccount { key, .. } = &credentials else {
            panic!("a service account");
        };
        let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public().as_ref());
        let signed = format!("{}.{}", parts[0], parts[1]);
        public
            .verify(
                signed.as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .expect("the signature verifies");
        // The same token until five minutes before its hour is up, then a new one.
        let later = credentials
            .bearer_at(now + Duration::from_secs(3000))
            .unwrap()
            .unwrap();
        assert_eq!(later.expose(), token.expose());
        let renewed = credentials
            .bearer_at(now + Duration::from_secs(3400))
            .unwrap()
            .unwrap();
        assert_ne!(renewed.expose(), token.expose());
        // Neither the key nor the token shows.
        let shown = format!("{credentials:?} {renewed:?}");
        assert!(
            !shown.contains(&token.expose()[..20]) && !shown.contains("PRIVATE"),
            "{shown}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_key_file_is_named_without_its_content() {
        let dir = std::env::temp_dir().join(format!("mayhem-auth-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key.json");
        std::fs::write(&path, r#"{"type":"service_account","client_email":"a","private_key":"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----"}"#).unwrap();
        let shown = path.to_string_lossy().into_owned();
        let error = Credentials::from_vars(|_| Some(shown.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&shown) && error.contains("not an RSA PKCS#8 key"),
            "{error}"
        );
        assert!(!error.contains("c2VjcmV0"), "{error}");
        let missing = Credentials::from_vars(|_| Some("/nonexistent/key.json".into()))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/key.json"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fake metadata server: a new token valid `expires_in` seconds for each request that
    /// carries `Metadata-Flavor: Google`, to the token's path.
    fn fake_metadata(expires_in: u64) -> (String, Heads) {
        fake_http(move |head, n| {
            let flavoured = head.iter().any(|line| line == "metadata-flavor: google");
            let path = METADATA_TOKEN_PATH.to_ascii_lowercase();
            if flavoured && head.first().is_some_and(|line| line.contains(&path)) {
                let body = format!(
                    r#"{{"access_token":"ya29.secret-{n}","expires_in":{expires_in},"token_type":"Bearer"}}"#
                );
                ("200 OK", body)
            } else {
                ("403 Forbidden", String::new())
            }
        })
    }

    #[test]
    fn requests_carry_the_bearer_token_of_the_credentials() {
        let (metadata, _) = fake_metadata(3600);
        let (pubsub, heads) = fake_http(|_, _| {
            (
                "200 OK",
                r#"{"topic":"projects/p/topics/t","ackDeadlineSeconds":10}"#.to_owned(),
            )
        });
        let credentials =
            Credentials::from_vars(|name| (name == "GCE_METADATA_HOST").then(|| metadata.clone()))
                .unwrap();
        let rest = super::super::rest::Rest::new(
            format!("http://{pubsub}"),
            credentials,
            Duration::from_secs(5),
        );
        let info = rest.get_subscription("projects/p/subscriptions/s").unwrap();
        assert_eq!(info.topic, "projects/p/topics/t");
        rest.get_subscription("projects/p/subscriptions/s").unwrap();
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 2);
        for head in heads.iter() {
            assert!(
                head.contains(&"authorization: bearer ya29.secret-0".to_owned()),
                "{head:?}"
            );
        }
        assert!(!format!("{rest:?}").contains("secret"));
    }

    #[test]
    fn the_metadata_server_token_is_kept_until_near_its_expiry() {
        let (host, asked) = fake_metadata(600);
        let asked = || asked.lock().unwrap().len();
        let credentials =
            Credentials::from_vars(|name| (name == "GCE_METADATA_HOST").then(|| host.clone()))
                .unwrap();
        let now = SystemTime::now();
        let first = credentials.bearer_at(now).unwrap().unwrap();
        assert_eq!(first.expose(), "ya29.secret-0");
        let again = credentials
            .bearer_at(now + Duration::from_secs(200))
            .unwrap()
            .unwrap();
        assert_eq!(again.expose(), "ya29.secret-0");
        assert_eq!(asked(), 1);
        // Within five minutes of its expiry: a new one.
        let renewed = credentials
            .bearer_at(now + Duration::from_secs(400))
            .unwrap()
            .unwrap();
        assert_eq!(renewed.expose(), "ya29.secret-1");
        assert!(!format!("{credentials:?} {renewed:?}").contains("secret"));
    }

    #[test]
    fn a_metadata_server_that_is_not_there_is_named() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let credentials =
            Credentials::from_vars(|name| (name == "GCE_METADATA_HOST").then(|| host.clone()))
                .unwrap();
        let error = credentials.bearer().unwrap_err().to_string();
        assert!(
            error.contains(&host) && error.contains("GOOGLE_APPLICATION_CREDENTIALS"),
            "{error}"
        );
    }
}
