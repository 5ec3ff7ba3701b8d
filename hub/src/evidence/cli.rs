//! The evidence commands of the `hub` binary: `hub case …` (a gRPC client of a running
//! hub), and `hub verify`, `hub export`, `hub key`, which work on a data directory.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tianwang_proto::v1::evidence_client::EvidenceClient;
use tianwang_proto::v1::{
    Case, CloseCaseRequest, CloseOperationRequest, CreateCaseRequest, CreateOperationRequest,
    GetCaseRequest, ListCasesRequest, Operation,
};
use tonic::Request;

use super::index::Index;
use super::keys::{Signer, Verifier};
use super::verify::{Report, verify_data, verify_export};
use super::{Evidence, audit::unix_us};
use crate::config::Config;

/// What `hub case` asks of a hub.
pub enum CaseCommand {
    Create {
        number: String,
        court: Option<String>,
        parties: Vec<String>,
    },
    List,
    Show {
        number: String,
    },
    Close {
        number: String,
    },
    Operation(CreateOperationRequest),
    CloseOperation {
        id: String,
    },
}

fn authorized<T>(message: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("the token is not a valid header value")?,
    );
    Ok(req)
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

/// Runs one `hub case` command against the hub at `url` (its HTTP address).
pub async fn case(url: &str, token: &str, command: CaseCommand) -> anyhow::Result<String> {
    let mut client = EvidenceClient::connect(url.to_string())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let out = match command {
        CaseCommand::Create {
            number,
            court,
            parties,
        } => {
            let req = CreateCaseRequest {
                number,
                court: court.unwrap_or_default(),
                parties,
            };
            let c = client
                .create_case(authorized(req, token)?)
                .await
                .map_err(status)?;
            show_case(c.get_ref())
        }
        CaseCommand::List => {
            let list = client
                .list_cases(authorized(ListCasesRequest {}, token)?)
                .await
                .map_err(status)?;
            list.get_ref()
                .cases
                .iter()
                .map(|c| {
                    format!(
                        "{}\t{}\t{}\t{} operation(s)\n",
                        c.number,
                        c.court,
                        c.state,
                        c.operations.len()
                    )
                })
                .collect()
        }
        CaseCommand::Show { number } => {
            let c = client
                .get_case(authorized(GetCaseRequest { number }, token)?)
                .await
                .map_err(status)?;
            show_case(c.get_ref())
        }
        CaseCommand::Close { number } => {
            let c = client
                .close_case(authorized(CloseCaseRequest { number }, token)?)
                .await
                .map_err(status)?;
            show_case(c.get_ref())
        }
        CaseCommand::Operation(req) => {
            let op = client
                .create_operation(authorized(req, token)?)
                .await
                .map_err(status)?;
            show_operation(op.get_ref())
        }
        CaseCommand::CloseOperation { id } => {
            let op = client
                .close_operation(authorized(CloseOperationRequest { id }, token)?)
                .await
                .map_err(status)?;
            show_operation(op.get_ref())
        }
    };
    Ok(out)
}

