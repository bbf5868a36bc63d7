//! [`Client`]: the handle to one room connection. A background task (the private `connection`
//! module) owns the socket; the handle shares the document, the awareness map and a status that
//! the `wait_*` methods watch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use serde_json::Value;
use tandem_protocol::lib0::MAX_VAR_UINT;
use tandem_protocol::{Message, SyncMessage};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::updates::encoder::Encode;
use yrs::{Doc, Origin, ReadTxn, Transact};

use crate::awareness::AwarenessMap;
use crate::connection::{self, Outbound};
use crate::error::{ClientError, CloseInfo, Failure};
use crate::options::ClientOptions;

/// Origin of the transactions that apply what the server sent; the update observer skips them so
/// that remote updates are not sent back.
pub(crate) const REMOTE_ORIGIN: &str = "tandem-client/remote";

/// Key of the update observer that forwards local edits to the server.
pub(crate) const OBSERVER_KEY: &str = "tandem-client/outbox";

/// Where the connection stands. Published through a `watch` channel: every change wakes the
/// `wait_*` calls, which then re-check their condition.
#[derive(Debug, Clone, Default)]
pub(crate) struct Status {
    /// The server's step 2 (the answer to our step 1) has been applied.
    pub(crate) synced: bool,
    /// Set once, when the connection task has ended.
    pub(crate) closed: Option<CloseInfo>,
    /// The first fault, if any; set before `closed`.
    pub(crate) failure: Option<Failure>,
    /// Sync step 2 and update messages written to the socket, in the order the server counts
    /// them (tandem's acknowledgements number these).
    pub(crate) sent_updates: u64,
    /// Of those, the update frames that came through the outbox (local edits), which the
    /// observer counts in [`Shared::queued_updates`] when it queues them.
    pub(crate) sent_local: u64,
    /// The highest `Stored(n)` received: the first `n` of `sent_updates` are durable.
    pub(crate) stored: u64,
}

/// State shared by the handles, the connection task and the document's update observer. It holds
/// no `Doc`: the observer lives inside the document and keeps an `Arc<Shared>`, so a `Doc` here
/// would be a reference cycle.
pub(crate) struct Shared {
    /// Our Yjs client id, also our awareness id.
    pub(crate) client_id: u64,
    /// The options the client was created with.
    pub(crate) options: ClientOptions,
    /// Status for the `wait_*` calls. The connection task and `fail` are the only writers.
    pub(crate) status: watch::Sender<Status>,
    /// Awareness states, ours included. A std mutex: never held across an await.
    pub(crate) awareness: Mutex<AwarenessMap>,
    /// Frames and commands for the connection task. Bounded; see [`Shared::queue`] for the policy
    /// when it is full.
    pub(crate) outbox: mpsc::Sender<Outbound>,
    /// Wakes the connection task when a fault is recorded outside it (a full outbox).
    pub(crate) wake: tokio::sync::Notify,
    /// Local update frames handed to the outbox so far, counted before each is queued: when an
    /// edit's transaction has committed, this counts its frame and every update frame ahead of
    /// it in the outbox (whichever thread queued them).
    pub(crate) queued_updates: AtomicU64,
}

impl Shared {
    /// Queues a frame without waiting: it is called from the document observer, which runs inside
    /// a yrs transaction commit and must not block. If the outbox is full the frame is not sent
    /// and the client fails with [`Failure::OutboxFull`] (and closes): the frame cannot be dropped
    /// silently without the server missing an update, and an unbounded overflow list would hide a
    /// connection that cannot keep up. If the connection has already ended, the frame is dropped:
    /// there is nobody to send it to.
    pub(crate) fn queue(&self, frame: Vec<u8>) {
        self.queue_outbound(Outbound::Frame(Bytes::from(frame)));
    }

    /// Queues a local update frame like [`Shared::queue`], counting it first (see
    /// [`Shared::queued_updates`]). Counting before queueing means that any frame ahead of this
    /// one in the outbox was counted before this one was queued.
    pub(crate) fn queue_update(&self, frame: Vec<u8>) {
        self.queued_updates.fetch_add(1, Ordering::SeqCst);
        self.queue_outbound(Outbound::Update(Bytes::from(frame)));
    }

