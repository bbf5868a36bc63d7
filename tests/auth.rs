//! Authentication and permissions, attacked: forged, `alg: none`, expired, not-yet-valid,
//! wrong-audience and wrong-room tokens, algorithm confusion, read-only writers and cross-origin
//! upgrades. After each refusal a normal client still works, stored data is intact, and the
//! refusal was counted.

mod common;
#[path = "common/procs.rs"]
mod procs;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{append_text, text, TestServer, WAIT};
use futures_util::StreamExt;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tandem::config::Config;
use tandem::metrics::{Refused, METRICS};
use tandem_client::{Client, ClientOptions};
use tandem_protocol::{CloseCode, Message, MessageReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message as Ws;

const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";
const AUDIENCE: &str = "tandem-tests";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `rooms`, valid for an hour, for our audience.
fn claims(rooms: Value) -> Value {
    json!({ "sub": "ada", "name": "Ada", "rooms": rooms, "exp": now() + 3600, "aud": AUDIENCE })
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn signed(alg: Algorithm, kid: Option<&str>, private_pem: &str, claims: &Value) -> String {
    let pem = std::fs::read(fixture(private_pem)).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no fixture for {other:?}"),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &key).unwrap()
}

/// A node that requires tokens: the shared secret, the RSA and EC PEM keys and the JWKS file.
async fn secured(tweak: impl FnOnce(&mut Config)) -> TestServer {
    TestServer::start_with(|c| {
        c.auth.keys.secret = Some(SECRET.into());
        c.auth.keys.files = vec![
            fixture("rsa-public.pem"),
            fixture("ec-public.pem"),
            fixture("jwks.json"),
        ];
        c.auth.audience = Some(AUDIENCE.into());
        tweak(c);
    })
    .await
}

/// A `tandem` process on loopback with `args`.
async fn procs_start(args: &[String]) -> procs::TandemProcess {
    procs::TandemProcess::start(&common::tandem_bin(), "auth", args).await
}

fn with_token(url: &str, token: &str) -> String {
    format!("{url}?token={token}")
}

/// Connects with `token` in the query and waits for the first sync.
async fn client(server: &TestServer, room: &str, token: &str) -> Client {
    let c = Client::connect(&with_token(&server.url(room), token))
        .await
        .unwrap();
    c.wait_synced(WAIT).await.unwrap();
    c
}

/// Opens a raw socket to `url` and returns what the server sent before closing: the
/// permission-denied reason (if any) and the close code and reason.
async fn refused_at(url: &str) -> (Option<String>, u16, String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    let mut denied = None;
    let read = async {
        while let Some(msg) = ws.next().await {
            match msg.expect("socket error before the close") {
                Ws::Binary(b) => {
                    if let Some(Ok(Message::AuthDenied(reason))) = MessageReader::new(&b).next() {
                        denied = Some(reason.to_owned());
                    }
                }
                Ws::Close(Some(frame)) => return (u16::from(frame.code), frame.reason.to_string()),
                Ws::Close(None) => panic!("close without a code"),
                _ => {}
            }
        }
        panic!("socket ended without a close frame")
    };
    let (code, reason) = tokio::time::timeout(WAIT, read)
        .await
        .expect("closed in time");
    (denied, code, reason)
}

/// `room` holds "kept", written with a valid token and stored.
async fn seed(server: &TestServer, room: &str) -> Client {
    let writer = client(server, room, &hs256(&claims(json!({ "*": "rw" })))).await;
    append_text(writer.doc(), "t", "kept");
    writer.wait_stored(WAIT).await.unwrap();
    writer
}

/// A refused token: the permission-denied message, the close code, the metric; then the room
/// still serves a good client everything it stored.
async fn assert_refused(token: Option<&str>, want: CloseCode, metric: Refused, reason_has: &str) {
    let server = secured(|_| {}).await;
    let _writer = seed(&server, "vault").await;
    let before = METRICS.refused.get(metric);
    let closes_before = METRICS.closes.get(want);
    let url = match token {
        Some(t) => with_token(&server.url("vault"), t),
        None => server.url("vault"),
    };
    let (denied, code, reason) = refused_at(&url).await;
    assert_eq!(code, want.code(), "reason: {reason}");
    assert!(
        reason.contains(reason_has),
        "{reason:?} lacks {reason_has:?}"
    );
    assert_eq!(
        denied.as_deref(),
        Some(reason.as_str()),
        "permission-denied message first"
    );
    assert_eq!(METRICS.refused.get(metric), before + 1);
    assert_eq!(METRICS.closes.get(want), closes_before + 1);
    let reader = client(&server, "vault", &hs256(&claims(json!({ "vault": "r" })))).await;
    assert_eq!(text(reader.doc(), "t"), "kept");
}

#[tokio::test]
async fn no_token_is_unauthorized() {
    assert_refused(
        None,
        CloseCode::Unauthorized,
        Refused::MissingToken,
        "token is required",
    )
    .await;
}

#[tokio::test]
async fn a_forged_signature_is_unauthorized() {
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({ "*": "rw" })),
        &EncodingKey::from_secret(b"not-the-server-secret-not-the-server-secret"),
    )
    .unwrap();
    assert_refused(
        Some(&forged),
        CloseCode::Unauthorized,
        Refused::InvalidToken,
        "bad signature",
    )
    .await;
}

