//! The crate-level error: what can stop the server from running at all.

use crate::config::ConfigError;

/// Why [`crate::server::run`] could not serve.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is not usable.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The listening socket failed in a way the server cannot recover from.
    #[error("listener failed: {0}")]
    Listener(#[from] std::io::Error),
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
