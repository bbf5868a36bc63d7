//! Who may join which room: JSON Web Tokens verified against configured keys, and the room
//! grants they carry (see [`rules`]). Without keys every connection may read and write, which
//! the configuration allows only on loopback unless `--insecure-no-auth` says otherwise.

pub mod keys;
pub mod rules;
pub mod token;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, decode_header, Validation};
use serde::Deserialize;
use tandem_protocol::CloseCode;

pub use keys::{KeyError, KeySet, KeySources};
pub use rules::{Access, RoomRules};

/// How connections are authenticated and what read-only connections may do.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Verification keys; none means no authentication.
    pub keys: KeySources,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` (the token's audience must include it), when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Serve without keys on a non-loopback address.
    pub insecure_no_auth: bool,
    /// Whether read-only connections may publish presence.
    pub readonly_awareness: bool,
    /// Browser origins allowed to open WebSockets; empty means any.
    pub allowed_origins: Vec<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            keys: KeySources::default(),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            insecure_no_auth: false,
            readonly_awareness: true,
            allowed_origins: Vec::new(),
        }
    }
}

/// The claims tandem reads from a token.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// A display name, if the issuer gave one.
    #[serde(default)]
    pub name: Option<String>,
    /// Room patterns and the access they grant.
    #[serde(default)]
    pub rooms: RoomRules,
}

/// What an accepted connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's `sub`, or `anonymous` without authentication.
    pub user: String,
    /// Read-write or read-only.
    pub access: Access,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token came with the request.
    #[error("a token is required")]
    Missing,
    /// The token is not acceptable: malformed, badly signed, expired, for someone else.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// The token is valid but grants nothing in this room.
    #[error("the token does not grant access to this room")]
    Forbidden,
}

impl AuthError {
    /// The close code the connection gets: 4401 without valid credentials, 4403 without a grant.
    pub fn close_code(&self) -> CloseCode {
        match self {
            AuthError::Missing | AuthError::Invalid(_) => CloseCode::Unauthorized,
            AuthError::Forbidden => CloseCode::Forbidden,
        }
    }

    /// A stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::Forbidden => "forbidden",
        }
    }
}

/// Verifies tokens and grants rooms. Cheap to share; keys reload in place.
pub struct Authenticator {
    sources: KeySources,
    keys: RwLock<Arc<KeySet>>,
    settings: AuthSettings,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads the configured keys.
    pub fn new(settings: AuthSettings) -> Result<Self, KeyError> {
        let keys = settings.keys.load()?;
        Ok(Self {
            sources: settings.keys.clone(),
            keys: RwLock::new(Arc::new(keys)),
            settings,
        })
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        !self.sources.is_empty()
    }

    /// The settings this authenticator was made with.
    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// Reads the key files again; on failure the old keys stay in use. Returns how many keys
    /// are now loaded.
    pub fn reload(&self) -> Result<usize, KeyError> {
        let keys = self.sources.load()?;
        let n = keys.keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    /// Whether a browser page from `origin` may open a WebSocket here.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let allowed = &self.settings.allowed_origins;
        allowed.is_empty()
            || allowed
                .iter()
                .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    }

    /// Decides whether the holder of `token` may join `room`, and how.
    pub fn authorize(&self, token: Option<&str>, room: &str) -> Result<Grant, AuthError> {
        if !self.enabled() {
            return Ok(Grant {
                user: "anonymous".into(),
                access: Access::ReadWrite,
            });
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let claims = self.verify(token)?;
        let access = claims.rooms.access(room).ok_or(AuthError::Forbidden)?;
        Ok(Grant {
            user: claims.sub,
            access,
        })
    }

    /// Checks a token's signature and time and audience claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed, or an unsupported algorithm"))?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let fits = |k: &&keys::VerificationKey| k.algorithms.contains(&header.alg);
        let by_kid: Vec<_> = match &header.kid {
            Some(kid) => keys
                .keys
                .iter()
                .filter(fits)
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect(),
            None => Vec::new(),
        };
        let candidates: Vec<_> = if by_kid.is_empty() {
            keys.keys
                .iter()
                .filter(fits)
                .filter(|k| k.kid.is_none() || header.kid.is_none())
                .collect()
        } else {
            by_kid
        };
        if candidates.is_empty() {
            return Err(AuthError::Invalid("no key for this algorithm"));
        }
        let mut last = AuthError::Invalid("bad signature");
        for key in candidates {
            let mut v = Validation::new(header.alg);
            v.algorithms = key.algorithms.clone();
            v.leeway = self.settings.leeway.as_secs();
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "sub"]);
            match &self.settings.audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    v.required_spec_claims.insert("aud".into());
                }
                None => v.validate_aud = false,
            }
            if let Some(iss) = &self.settings.issuer {
                v.set_issuer(&[iss]);
                v.required_spec_claims.insert("iss".into());
            }
            match decode::<Claims>(token, &key.key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                            AuthError::Invalid("bad signature")
                        }
                        ErrorKind::ExpiredSignature => AuthError::Invalid("expired"),
                        ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet"),
                        ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience"),
                        ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer"),
                        ErrorKind::MissingRequiredClaim(_) => {
                            AuthError::Invalid("a required claim is missing")
                        }
                        ErrorKind::Json(_) => AuthError::Invalid("claims of the wrong shape"),
                        _ => AuthError::Invalid("malformed"),
                    };
                    // Only a bad signature means another key might fit.
                    if last != AuthError::Invalid("bad signature") {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}