fn time(us: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(us);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn show_case(c: &Case) -> String {
    let mut s = format!(
        "case {} ({}), court {}, parties: {}\n",
        c.number,
        c.state,
        c.court,
        c.parties.join(", ")
    );
    for op in &c.operations {
        s.push_str("  ");
        s.push_str(&show_operation(op));
    }
    s
}

fn show_operation(op: &Operation) -> String {
    format!(
        "operation {} ({}) {:?}: {} .. {}, units {}, at {:.5},{:.5} r {} m\n",
        op.id,
        op.state,
        op.name,
        time(op.starts_us),
        time(op.ends_us),
        op.units.join(","),
        op.latitude,
        op.longitude,
        op.radius_m
    )
}

/// Opens a data directory's evidence with the hub's key, for the offline commands. Its
/// audit entries join the same chain the hub writes.
async fn open(config: &Config) -> anyhow::Result<Evidence> {
    let signer = Arc::new(crate::server::load_signer(config)?);
    let dir = config.recordings_dir();
    Evidence::open(&config.index_url(), &dir, signer)
        .await
        .with_context(|| format!("opening the index of {}", config.data_dir.display()))
}

pub fn public_key(config: &Config) -> anyhow::Result<String> {
    Ok(crate::server::load_signer(config)?.public_hex())
}

fn verifier_for(config: &Config, key: Option<&str>) -> anyhow::Result<Verifier> {
    match key {
        Some(k) => Ok(Verifier::from_hex(&read_key(k)?)?),
        None => {
            let path = config.signing_key_path();
            let pem = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the hub's key {}", path.display()))?;
            Ok(Signer::from_pem(&pem)?.verifier())
        }
    }
}

/// A key given as hex, or as a file holding it.
fn read_key(k: &str) -> anyhow::Result<String> {
    let p = Path::new(k);
    if k.len() != 64 && p.exists() {
        return std::fs::read_to_string(p).with_context(|| format!("reading {k}"));
    }
    Ok(k.to_string())
}

/// `hub verify --data`: the recordings and audit log of a data directory.
pub async fn verify_dir(
    config: &Config,
    key: Option<&str>,
    unit: Option<&str>,
    case: Option<&str>,
) -> anyhow::Result<Report> {
    let verifier = verifier_for(config, key)?;
    let index = Index::open(&config.index_url())
        .await
        .with_context(|| format!("opening the index of {}", config.data_dir.display()))?;
    let report = verify_data(&index, &config.recordings_dir(), &verifier, unit, case).await;
    index.close().await;
    Ok(report?)
}

/// `hub verify --export`: an export directory, with the public key only.
pub fn verify_bundle(dir: &Path, key: &str) -> anyhow::Result<Report> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let verifier = Verifier::from_hex(&read_key(key)?)?;
    Ok(verify_export(dir, &verifier))
}

pub fn print_report(report: &Report, what: &str) -> bool {
    for p in &report.problems {
        println!("FAIL {p}");
    }
    let summary = format!(
        "{what}: {} unit(s), {} segment(s), {} byte(s), {} gap record(s), {} audit entr{}",
        report.units,
        report.segments,
        report.bytes,
        report.gaps,
        report.audit_rows,
        if report.audit_rows == 1 { "y" } else { "ies" }
    );
    if report.ok() {
        println!("OK {summary}");
    } else {
        println!("{} problem(s); {summary}", report.problems.len());
    }
    report.ok()
}

/// `hub token revoke`: stored in the index (a running hub reads it within a second) and
/// audited in the same chain.
pub async fn revoke(
    config: &Config,
    kind: &str,
    value: &str,
    reason: &str,
) -> anyhow::Result<String> {
    let evidence = open(config).await?;
    let actor = format!("cli:{}", whoami());
    let row = super::index::RevocationRow {
        kind: kind.to_string(),
        value: value.to_string(),
        at_us: unix_us(),
        actor: actor.clone(),
        reason: reason.to_string(),
    };
    let stored = evidence.index.revoke(&row).await;
    if stored.is_ok() {
        evidence.audit.record(
            &actor,
            "token.revoke",
            value,
            serde_json::json!({ "kind": kind, "reason": reason }),
        );
    }
    evidence.audit.flush().await;
    evidence.index.close().await;
    stored.context("storing the revocation")?;
    Ok(format!("revoked {kind} {value}\n"))
}

/// `hub export`.
pub async fn export(config: &Config, case: &str, out: &Path) -> anyhow::Result<String> {
    let evidence = open(config).await?;
    let actor = format!("cli:{}", whoami());
    let result = evidence.export_case(&actor, case, out).await;
    evidence.audit.flush().await;
    evidence.index.close().await;
    let exported = result?;
    Ok(format!(
        "exported case {case}: {} file(s), {} segment(s), {} bytes into {} (at {})\n\
         verify with: hub verify --export {} --key {}\n",
        exported.files.len(),
        exported.segments,
        exported.bytes,
        out.display(),
        time(unix_us().max(0) as u64),
        out.display(),
        evidence.signer.public_hex()
    ))
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "unknown".into())
}
