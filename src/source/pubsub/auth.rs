//! Credentials: where the bearer token of each request comes from.

use std::fmt;

/// Why no token could be had.
#[derive(Debug)]
pub enum AuthError {
    /// Placeholder until the credential sources land.
    Unsupported,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no credentials")
    }
}

impl std::error::Error for AuthError {}

/// A bearer token; `Debug` never shows it.
pub(super) struct Token(String);

impl Token {
    /// The token, for the `authorization` header only.
    pub(super) fn expose(&self) -> &str {
        &self.0
    }
}

/// Where tokens come from.
#[derive(Debug)]
pub(super) enum Credentials {
    /// None: the emulator.
    None,
}

impl Credentials {
    /// The credentials of the environment.
    pub(super) fn from_environment() -> Result<Self, AuthError> {
        Err(AuthError::Unsupported)
    }

    /// The token for the next request, if any.
    pub(super) fn bearer(&self) -> Result<Option<Token>, AuthError> {
        match self {
            Credentials::None => Ok(None),
        }
    }
}