    fn queue_outbound(&self, outbound: Outbound) {
        match self.outbox.try_send(outbound) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    client_id = self.client_id,
                    "outbox full; closing the client"
                );
                self.fail(Failure::OutboxFull {
                    capacity: self.options.outbox_capacity,
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!(
                    client_id = self.client_id,
                    "connection ended; frame not sent"
                );
            }
        }
    }

    /// Records `failure` unless an earlier one is recorded, and wakes the connection task.
    pub(crate) fn fail(&self, failure: Failure) {
        self.status.send_if_modified(|s| {
            let first = s.failure.is_none() && s.closed.is_none();
            if first {
                s.failure = Some(failure);
            }
            first
        });
        self.wake.notify_one();
    }

    /// Wakes every `wait_*` call so that it re-checks its condition.
    pub(crate) fn changed(&self) {
        self.status.send_modify(|_| {});
    }

    /// The awareness map, recovering from a poisoned lock (the map stays consistent: every
    /// mutation is a single insert or field update).
    pub(crate) fn awareness(&self) -> MutexGuard<'_, AwarenessMap> {
        self.awareness
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection to one tandem room: a yrs document kept in sync with the room, and our presence.
///
/// Cheap to clone; all clones share the connection. A background task owns the socket. Local
/// edits on [`Client::doc`] are sent automatically. The connection closes on [`Client::close`],
/// when the server closes it, on a [`Failure`], or (with code 1000) when the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What the clones of one client share.
struct Inner {
    /// The synchronised document. The connection task and the observer hold clones of it.
    doc: Doc,
    /// State shared with the connection task.
    shared: Arc<Shared>,
    /// Never sent on: dropped with the last handle, which tells the connection task to close.
    _alive: oneshot::Sender<()>,
}

