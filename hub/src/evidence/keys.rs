//! The hub's Ed25519 key signs evidence (segment records, exports) as it signs tokens. Its
//! public half, as hex, is what another machine needs to verify an export.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the signing key is not a PKCS#8 PEM: {0}")]
    Pem(String),
    #[error("the signing key is not an Ed25519 key: {0}")]
    Key(String),
    #[error("a public key is 64 hex digits (32 bytes); got {0:?}")]
    PublicKey(String),
}

pub struct Signer {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public", &self.public_hex())
            .finish()
    }
}

impl Signer {
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| KeyError::Pem(e.to_string()))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map_err(|e| KeyError::Key(e.to_string()))?;
        Ok(Self { pair })
    }

    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.pair.sign(message).as_ref())
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    pub fn verifier(&self) -> Verifier {
        Verifier {
            public: self.pair.public_key().as_ref().to_vec(),
        }
    }
}

/// Checks signatures with a public key only.
#[derive(Clone, Debug)]
pub struct Verifier {
    public: Vec<u8>,
}

impl Verifier {
    pub fn from_hex(hex_key: &str) -> Result<Self, KeyError> {
        let public = hex::decode(hex_key.trim())
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| KeyError::PublicKey(hex_key.trim().chars().take(80).collect()))?;
        Ok(Self { public })
    }

    pub fn verify_hex(&self, message: &[u8], signature_hex: &str) -> bool {
        let Ok(signature) = hex::decode(signature_hex) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, &self.public)
            .verify(message, &signature)
            .is_ok()
    }

    pub fn public_hex(&self) -> String {
        hex::encode(&self.public)
    }
}

/// SHA-256 as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// SHA-256 over pieces, as lowercase hex.
pub fn sha256_hex_of<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in pieces {
        ctx.update(p);
    }
    hex::encode(ctx.finish().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_with_the_public_key_only() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let signer = Signer::from_pem(&kp.serialize_pem()).unwrap();
        let sig = signer.sign_hex(b"segment 1");
        let v = Verifier::from_hex(&signer.public_hex()).unwrap();
        assert!(v.verify_hex(b"segment 1", &sig));
        assert!(!v.verify_hex(b"segment 2", &sig));
        assert!(!v.verify_hex(b"segment 1", "00"));
        assert!(Verifier::from_hex("abc").is_err());
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_hex_of([&b"a"[..], &b"bc"[..]]), sha256_hex(b"abc"));
    }
}
