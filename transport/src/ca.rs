//! The deployment CA: it issues one certificate per hub, and that certificate is the hub's
//! identity in the court tree. Besides its DNS names and addresses it carries two URIs,
//! `urn:tianwang:court:<code>` and `urn:tianwang:parent:<code>` (percent-encoded: court
//! codes are Chinese), so a parent learns from the CA, not from the child's word, which
//! court a child hub serves and under which court the CA placed it.

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

use crate::tls::{SelfSigned, TlsError};

const COURT_URN: &str = "urn:tianwang:court:";
const PARENT_URN: &str = "urn:tianwang:parent:";
/// Everything but unreserved URI characters is escaped.
const ESCAPE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b':')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b']')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// A new deployment CA (self-signed, Ed25519).
pub fn init(name: &str) -> Result<SelfSigned, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Tianwang deployment");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let cert = params.self_signed(&key)?;
    Ok(SelfSigned {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// What a hub certificate says about its hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubIdentity {
    pub court: String,
    /// Empty for the root court.
    pub parent: String,
}

/// Issues a hub certificate (server and client use) for `identity`, valid for `names`
/// (DNS names or IP addresses). The PEM chain returned is the hub's certificate then the CA's.
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    identity: &HubIdentity,
    names: &[String],
) -> Result<SelfSigned, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("hub {}", identity.court));
    params.distinguished_name = dn;
    let uri = |prefix: &str, code: &str| -> Result<SanType, TlsError> {
        let s = format!("{prefix}{}", utf8_percent_encode(code, ESCAPE));
        Ok(SanType::URI(s.try_into()?))
    };
    params
        .subject_alt_names
        .push(uri(COURT_URN, &identity.court)?);
    if !identity.parent.is_empty() {
        params
            .subject_alt_names
            .push(uri(PARENT_URN, &identity.parent)?);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(SelfSigned {
        cert_pem: format!("{}{}", cert.pem(), ca_cert_pem),
        key_pem: key.serialize_pem(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("the peer's certificate names no court (not issued by `hub ca issue`)")]
    NoCourt,
}

/// Reads the court and parent URIs of a (verified) hub certificate.
pub fn identity(cert: &CertificateDer<'_>) -> Result<HubIdentity, IdentityError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let mut court = None;
    let mut parent = String::new();
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            let decode = |rest: &str| percent_decode_str(rest).decode_utf8_lossy().into_owned();
            if let Some(rest) = uri.strip_prefix(COURT_URN) {
                court = Some(decode(rest));
            } else if let Some(rest) = uri.strip_prefix(PARENT_URN) {
                parent = decode(rest);
            }
        }
    }
    let court = court
        .filter(|c| !c.is_empty())
        .ok_or(IdentityError::NoCourt)?;
    Ok(HubIdentity { court, parent })
}

/// The identity of a QUIC peer that presented a client certificate (already verified
/// against the CA by the TLS handshake).
pub fn peer_identity(conn: &quinn::Connection) -> Result<HubIdentity, IdentityError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(IdentityError::NoCertificate)?;
    let leaf = certs.first().ok_or(IdentityError::NoCertificate)?;
    identity(leaf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_court_and_parent() {
        let ca = init("test CA").unwrap();
        let id = HubIdentity {
            court: "京01".into(),
            parent: "京".into(),
        };
        let hub = issue(&ca.cert_pem, &ca.key_pem, &id, &["localhost".into()]).unwrap();
        let chain: Vec<CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(hub.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(chain.len(), 2, "leaf then CA");
        assert_eq!(identity(&chain[0]).unwrap(), id);
        assert!(matches!(identity(&chain[1]), Err(IdentityError::NoCourt)));
    }
}