impl Client {
    /// Connects to `url` (`ws://127.0.0.1:1234/some/room`: the room is the path) with default
    /// options, sends sync step 1 and returns; the document syncs in the background (see
    /// [`Client::wait_synced`]).
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Self::connect_with(url, ClientOptions::default()).await
    }

    /// Connects to `url` with `options`: opens the WebSocket, sends sync step 1 with our state
    /// vector and, if [`ClientOptions::initial_awareness`] is set, our awareness, then hands the
    /// socket to a background task.
    pub async fn connect_with(url: &str, options: ClientOptions) -> Result<Client, ClientError> {
        validate(&options)?;
        let request = build_request(url, &options)?;
        let (mut ws, _response) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| ClientError::Connect(Box::new(e)))?;

        let doc = match options.client_id {
            Some(id) => Doc::with_client_id(id),
            None => Doc::new(),
        };
        let client_id = doc.client_id().get();
        let mut awareness = AwarenessMap::new(client_id);
        if let Some(state) = options.initial_awareness.clone() {
            awareness.set_local(Some(state), Instant::now().into_std());
        }
        let awareness_frame = awareness
            .encode_local()
            .map(|p| Message::Awareness(&p).to_frame());

        let (outbox, outbox_rx) = mpsc::channel(options.outbox_capacity);
        let shared = Arc::new(Shared {
            client_id,
            options,
            status: watch::Sender::new(Status::default()),
            awareness: Mutex::new(awareness),
            outbox,
            wake: tokio::sync::Notify::new(),
            queued_updates: AtomicU64::new(0),
        });
        observe_local_updates(&doc, &shared)?;

        let state_vector = doc.transact().state_vector().encode_v1();
        let step1 = Message::Sync(SyncMessage::Step1(&state_vector)).to_frame();
        let ack_request = shared
            .options
            .acknowledgements
            .then(|| Message::AckRequest.to_frame());
        let handshake = async {
            // The acknowledgement request comes first, so that every update message we send on
            // this connection is counted by the server, the step 2 answering its step 1 included.
            if let Some(frame) = ack_request {
                ws.feed(WsMessage::Binary(Bytes::from(frame))).await?;
            }
            // One message a frame: stock y-websocket servers read only the first of a frame.
            ws.feed(WsMessage::Binary(Bytes::from(step1))).await?;
            if let Some(frame) = awareness_frame {
                ws.feed(WsMessage::Binary(Bytes::from(frame))).await?;
            }
            ws.flush().await
        };
        handshake
            .await
            .map_err(|e| ClientError::Connect(Box::new(e)))?;

        let (alive, alive_rx) = oneshot::channel();
        tokio::spawn(connection::run(
            ws,
            doc.clone(),
            Arc::clone(&shared),
            outbox_rx,
            alive_rx,
        ));
        tracing::debug!(client_id, url, "connected");
        Ok(Client {
            inner: Arc::new(Inner {
                doc,
                shared,
                _alive: alive,
            }),
        })
    }

    /// The synchronised document. Edit it in ordinary transactions; each committed change is
    /// sent to the server. Do not hold a transaction across an `.await`: the connection task needs
    /// the document to apply remote updates.
    pub fn doc(&self) -> &Doc {
        &self.inner.doc
    }

    /// Our Yjs client id (the document's), also our awareness id.
    pub fn client_id(&self) -> u64 {
        self.inner.shared.client_id
    }

    /// Waits until the server's step 2, its answer to our step 1, has been applied: from then on
    /// the document holds everything the room held when we joined.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), ClientError> {
        self.wait(timeout, |status| until(status.synced, status))
            .await
    }

    /// Waits until `pred` holds for the document. It is checked now and again after every
    /// remote update applied.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&Doc) -> bool,
    ) -> Result<(), ClientError> {
        self.wait(timeout, |status| until(pred(&self.inner.doc), status))
            .await
    }

    /// Waits until the server has acknowledged that every local edit made before this call is
    /// stored (tandem's storage acknowledgements, [`ClientOptions::acknowledgements`]).
    ///
    /// "Made before this call" includes edits whose update is still queued for the connection
    /// task: their frames are counted when the document's observer queues them, and the wait
    /// covers every sync step 2 and update message up to the last of them on the wire. A server
    /// acknowledges an update only once the write holding it has committed, so when this returns
    /// `Ok` those edits survive a crash of the server.
    ///
    /// Errors: [`ClientError::AcknowledgementsOff`] if the client did not ask for
    /// acknowledgements; [`ClientError::Timeout`] if they did not all come in time (the server
    /// withholds them while its store is down); [`ClientError::Closed`] or
    /// [`ClientError::Failed`] if the connection ended first. An edit that was not acknowledged
    /// before the connection ended may or may not be stored: send the document's state again on
    /// a new connection (the merge is idempotent) and wait there.
    pub async fn wait_stored(&self, timeout: Duration) -> Result<(), ClientError> {
        let shared = &self.inner.shared;
        if !shared.options.acknowledgements {
            return Err(ClientError::AcknowledgementsOff);
        }
        let queued = shared.queued_updates.load(Ordering::SeqCst);
        // Fixed once every frame queued before the call is on the wire: later edits do not
        // move it, so a steady stream of edits cannot keep this waiting.
        let mut target = None;
        self.wait(timeout, |status| {
            if target.is_none() && status.sent_local >= queued {
                target = Some(status.sent_updates);
            }
            until(target.is_some_and(|t| status.stored >= t), status)
        })
        .await
    }

    /// How many of the update messages (sync step 2 and update) sent on this connection the
    /// server has acknowledged as stored: the highest `Stored(n)` received, 0 if none.
    pub fn stored(&self) -> u64 {
        self.inner.shared.status.borrow().stored
    }

    /// How many update messages (sync step 2 and update) the client has written to the socket so
    /// far: the numbers [`Client::stored`] refers to. Local edits still queued are not counted.
    pub fn sent_updates(&self) -> u64 {
        self.inner.shared.status.borrow().sent_updates
    }

    /// Sets our awareness state and sends it with a bumped clock. While set, it is renewed every
    /// half [`ClientOptions::awareness_timeout`] so that peers do not expire it.
    pub fn set_awareness(&self, state: Value) {
        self.set_local_awareness(Some(state));
    }

    /// Removes our awareness state: sends a `null` state with a bumped clock.
    pub fn clear_awareness(&self) {
        self.set_local_awareness(None);
    }

    /// Every known non-null awareness state by client id, ours included. Remote states are
    /// merged with y-protocols' clock rules and dropped when they expire or the connection ends.
    pub fn awareness(&self) -> HashMap<u64, Value> {
        self.inner.shared.awareness().states()
    }

    /// Waits until `pred` holds for [`Client::awareness`]. It is checked now and again after
    /// every change to the connection's state (awareness messages included).
    pub async fn wait_awareness(
        &self,
        timeout: Duration,
        pred: impl Fn(&HashMap<u64, Value>) -> bool,
    ) -> Result<(), ClientError> {
        self.wait(timeout, |status| until(pred(&self.awareness()), status))
            .await
    }

    /// How the connection ended, once it has.
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.inner.shared.status.borrow().closed.clone()
    }

    /// Waits until the connection has ended and says how.
    pub async fn wait_closed(&self, timeout: Duration) -> Result<CloseInfo, ClientError> {
        self.wait(timeout, |status| status.closed.clone().map(Ok))
            .await
    }

    /// Closes the connection for every clone of this client: sends a `null` awareness state if we
    /// had one, then a close frame (1000), and waits for the connection task to finish (at most
    /// about twice [`ClientOptions::close_timeout`]). Closing an ended connection is a no-op.
    pub async fn close(self) -> Result<(), ClientError> {
        let shared = &self.inner.shared;
        if shared.status.borrow().closed.is_some() {
            return Ok(());
        }
        let limit = shared.options.close_timeout * 2;
        let leave = {
            let mut map = shared.awareness();
            map.local_state().is_some().then(|| {
                map.set_local(None, Instant::now().into_std());
                map.encode_local().expect("just set")
            })
        };
        let request = async {
            if let Some(payload) = leave {
                let frame = Bytes::from(Message::Awareness(&payload).to_frame());
                shared.outbox.send(Outbound::Frame(frame)).await?;
            }
            shared.outbox.send(Outbound::Close).await
        };
        // An error means the task has already ended: nothing to close.
        match tokio::time::timeout(limit, request).await {
            Ok(_) => {}
            Err(_) => return Err(ClientError::Timeout(limit)),
        }
        self.wait_closed(limit).await.map(|_| ())
    }

    /// Sets our state in the map and queues the awareness message that announces it.
    fn set_local_awareness(&self, state: Option<Value>) {
        let shared = &self.inner.shared;
        let payload = {
            let mut map = shared.awareness();
            map.set_local(state, Instant::now().into_std());
            map.encode_local().expect("just set")
        };
        shared.queue(Message::Awareness(&payload).to_frame());
        shared.changed();
    }

    /// Waits until `check` gives an answer; `check` runs now and after every status change.
    async fn wait<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Status) -> Option<Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut rx = self.inner.shared.status.subscribe();
        loop {
            // Marking the version seen before checking means no change can slip in between.
            let status = rx.borrow_and_update().clone();
            if let Some(answer) = check(&status) {
                return answer;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `Shared`, which we hold: it cannot be gone.
                Ok(Err(_)) | Err(_) => return Err(ClientError::Timeout(timeout)),
            }
        }
    }
}