#[tokio::test]
async fn a_tampered_payload_is_unauthorized() {
    // A valid token for "lobby" whose payload is swapped for one granting every room.
    let good = hs256(&claims(json!({ "lobby": "r" })));
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let evil = b64.encode(claims(json!({ "*": "rw" })).to_string());
    let tampered = format!("{}.{}.{}", parts[0], evil, parts[2]);
    assert_refused(
        Some(&tampered),
        CloseCode::Unauthorized,
        Refused::InvalidToken,
        "bad signature",
    )
    .await;
}

#[tokio::test]
async fn alg_none_is_unauthorized() {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64.encode(claims(json!({ "*": "rw" })).to_string());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        assert_refused(
            Some(&token),
            CloseCode::Unauthorized,
            Refused::InvalidToken,
            "invalid token",
        )
        .await;
    }
}

#[tokio::test]
async fn algorithm_confusion_is_unauthorized() {
    // The classic attack: an HS256 token whose HMAC key is the server's RSA *public* key.
    let public = std::fs::read(fixture("rsa-public.pem")).unwrap();
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({ "*": "rw" })),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    assert_refused(
        Some(&token),
        CloseCode::Unauthorized,
        Refused::InvalidToken,
        "bad signature",
    )
    .await;
}

#[tokio::test]
async fn an_expired_token_is_unauthorized() {
    let mut c = claims(json!({ "*": "rw" }));
    c["exp"] = json!(now() - 3600);
    assert_refused(
        Some(&hs256(&c)),
        CloseCode::Unauthorized,
        Refused::InvalidToken,
        "expired",
    )
    .await;
}

#[tokio::test]
async fn a_token_without_expiry_is_unauthorized() {
    let mut c = claims(json!({ "*": "rw" }));
    c.as_object_mut().unwrap().remove("exp");
    assert_refused(
        Some(&hs256(&c)),
        CloseCode::Unauthorized,
        Refused::InvalidToken,
        "required claim",
    )
    .await;
}

#[tokio::test]
async fn a_not_yet_valid_token_is_unauthorized() {
    let mut c = claims(json!({ "*": "rw" }));
    c["nbf"] = json!(now() + 3600);
    assert_refused(
        Some(&hs256(&c)),
        CloseCode::Unauthorized,
        Refused::InvalidToken,
        "not valid yet",
    )
    .await;
}

#[tokio::test]
async fn a_wrong_audience_is_unauthorized() {
    let mut c = claims(json!({ "*": "rw" }));
    c["aud"] = json!("someone-else");
    assert_refused(
        Some(&hs256(&c)),
        CloseCode::Unauthorized,
        Refused::InvalidToken,
        "wrong audience",
    )
    .await;
}

#[tokio::test]
async fn a_token_for_another_room_is_forbidden() {
    let token = hs256(&claims(json!({ "acme/*": "rw", "lobby": "r" })));
    assert_refused(
        Some(&token),
        CloseCode::Forbidden,
        Refused::Forbidden,
        "does not grant",
    )
    .await;
}

