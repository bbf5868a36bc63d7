//! Verification keys: a shared HMAC secret, PEM public keys and JWKS files, reloadable.

use std::path::PathBuf;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("cannot read key file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file holds something that is not a supported public key.
    #[error("key file {}: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The secret is too short to be safe.
    #[error("the JWT secret must be at least 32 bytes long")]
    WeakSecret,
}

/// One key and the algorithms a token signed with it may name.
pub struct VerificationKey {
    /// `kid` from a JWKS entry; tokens naming another kid skip this key.
    pub kid: Option<String>,
    /// The key.
    pub key: DecodingKey,
    /// Algorithms of the key's family only: a public key can never verify an HMAC token.
    pub algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Every key the server accepts tokens from.
#[derive(Debug, Default)]
pub struct KeySet {
    /// The keys, secret first, then files in the order given.
    pub keys: Vec<VerificationKey>,
}

/// Where keys come from; [`KeySources::load`] reads them (again, on SIGHUP).
#[derive(Clone, Default)]
pub struct KeySources {
    /// Shared HMAC secret (HS256/384/512).
    pub secret: Option<String>,
    /// PEM public keys (RSA, EC P-256/P-384, Ed25519; several blocks per file allowed) or JWKS
    /// files (a JSON object with `keys`, or a single JWK).
    pub files: Vec<PathBuf>,
}

impl std::fmt::Debug for KeySources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySources")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("files", &self.files)
            .finish()
    }
}

impl KeySources {
    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.secret.is_none() && self.files.is_empty()
    }

    /// Reads every key.
    pub fn load(&self) -> Result<KeySet, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = &self.secret {
            if secret.len() < 32 {
                return Err(KeyError::WeakSecret);
            }
            keys.push(VerificationKey {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithms: HMAC.to_vec(),
            });
        }
        for path in &self.files {
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
                path: path.clone(),
                source,
            })?;
            let parse = |reason: String| KeyError::Parse {
                path: path.clone(),
                reason,
            };
            if text.trim_start().starts_with('{') {
                keys.extend(jwks(&text).map_err(parse)?);
            } else {
                keys.extend(pem_keys(&text).map_err(parse)?);
            }
        }
        Ok(KeySet { keys })
    }
}

/// Keys of a JWKS document (or of a single JWK).
fn jwks(text: &str) -> Result<Vec<VerificationKey>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let set: Vec<Jwk> = if value.get("keys").is_some() {
        serde_json::from_value::<JwkSet>(value)
            .map_err(|e| format!("not a JWK set: {e}"))?
            .keys
    } else {
        vec![serde_json::from_value(value).map_err(|e| format!("not a JWK: {e}"))?]
    };
    if set.is_empty() {
        return Err("the JWK set holds no keys".into());
    }
    set.iter()
        .map(|jwk| {
            let kid = jwk.common.key_id.clone();
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("key {}: {e}", kid.as_deref().unwrap_or("without kid")))?;
            let family = family_of(&jwk.algorithm);
            let algorithms = match jwk.common.key_algorithm.and_then(algorithm_of) {
                Some(alg) if family.contains(&alg) => vec![alg],
                Some(alg) => {
                    return Err(format!(
                        "key {}: alg {alg:?} does not fit its key type",
                        kid.as_deref().unwrap_or("without kid")
                    ))
                }
                None => family,
            };
            if algorithms.is_empty() {
                return Err(format!(
                    "key {}: unsupported key type or curve",
                    kid.as_deref().unwrap_or("without kid")
                ));
            }
            Ok(VerificationKey {
                kid,
                key,
                algorithms,
            })
        })
        .collect()
}

fn family_of(params: &AlgorithmParameters) -> Vec<Algorithm> {
    match params {
        AlgorithmParameters::RSA(_) => RSA.to_vec(),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => vec![],
        },
        AlgorithmParameters::OctetKey(_) => HMAC.to_vec(),
    }
}

fn algorithm_of(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Public keys of every PEM block in `text`.
fn pem_keys(text: &str) -> Result<Vec<VerificationKey>, String> {
    let blocks = pem_blocks(text);
    if blocks.is_empty() {
        return Err("no PEM block and not a JWKS document".into());
    }
    blocks
        .iter()
        .enumerate()
        .map(|(i, block)| {
            if block.contains("PRIVATE KEY") {
                return Err(format!(
                    "block {}: a private key; give the server public keys only",
                    i + 1
                ));
            }
            let pem = block.as_bytes();
            let (key, algorithms) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (k, RSA.to_vec())
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                (k, vec![Algorithm::ES256, Algorithm::ES384])
            } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                (k, vec![Algorithm::EdDSA])
            } else {
                return Err(format!(
                    "block {}: not an RSA, EC (P-256/P-384) or Ed25519 public key",
                    i + 1
                ));
            };
            Ok(VerificationKey {
                kid: None,
                key,
                algorithms,
            })
        })
        .collect()
}

/// The `-----BEGIN …-----` … `-----END …-----` blocks of a text, each with its armour.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN ") {
            current = Some(String::new());
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
        if line.starts_with("-----END ") {
            if let Some(block) = current.take() {
                blocks.push(block);
            }
        }
    }
    blocks
}

/// Where the keys come from, for the log (never the secret itself).
pub fn describe(sources: &KeySources) -> String {
    let mut parts = Vec::new();
    if sources.secret.is_some() {
        parts.push("a shared secret".to_string());
    }
    parts.extend(sources.files.iter().map(|p| p.display().to_string()));
    parts.join(", ")
}
