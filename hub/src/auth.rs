//! Tokens: JWTs signed by the hub's Ed25519 key, with a role, a subject (the unit for a
//! device, the user for a console), an audience and an expiry. Only EdDSA is accepted, so
//! `alg=none` and algorithm confusion fail before any claim is read.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const AUDIENCE: &str = "tianwang";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A field unit: publishes its own broadcast only.
    Device,
    /// Watches live.
    Viewer,
    /// Watches and directs.
    Commander,
    /// Watches, talks and directs.
    Official,
    /// Recordings and audit only.
    Auditor,
}

impl Role {
    pub fn can_watch_live(self) -> bool {
        matches!(self, Role::Viewer | Role::Commander | Role::Official)
    }

    /// Talks to officers (push-to-talk, remote video link).
    pub fn can_talk(self) -> bool {
        matches!(self, Role::Official)
    }

    /// Issues directives to units.
    pub fn can_direct(self) -> bool {
        matches!(self, Role::Commander | Role::Official)
    }

    /// Opens and closes cases and operations.
    pub fn can_manage_cases(self) -> bool {
        matches!(self, Role::Commander | Role::Official)
    }

    /// Lists, plays back and exports recordings.
    pub fn can_see_recordings(self) -> bool {
        matches!(self, Role::Commander | Role::Official | Role::Auditor)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub court: Option<String>,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token rejected: {0}")]
    Rejected(String),
    #[error("signing key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("token lifetime {asked:?} exceeds the allowed {max:?}")]
    TtlTooLong { asked: Duration, max: Duration },
    #[error("issuing a token: {0}")]
    Issue(jsonwebtoken::errors::Error),
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        // Short, stable reasons: they go back to the peer and into the logs.
        let reason = match e.kind() {
            K::ExpiredSignature => "expired",
            K::ImmatureSignature => "not yet valid",
            K::InvalidSignature => "bad signature",
            K::InvalidAlgorithm | K::InvalidAlgorithmName => "algorithm not allowed",
            K::InvalidAudience => "wrong audience",
            K::InvalidIssuer => "wrong issuer",
            K::MissingRequiredClaim(_) => "missing claim",
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed",
            _ => "invalid",
        };
        AuthError::Rejected(reason.to_string())
    }
}

/// Revoked tokens (the index's `revocations`, held in memory for every token check): one
/// token by its id, or every token of a subject issued up to the moment of revocation, so a
/// lost device is cut off and a replacement token issued afterwards works.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub jtis: HashSet<String>,
    /// Subject → revoked at (Unix seconds): tokens with `iat` up to then are refused.
    pub subjects: HashMap<String, u64>,
}

impl Revoked {
    pub fn covers(&self, claims: &Claims) -> bool {
        self.covers_parts(&claims.sub, &claims.jti, claims.iat)
    }

    /// The same for a session that kept only its token's subject, id and issue time.
    pub fn covers_parts(&self, sub: &str, jti: &str, iat: u64) -> bool {
        self.jtis.contains(jti) || self.subjects.get(sub).is_some_and(|at| iat <= *at)
    }
}

/// Issues and checks this hub's tokens.
pub struct Authority {
    issuer: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    public_pem: String,
    /// A watch, so live sessions can learn that their token was revoked.
    revoked: tokio::sync::watch::Sender<Arc<Revoked>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Authority {
    /// Loads the signing key at `path`, creating one (mode 0600) if there is none.
    pub fn load_or_create(path: &Path, issuer: &str, leeway: Duration) -> Result<Self, AuthError> {
        let key_err = |reason: String| AuthError::Key {
            path: path.display().to_string(),
            reason,
        };
        // The private key as a secret: never printable, wiped once the keys are made.
        let pem = secrecy::SecretString::from(match std::fs::read_to_string(path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
                    .map_err(|e| key_err(e.to_string()))?;
                let pem = kp.serialize_pem();
                crate::files::write_private(path, pem.as_bytes())
                    .map_err(|e| key_err(e.to_string()))?;
                tracing::info!(path = %path.display(), "created a token signing key");
                pem
            }
            Err(e) => return Err(key_err(e.to_string())),
        });
        Self::from_pem(secrecy::ExposeSecret::expose_secret(&pem), issuer, leeway)
            .map_err(|e| key_err(e.to_string()))
    }

    pub fn from_pem(pem: &str, issuer: &str, leeway: Duration) -> Result<Self, AuthError> {
        let kp = rcgen::KeyPair::from_pem(pem).map_err(|e| AuthError::Key {
            path: "<pem>".into(),
            reason: e.to_string(),
        })?;
        if !kp.is_compatible(&rcgen::PKCS_ED25519) {
            return Err(AuthError::Key {
                path: "<pem>".into(),
                reason: "not an Ed25519 key".into(),
            });
        }
        let public_pem = kp.public_key_pem();
        let encoding = EncodingKey::from_ed_pem(pem.as_bytes()).map_err(AuthError::Issue)?;
        let decoding = DecodingKey::from_ed_pem(public_pem.as_bytes()).map_err(AuthError::Issue)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = leeway.as_secs();
        Ok(Self {
            issuer: issuer.to_string(),
            encoding,
            decoding,
            validation,
            public_pem,
            revoked: tokio::sync::watch::Sender::new(Arc::default()),
        })
    }

