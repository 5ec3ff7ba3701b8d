//! `hub export --case NUMBER --out DIR`: everything a case holds, for a court on another
//! machine. One MP4 per unit, operation and recording: its init segment followed by its
//! media segments, byte for byte as recorded and signed (a fragmented MP4 that players and
//! ffmpeg read as one file; nothing is re-encoded). `manifest.json` lists each file's
//! segments with their offsets and signed index rows, the gap records and the case's audit
//! excerpt; `manifest.sig` is the hub's signature over it. `hub verify --export DIR --key
//! PUBKEY` checks all of it with the public key alone.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::Evidence;
use super::audit::unix_us;
use super::cases::CaseError;
use super::index::SegmentRow;
use super::keys::sha256_hex;
use super::verify::{EXPORT_FORMAT, ExportFile, ExportPart, Manifest};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Case(#[from] CaseError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    pub files: Vec<PathBuf>,
    pub segments: usize,
    pub bytes: u64,
}

/// A file name safe on every file system, from unit, operation and recording ids.
fn file_name(unit: &str, operation: Option<&str>, recording: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!(
        "{}_{}_{}.mp4",
        clean(unit),
        clean(operation.unwrap_or("no-operation")),
        clean(recording)
    )
}

impl Evidence {
    pub async fn export_case(
        &self,
        actor: &str,
        number: &str,
        out: &Path,
    ) -> Result<Exported, ExportError> {
        let case = self.get_case(number).await?;
        if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
            return Err(ExportError::Refused(format!(
                "{} is not empty: export into a new directory",
                out.display()
            )));
        }
        std::fs::create_dir_all(out).map_err(io(out))?;
        let rows = self
            .index
            .segments_of_case(number)
            .await
            .map_err(CaseError::from)?;
        // (unit, operation, recording) → media rows in chain order.
        let mut groups: BTreeMap<(String, Option<String>, String), Vec<SegmentRow>> =
            BTreeMap::new();
        let mut gaps = Vec::new();
        for row in rows {
            match row.kind.as_str() {
                "media" if row.deleted_us.is_none() => groups
                    .entry((
                        row.unit.clone(),
                        row.operation_id.clone(),
                        row.recording.clone(),
                    ))
                    .or_default()
                    .push(row),
                "gap" => gaps.push(row),
                _ => {}
            }
        }
        let mut files = Vec::new();
        let mut written = Vec::new();
        let (mut segments, mut bytes) = (0usize, 0u64);
        for ((unit, operation, recording), media) in groups {
            let Some(init) = self
                .index
                .init_of(&unit, &recording)
                .await
                .map_err(CaseError::from)?
            else {
                return Err(ExportError::Refused(format!(
                    "recording {recording} of {unit} has no init segment in the index"
                )));
            };
            let name = file_name(&unit, operation.as_deref(), &recording);
            let path = out.join(&name);
            let mut file = std::fs::File::create(&path).map_err(io(&path))?;
            let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
            let mut parts = Vec::new();
            let mut offset = 0u64;
            for row in std::iter::once(&init).chain(media.iter()) {
                let src = self.dir.join(&row.path);
                let data = std::fs::read(&src).map_err(io(&src))?;
                // Never export what does not match its signed record.
                if sha256_hex(&data) != row.sha256 {
                    return Err(ExportError::Refused(format!(
                        "{} differs from its signed hash: run `hub verify`",
                        row.path
                    )));
                }
                file.write_all(&data).map_err(io(&path))?;
                whole.update(&data);
                parts.push(ExportPart {
                    offset,
                    length: data.len() as u64,
                    row: row.clone(),
                });
                offset += data.len() as u64;
            }
            file.sync_all().map_err(io(&path))?;
            segments += media.len();
            bytes += offset;
            written.push(path);
            files.push(ExportFile {
                name,
                unit,
                operation,
                recording,
                sha256: hex::encode(whole.finish().as_ref()),
                parts,
            });
        }
        self.audit.record(
            actor,
            "export",
            number,
            serde_json::json!({ "case": number, "files": files.len(), "segments": segments }),
        );
        self.audit.flush().await;
        let audit = self
            .index
            .audit_of_case(number)
            .await
            .map_err(CaseError::from)?;
        let manifest = Manifest {
            format: EXPORT_FORMAT.into(),
            case: serde_json::to_value(&case).unwrap_or_default(),
            hub_public_key: self.signer.public_hex(),
            created_us: unix_us(),
            files,
            gaps,
            audit,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| ExportError::Refused(format!("encoding the manifest: {e}")))?;
        let manifest_path = out.join("manifest.json");
        std::fs::write(&manifest_path, &json).map_err(io(&manifest_path))?;
        let sig_path = out.join("manifest.sig");
        std::fs::write(&sig_path, self.signer.sign_hex(&json) + "\n").map_err(io(&sig_path))?;
        let key_path = out.join("hub-public-key.txt");
        std::fs::write(&key_path, self.signer.public_hex() + "\n").map_err(io(&key_path))?;
        Ok(Exported {
            files: written,
            segments,
            bytes,
        })
    }
}
