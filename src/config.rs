//! Configuration: typed, validated, with defaults. `main.rs` fills it from flags and env vars.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::AuthSettings;
use crate::ids::NodeId;
use crate::room::RoomSettings;
use crate::session::SessionSettings;
use crate::store::writer::WriterOptions;

/// Everything a node needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address for WebSocket and HTTP.
    pub bind: SocketAddr,
    /// Where the embedded SQLite store lives (`<data_dir>/tandem.db`).
    pub data_dir: PathBuf,
    /// `postgres://…` (or `postgresql://…`) stores in Postgres; `sqlite:…` overrides the embedded
    /// store location.
    pub database_url: Option<String>,
    /// This node's name in logs and stored update origins.
    pub node_id: NodeId,
    /// `redis://…` or `redis-cluster://…`: fan-out to other nodes; `None`: this node is alone.
    pub redis_url: Option<String>,
    /// Sharded pub/sub (SSUBSCRIBE/SPUBLISH) for room channels, for Redis Cluster.
    pub redis_sharded: bool,
    /// Per-connection limits and timings.
    pub session: SessionSettings,
    /// Tokens, grants and browser origins.
    pub auth: AuthSettings,
    /// Room behaviour.
    pub rooms: RoomSettings,
    /// Group-commit tuning.
    pub writer: WriterOptions,
    /// How long a graceful shutdown may take to flush rooms and close connections.
    pub shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 1234)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            node_id: NodeId::random(),
            redis_url: None,
            redis_sharded: false,
            session: SessionSettings::default(),
            auth: AuthSettings::default(),
            rooms: RoomSettings::default(),
            writer: WriterOptions::default(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// The longest group-commit window accepted: an acknowledgement waits up to the window.
pub const MAX_COMMIT_WINDOW: Duration = Duration::from_secs(1);

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A limit is zero or out of range.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Checks the relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.session;
        if s.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max message size must be at least 1 KiB".into(),
            ));
        }
        if s.outbox_bytes < s.max_message_bytes.min(1 << 20) {
            return Err(ConfigError::Invalid(
                "outbox limit must be at least the max message size (or 1 MiB)".into(),
            ));
        }
        if s.ping_interval < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                "ping interval must be at least 100 ms".into(),
            ));
        }
        if self.writer.window > MAX_COMMIT_WINDOW {
            return Err(ConfigError::Invalid(
                "the commit window must be at most 1 s (acknowledgements wait for it)".into(),
            ));
        }
        if self.rooms.compaction.max_updates == 0 || self.rooms.compaction.max_bytes == 0 {
            return Err(ConfigError::Invalid(
                "compaction thresholds must be positive".into(),
            ));
        }
        if self.auth.keys.is_empty() && !self.auth.insecure_no_auth && !self.bind.ip().is_loopback()
        {
            return Err(ConfigError::Invalid(format!(
                "refusing to serve {} without authentication: anyone who reaches it could read \
                 and write every room. Give --jwt-secret or --jwt-keys, or --insecure-no-auth to \
                 serve without (e.g. behind a gateway that authenticates)",
                self.bind
            )));
        }
        if let Some(url) = &self.database_url {
            let supported = ["sqlite:", "postgres://", "postgresql://"];
            if !supported.iter().any(|prefix| url.starts_with(prefix)) {
                return Err(ConfigError::Invalid(format!(
                    "unsupported database URL scheme {:?}: use postgres://, postgresql:// or \
                     sqlite:",
                    url.split(':').next().unwrap_or_default()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_commit_window_over_a_second_is_refused() {
        let mut c = Config::default();
        c.writer.window = MAX_COMMIT_WINDOW;
        c.validate().unwrap();
        c.writer.window = MAX_COMMIT_WINDOW + Duration::from_millis(1);
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("commit window"), "{err}");
    }

    #[test]
    fn an_outbox_smaller_than_a_message_is_refused() {
        let mut c = Config::default();
        c.session.outbox_bytes = 1024;
        assert!(c.validate().is_err());
    }

    #[test]
    fn postgres_and_sqlite_urls_are_accepted() {
        for url in [
            "postgres://tandem@db:5432/tandem",
            "postgresql://tandem:secret@db/tandem?sslmode=require",
            "sqlite://data/tandem.db",
            "sqlite::memory:",
        ] {
            let c = Config {
                database_url: Some(url.into()),
                ..Config::default()
            };
            c.validate().unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn without_keys_only_loopback_is_served_unless_insecure() {
        let public = Config {
            bind: "0.0.0.0:1234".parse().unwrap(),
            ..Config::default()
        };
        let err = public.validate().unwrap_err().to_string();
        assert!(err.contains("--insecure-no-auth"), "{err}");
        let mut insecure = public.clone();
        insecure.auth.insecure_no_auth = true;
        insecure.validate().unwrap();
        let mut keyed = public.clone();
        keyed.auth.keys.secret = Some("x".repeat(32));
        keyed.validate().unwrap();
        let v6 = Config {
            bind: "[::1]:1234".parse().unwrap(),
            ..Config::default()
        };
        v6.validate().unwrap();
    }

    #[test]
    fn unknown_database_schemes_are_refused() {
        let c = Config {
            database_url: Some("mysql://x".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("mysql"));
    }
}
