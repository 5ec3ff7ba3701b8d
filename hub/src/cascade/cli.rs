//! `hub ca init` and `hub ca issue`: the deployment CA and its hub certificates.

use std::path::Path;

use anyhow::{Context, bail};
use tianwang_transport::ca::{self, HubIdentity};

use crate::files::{write_private, write_public};

/// Makes a new CA in `dir` (ca.crt, ca.key); refuses to overwrite one.
pub fn init(dir: &Path, name: &str) -> anyhow::Result<()> {
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if cert.exists() || key.exists() {
        bail!(
            "{} already holds a CA; remove it first to make a new one",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let made = ca::init(name)?;
    write_private(&key, made.key_pem.as_bytes())
        .with_context(|| format!("writing {}", key.display()))?;
    write_public(&cert, made.cert_pem.as_bytes())
        .with_context(|| format!("writing {}", cert.display()))?;
    Ok(())
}

/// Issues a hub certificate into `out` (hub.crt with the CA after it, hub.key).
pub fn issue(
    ca_dir: &Path,
    court: &str,
    parent: &str,
    names: &[String],
    out: &Path,
) -> anyhow::Result<()> {
    if court.trim().is_empty() {
        bail!("--court is empty");
    }
    if names.is_empty() {
        bail!("give the names the hub is reached by (--name, e.g. localhost or an address)");
    }
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let ca_cert = read(&ca_dir.join("ca.crt"))?;
    let ca_key = read(&ca_dir.join("ca.key"))?;
    let identity = HubIdentity {
        court: court.to_string(),
        parent: parent.to_string(),
    };
    let made = ca::issue(&ca_cert, &ca_key, &identity, names)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (cert, key) = (out.join("hub.crt"), out.join("hub.key"));
    write_private(&key, made.key_pem.as_bytes())
        .with_context(|| format!("writing {}", key.display()))?;
    write_public(&cert, made.cert_pem.as_bytes())
        .with_context(|| format!("writing {}", cert.display()))?;
    Ok(())
}