    /// Replaces the revocation list (only when it changed, so watchers wake for news only).
    pub fn set_revoked(&self, revoked: Revoked) {
        self.revoked.send_if_modified(|current| {
            if **current == revoked {
                return false;
            }
            *current = Arc::new(revoked);
            true
        });
    }

    /// The revocation list, as it changes.
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<Arc<Revoked>> {
        self.revoked.subscribe()
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    pub fn issue(
        &self,
        role: Role,
        subject: &str,
        court: Option<&str>,
        ttl: Duration,
    ) -> Result<String, AuthError> {
        let now = unix_now();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_string(),
            aud: AUDIENCE.to_string(),
            role,
            court: court.map(str::to_string),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl.as_secs()),
            jti: format!("{:016x}", rand::random::<u64>()),
        };
        self.sign(&claims)
    }

    /// Signs claims as they are (tests use it for tokens `issue` would not make).
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.encoding)
            .map_err(AuthError::Issue)
    }

    /// Checks signature, algorithm, audience, times and revocation; returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Rejected("no token".into()));
        }
        if token.len() > 8192 {
            return Err(AuthError::Rejected("malformed".into()));
        }
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?.claims;
        if self.revoked.borrow().covers(&claims) {
            return Err(AuthError::Rejected("revoked".into()));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// URL-safe base64 without padding, to forge test tokens.
    fn encode_url(data: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    }

    fn authority() -> Authority {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        Authority::from_pem(&kp.serialize_pem(), "test-hub", Duration::from_secs(0)).unwrap()
    }

    #[test]
    fn issued_tokens_verify_with_their_claims() {
        let a = authority();
        let t = a
            .issue(
                Role::Device,
                "bwc-001",
                Some("0113"),
                Duration::from_secs(60),
            )
            .unwrap();
        let c = a.verify(&t).unwrap();
        assert_eq!(
            (c.role, c.sub.as_str(), c.court.as_deref()),
            (Role::Device, "bwc-001", Some("0113"))
        );
        assert_eq!(c.iss, "test-hub");
    }

    #[test]
    fn another_hubs_key_expired_and_unsigned_tokens_are_rejected() {
        let a = authority();
        let b = authority();
        let t = b
            .issue(Role::Viewer, "x", None, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            a.verify(&t).unwrap_err().to_string(),
            "token rejected: bad signature"
        );

        let good = a
            .issue(Role::Viewer, "x", None, Duration::from_secs(60))
            .unwrap();
        let mut claims = a.verify(&good).unwrap();
        claims.exp = unix_now() - 10;
        let expired = a.sign(&claims).unwrap();
        assert_eq!(
            a.verify(&expired).unwrap_err().to_string(),
            "token rejected: expired"
        );
        claims.exp = unix_now() + 600;
        claims.nbf = unix_now() + 300;
        let early = a.sign(&claims).unwrap();
        assert_eq!(
            a.verify(&early).unwrap_err().to_string(),
            "token rejected: not yet valid"
        );
        claims.nbf = unix_now();
        claims.aud = "someone-else".into();
        let wrong_aud = a.sign(&claims).unwrap();
        assert_eq!(
            a.verify(&wrong_aud).unwrap_err().to_string(),
            "token rejected: wrong audience"
        );

        let header = encode_url(br#"{"alg":"none","typ":"JWT"}"#);
        let now = unix_now();
        let body = encode_url(
            format!(r#"{{"iss":"test-hub","sub":"x","aud":"tianwang","role":"viewer","iat":{now},"nbf":{now},"exp":{},"jti":"1"}}"#, now + 60)
                .as_bytes(),
        );
        let none = format!("{header}.{body}.");
        assert!(a.verify(&none).is_err());
        assert!(a.verify("").is_err());
        assert!(a.verify("garbage").is_err());
    }

    #[test]
    fn revoked_tokens_are_refused_and_later_ones_of_the_subject_are_not() {
        let a = authority();
        let t = a
            .issue(Role::Device, "bwc-7", None, Duration::from_secs(60))
            .unwrap();
        let mut claims = a.verify(&t).unwrap();
        let mut revoked = Revoked::default();
        revoked.jtis.insert(claims.jti.clone());
        a.set_revoked(revoked);
        assert_eq!(
            a.verify(&t).unwrap_err().to_string(),
            "token rejected: revoked"
        );
        let mut revoked = Revoked::default();
        revoked.subjects.insert("bwc-7".into(), claims.iat);
        a.set_revoked(revoked);
        assert!(a.verify(&t).is_err());
        // A replacement issued after the revocation works.
        claims.iat += 1;
        claims.jti = "replacement".into();
        assert!(a.verify(&a.sign(&claims).unwrap()).is_ok());
    }
}