/// The answer of a `wait_*` check: done once `holds`; otherwise, if the client has failed or the
/// connection has ended, that is the error (the condition is checked first, so a document that
/// already satisfies a predicate still does after the connection closed).
fn until(holds: bool, status: &Status) -> Option<Result<(), ClientError>> {
    if holds {
        return Some(Ok(()));
    }
    if let Some(failure) = &status.failure {
        return Some(Err(ClientError::Failed(failure.clone())));
    }
    status
        .closed
        .clone()
        .map(|info| Err(ClientError::Closed(info)))
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.inner.shared.status.borrow();
        f.debug_struct("Client")
            .field("client_id", &self.client_id())
            .field("synced", &status.synced)
            .field("closed", &status.closed)
            .field("failure", &status.failure)
            .field("sent_updates", &status.sent_updates)
            .field("stored", &status.stored)
            .finish()
    }
}

/// Rejects options that cannot work.
fn validate(options: &ClientOptions) -> Result<(), ClientError> {
    if options.client_id.is_some_and(|id| id > MAX_VAR_UINT) {
        return Err(ClientError::InvalidOption("client_id must be below 2^53"));
    }
    if options.outbox_capacity == 0 {
        return Err(ClientError::InvalidOption(
            "outbox_capacity must be at least 1",
        ));
    }
    if options.awareness_timeout < Duration::from_millis(10) {
        return Err(ClientError::InvalidOption(
            "awareness_timeout must be at least 10 ms",
        ));
    }
    Ok(())
}

