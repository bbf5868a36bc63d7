//! Wires the store, the writer, the hub and the HTTP router from a [`Config`], serves, and shuts
//! down in order: stop accepting, close connections with 1012, let every room flush, close the
//! store.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::{keys, Authenticator, KeyError};
use crate::broker::memory::MemoryBus;
use crate::broker::redis::{self, RedisOptions};
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::http::{self, HttpState};
use crate::hub::{Hub, HubInbound};
use crate::room::RoomContext;
use crate::session::limits::AddressLimiter;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::writer::StoreWriter;
use crate::store::{DynStore, StoreError};

/// Why a node could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker could not be set up.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The JWT keys could not be loaded.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The listener could not be used.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A configured node, ready to serve.
pub struct App {
    config: Config,
    store: DynStore,
    /// Routes other nodes' envelopes to this node's rooms once the hub exists.
    inbound: Arc<HubInbound>,
    broker: Option<Arc<dyn Broker>>,
}

impl App {
    /// Opens the store the configuration names: `--database-url` (`postgres://…` or
    /// `sqlite:…`), else SQLite under the data dir.
    pub async fn open(config: Config) -> Result<Self, AppError> {
        config
            .validate()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let store: DynStore = match config.database_url.as_deref() {
            Some(url) if url.starts_with("sqlite:") => Arc::new(SqliteStore::connect(url).await?),
            Some(url) => Arc::new(PostgresStore::connect(url).await?),
            None => Arc::new(SqliteStore::open(&config.data_dir.join("tandem.db")).await?),
        };
        let mut app = Self::with_store(config, store);
        if let Some(url) = &app.config.redis_url {
            let mut opts = RedisOptions::new(url.clone());
            opts.sharded = app.config.redis_sharded;
            let broker = redis::connect(opts, app.inbound.clone()).await?;
            info!(sharded = app.config.redis_sharded, "connected to redis");
            app.broker = Some(Arc::new(broker));
        }
        Ok(app)
    }

    /// A node over an already opened store, alone (no broker).
    pub fn with_store(config: Config, store: DynStore) -> Self {
        let inbound = HubInbound::new(config.node_id.clone());
        Self {
            config,
            store,
            inbound,
            broker: None,
        }
    }

    /// Joins an in-process bus shared with other nodes of this process (tests, embedded
    /// clusters) instead of Redis.
    pub fn with_bus(mut self, bus: &MemoryBus) -> Self {
        let broker = bus.join(self.config.node_id.clone(), self.inbound.clone());
        self.broker = Some(Arc::new(broker));
        self
    }

    /// Starts serving on `listener` in the background.
    pub fn start(self, listener: TcpListener) -> Result<Running, AppError> {
        let addr = listener.local_addr()?;
        let auth = Arc::new(Authenticator::new(self.config.auth.clone())?);
        if auth.enabled() {
            info!(keys = %keys::describe(&self.config.auth.keys), "tokens required");
        } else if addr.ip().is_loopback() {
            info!("no JWT keys configured: every connection may read and write (loopback only)");
        } else {
            warn!(%addr, "authentication is OFF (--insecure-no-auth): anyone who reaches this address may read and write every room");
        }
        let shutdown = CancellationToken::new();
        let (writer, writer_task) =
            StoreWriter::spawn(self.store.clone(), self.config.writer.clone());
        let writer_stats = writer.stats();
        let unstored = writer.clone();
        let rooms = TaskTracker::new();
        let ctx = Arc::new(RoomContext {
            store: self.store.clone(),
            writer,
            origin: Arc::from(self.config.node_id.as_str()),
            node: self.config.node_id.clone(),
            broker: self.broker.clone(),
            settings: self.config.rooms.clone(),
            shutdown: shutdown.clone(),
        });
        let hub = Hub::new(ctx, rooms.clone());
        self.inbound.attach(&hub);
        hub.spawn_heartbeats(&self.inbound, &rooms);
        let connections = TaskTracker::new();
        let state = HttpState {
            hub: hub.clone(),
            store: self.store.clone(),
            broker: self.broker.clone(),
            writer: writer_stats,
            unstored,
            session: Arc::new(self.config.session.clone()),
            auth: auth.clone(),
            addresses: AddressLimiter::new(self.config.session.max_connections_per_address),
            shutdown: shutdown.clone(),
            connections: connections.clone(),
        };
        let router = http::router(state);
        let token = shutdown.clone();
        let config = self.config;
        let store = self.store;
        let broker = self.broker;
        let task = tokio::spawn(async move {
            info!(%addr, node = %config.node_id, "listening on {addr}");
            http::serve::serve(listener, router, token.clone(), config.shutdown_timeout).await;
            info!("shutting down: closing connections and flushing rooms");
            let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
            rooms.close();
            connections.close();
            if tokio::time::timeout_at(deadline, rooms.wait())
                .await
                .is_err()
            {
                warn!("some rooms did not flush before the shutdown deadline");
            }
            if tokio::time::timeout_at(deadline, connections.wait())
                .await
                .is_err()
            {
                warn!("some connections did not close before the shutdown deadline");
            }
            // Every room waited for its updates to commit before exiting, so the writer holds
            // nothing; handles kept by the hub would keep its task alive, so stop it here.
            writer_task.abort();
            if let Some(broker) = broker {
                broker.close().await;
            }
            store.close().await;
            info!("shutdown complete");
        });
        Ok(Running {
            addr,
            shutdown,
            hub,
            auth,
            task,
        })
    }
}

/// A node that is serving.
pub struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    hub: Hub,
    auth: Arc<Authenticator>,
    task: JoinHandle<()>,
}

impl Running {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's rooms.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The node's token verifier (its keys reload with [`Authenticator::reload`]).
    pub fn authenticator(&self) -> Arc<Authenticator> {
        self.auth.clone()
    }

    /// Cancelling this token starts a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shuts down gracefully and waits until everything is flushed and closed.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Waits until the node has shut down (after its token was cancelled).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}