#[tokio::test]
async fn every_key_kind_and_every_token_carrier_is_accepted() {
    let server = secured(|_| {}).await;
    let grant = claims(json!({ "team/*": "rw" }));
    let tokens = [
        ("HS256", hs256(&grant)),
        (
            "RS256 PEM",
            signed(Algorithm::RS256, None, "rsa-private.pem", &grant),
        ),
        (
            "RS256 JWKS kid",
            signed(Algorithm::RS256, Some("rsa-1"), "rsa-private.pem", &grant),
        ),
        (
            "ES256 PEM",
            signed(Algorithm::ES256, None, "ec-private.pem", &grant),
        ),
        (
            "EdDSA JWKS kid",
            signed(Algorithm::EdDSA, Some("ed-1"), "ed-private.pem", &grant),
        ),
    ];
    for (what, token) in &tokens {
        let c = Client::connect(&with_token(&server.url("team/doc"), token))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        c.wait_synced(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        append_text(c.doc(), "t", what);
        c.wait_stored(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // EdDSA with an unknown kid finds no key.
    let unknown = signed(Algorithm::EdDSA, Some("ed-9"), "ed-private.pem", &grant);
    let (_, code, reason) = refused_at(&with_token(&server.url("team/doc"), &unknown)).await;
    assert_eq!(code, 4401, "{reason}");

    // A bot's Authorization header.
    let bot = Client::connect_with(
        &server.url("team/doc"),
        ClientOptions {
            bearer_token: Some(tokens[0].1.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    bot.wait_synced(WAIT).await.unwrap();
    assert!(text(bot.doc(), "t").contains("EdDSA JWKS kid"));

    // A browser's subprotocol entry: the server selects `tandem`.
    let mut request = server.url("team/doc").into_client_request().unwrap();
    let offer = format!("tandem, bearer.{}", tokens[1].1);
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&offer).unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "tandem");
    // The server's step 1 arrives: admitted.
    let first = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first, Ws::Binary(_)), "{first:?}");
}

#[tokio::test]
async fn a_read_only_client_gets_everything_and_changes_nothing() {
    let server = secured(|_| {}).await;
    let writer = seed(&server, "board").await;
    let dropped = METRICS.readonly_writes_dropped.get();
    let reader = client(&server, "board", &hs256(&claims(json!({ "board": "r" })))).await;
    assert_eq!(text(reader.doc(), "t"), "kept");

    append_text(reader.doc(), "t", "+evil");
    // The session drops it on arrival; wait for that before the next step.
    let deadline = tokio::time::Instant::now() + WAIT;
    while METRICS.readonly_writes_dropped.get() == dropped {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the read-only write was never seen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Later writes still reach the reader; the writer never saw the reader's edit.
    append_text(writer.doc(), "t", "+more");
    writer.wait_stored(WAIT).await.unwrap();
    reader
        .wait_until(WAIT, |d| text(d, "t").contains("+more"))
        .await
        .unwrap();
    assert_eq!(text(writer.doc(), "t"), "kept+more");
    let late = client(&server, "board", &hs256(&claims(json!({ "board": "rw" })))).await;
    assert_eq!(text(late.doc(), "t"), "kept+more");

    // And nothing of it is stored.
    drop((writer, reader, late));
    let mut server = server;
    server.restart().await;
    let after = client(&server, "board", &hs256(&claims(json!({ "board": "r" })))).await;
    assert_eq!(text(after.doc(), "t"), "kept+more");
}

#[tokio::test]
async fn read_only_presence_follows_the_flag() {
    for allowed in [true, false] {
        let server = secured(|c| c.auth.readonly_awareness = allowed).await;
        let writer = client(&server, "p", &hs256(&claims(json!({ "p": "rw" })))).await;
        let dropped = METRICS.readonly_writes_dropped.get();
        let reader = Client::connect_with(
            &with_token(&server.url("p"), &hs256(&claims(json!({ "p": "r" })))),
            ClientOptions {
                initial_awareness: Some(json!({ "user": "reader" })),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        reader.wait_synced(WAIT).await.unwrap();
        let reader_id = reader.client_id();
        if allowed {
            writer
                .wait_awareness(WAIT, |states| states.contains_key(&reader_id))
                .await
                .unwrap();
        } else {
            // The session drops the reader's presence on arrival and counts it.
            let deadline = tokio::time::Instant::now() + WAIT;
            while METRICS.readonly_writes_dropped.get() == dropped {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "presence never dropped"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(!writer.awareness().contains_key(&reader_id));
        }
    }
}

#[tokio::test]
async fn a_cross_origin_upgrade_is_refused() {
    let server = secured(|c| {
        c.auth.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let _writer = seed(&server, "o").await;
    let token = hs256(&claims(json!({ "o": "rw" })));
    let before = METRICS.refused.get(Refused::Origin);
    let upgrade = |origin: Option<&'static str>| {
        let mut request = with_token(&server.url("o"), &token)
            .into_client_request()
            .unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", HeaderValue::from_static(origin));
        }
        tokio_tungstenite::connect_async(request)
    };
    match upgrade(Some("https://evil.example.net")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
        }
        other => panic!(
            "a cross-origin upgrade must get 403, got {:?}",
            other.map(|r| r.1)
        ),
    }
    assert_eq!(METRICS.refused.get(Refused::Origin), before + 1);
    // The allowed origin and non-browser clients (no Origin) are served.
    for origin in [Some("https://app.example.com"), None] {
        let (mut ws, _) = upgrade(origin).await.unwrap();
        let first = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(first, Ws::Binary(_)), "{first:?}");
    }
    let reader = client(&server, "o", &token).await;
    assert_eq!(text(reader.doc(), "t"), "kept");
}

#[tokio::test]
async fn keys_reload_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.pem");
    std::fs::copy(fixture("ec-public.pem"), &keys).unwrap();
    let server = TestServer::start_with(|c| c.auth.keys.files = vec![keys.clone()]).await;
    let grant = claims(json!({ "*": "rw" }));
    let rsa = signed(Algorithm::RS256, None, "rsa-private.pem", &grant);
    let (_, code, _) = refused_at(&with_token(&server.url("r"), &rsa)).await;
    assert_eq!(code, 4401);

    // A broken file keeps the old keys.
    std::fs::write(&keys, "not a key").unwrap();
    let auth = server.running().authenticator();
    assert!(auth.reload().is_err());
    let ec = signed(Algorithm::ES256, None, "ec-private.pem", &grant);
    client(&server, "r", &ec).await;

    std::fs::copy(fixture("rsa-public.pem"), &keys).unwrap();
    assert_eq!(auth.reload().unwrap(), 1);
    client(&server, "r", &rsa).await;
    let (_, code, _) = refused_at(&with_token(&server.url("r"), &ec)).await;
    assert_eq!(code, 4401);
}

#[tokio::test]
async fn a_public_bind_without_keys_refuses_to_start() {
    let out = tokio::process::Command::new(common::tandem_bin())
        .args(["--bind", "0.0.0.0:0", "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .env_remove("TANDEM_JWT_SECRET")
        .env_remove("TANDEM_JWT_KEYS")
        .env_remove("TANDEM_INSECURE_NO_AUTH")
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without authentication"), "{stderr}");
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
}

#[tokio::test]
async fn a_short_secret_is_refused_at_start() {
    let out = tokio::process::Command::new(common::tandem_bin())
        .args([
            "--bind",
            "127.0.0.1:0",
            "--jwt-secret",
            "tiny-s3cret-x9",
            "--data-dir",
        ])
        .arg(tempfile::tempdir().unwrap().path())
        .output();
    let out = tokio::time::timeout(WAIT, out).await.unwrap().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 32 bytes"), "{stderr}");
    assert!(
        !stderr.contains("tiny-s3cret-x9"),
        "the secret must never be logged: {stderr}"
    );
}

#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let token = hs256(&claims(json!({ "*": "rw" })));
    let bad = format!("{token}x");
    let secret_arg = format!("--jwt-secret={SECRET}");
    let node = procs_start(&[secret_arg, "--log-format=text".into()]).await;
    let good = Client::connect(&with_token(&node.url("logged"), &token))
        .await
        .unwrap();
    good.wait_synced(WAIT).await.unwrap();
    let (_, code, _) = refused_at(&with_token(&node.url("logged"), &bad)).await;
    assert_eq!(code, 4401);
    drop(good);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = node.logs(500);
    assert!(logs.contains("connection refused"), "{logs}");
    // At the default level there is no connection span: the line names the room and client.
    assert!(
        logs.lines().any(|l| l.contains("connection refused")
            && l.contains("logged")
            && l.contains("127.0.0.1")),
        "the refusal names neither its room nor its client:\n{logs}"
    );
    let signature = token.rsplit('.').next().unwrap();
    assert!(
        !logs.contains(signature),
        "a token reached the logs:\n{logs}"
    );
    assert!(
        !logs.contains(SECRET),
        "the secret reached the logs:\n{logs}"
    );
    assert!(
        !logs.contains("token="),
        "a query string reached the logs:\n{logs}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.pem");
    std::fs::copy(fixture("ec-public.pem"), &keys).unwrap();
    let node = procs_start(&[format!("--jwt-keys={}", keys.display())]).await;
    let rsa = signed(
        Algorithm::RS256,
        None,
        "rsa-private.pem",
        &claims(json!({ "*": "rw" })),
    );
    let (_, code, _) = refused_at(&with_token(&node.url("h"), &rsa)).await;
    assert_eq!(code, 4401);
    std::fs::copy(fixture("rsa-public.pem"), &keys).unwrap();
    node.signal("HUP");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !node.logs(50).contains("JWT keys reloaded") {
        assert!(tokio::time::Instant::now() < deadline, "{}", node.logs(50));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = Client::connect(&with_token(&node.url("h"), &rsa))
        .await
        .unwrap();
    c.wait_synced(WAIT).await.unwrap();
}

#[tokio::test]
async fn without_keys_on_loopback_everyone_may_write() {
    let server = TestServer::start().await;
    let a = Client::connect(&server.url("open")).await.unwrap();
    a.wait_synced(WAIT).await.unwrap();
    append_text(a.doc(), "t", "hi");
    a.wait_stored(WAIT).await.unwrap();
    // A token is not looked at when no keys are configured.
    let b = Client::connect(&with_token(&server.url("open"), "not-even-a-jwt"))
        .await
        .unwrap();
    b.wait_synced(WAIT).await.unwrap();
    assert_eq!(text(b.doc(), "t"), "hi");
}