/// The upgrade request for `url`, with the configured headers and bearer token.
fn build_request(url: &str, options: &ClientOptions) -> Result<Request, ClientError> {
    let invalid =
        |what: &str, e: &dyn std::fmt::Display| ClientError::InvalidRequest(format!("{what}: {e}"));
    let mut request = url.into_client_request().map_err(|e| invalid(url, &e))?;
    for (name, value) in &options.headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(name, &e))?;
        let value = HeaderValue::from_str(value).map_err(|e| invalid(name, &e))?;
        request.headers_mut().append(header, value);
    }
    if let Some(token) = &options.bearer_token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| invalid("bearer token", &e))?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    Ok(request)
}

/// Registers the observer that sends every committed local change as a sync update. Changes
/// applied from the server carry [`REMOTE_ORIGIN`] and are skipped.
fn observe_local_updates(doc: &Doc, shared: &Arc<Shared>) -> Result<(), ClientError> {
    let shared = Arc::clone(shared);
    let remote = Origin::from(REMOTE_ORIGIN);
    doc.observe_update_v1(OBSERVER_KEY, move |txn, event| {
        if txn.origin() == Some(&remote) {
            return;
        }
        shared.queue_update(Message::Sync(SyncMessage::Update(&event.update)).to_frame());
    })
    .map_err(|_| ClientError::InvalidOption("the new document is locked by a transaction"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_headers_and_bearer_token() {
        let options = ClientOptions {
            bearer_token: Some("s3cret".into()),
            headers: vec![("x-tandem-test".into(), "1".into())],
            ..Default::default()
        };
        let request = build_request("ws://127.0.0.1:1234/a/b?x=1", &options).unwrap();
        assert_eq!(request.uri().path(), "/a/b");
        assert_eq!(request.headers()["authorization"], "Bearer s3cret");
        assert_eq!(request.headers()["x-tandem-test"], "1");
    }

    #[test]
    fn bad_urls_and_headers_are_invalid_requests() {
        let bad_header = ClientOptions {
            headers: vec![("bad header".into(), "1".into())],
            ..Default::default()
        };
        assert!(matches!(
            build_request("ws://h/r", &bad_header),
            Err(ClientError::InvalidRequest(_))
        ));
        assert!(matches!(
            build_request("not a url", &ClientOptions::default()),
            Err(ClientError::InvalidRequest(_))
        ));
    }

    #[test]
    fn out_of_range_options_are_rejected() {
        let too_big = ClientOptions {
            client_id: Some(1 << 53),
            ..Default::default()
        };
        assert!(matches!(
            validate(&too_big),
            Err(ClientError::InvalidOption(_))
        ));
        let no_outbox = ClientOptions {
            outbox_capacity: 0,
            ..Default::default()
        };
        assert!(matches!(
            validate(&no_outbox),
            Err(ClientError::InvalidOption(_))
        ));
        let max_id = ClientOptions {
            client_id: Some(MAX_VAR_UINT),
            ..Default::default()
        };
        assert!(validate(&max_id).is_ok());
    }
}
