//! Writing files so that a crash leaves either the old content or the new, never half.

use std::io::Write;
use std::path::Path;

/// Writes `data` to `path` through a synced temporary file renamed into place; with
/// `private`, readable by the owner only (keys).
fn write_atomic(path: &Path, data: &[u8], private: bool) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // tempfile creates with mode 0600; public files are widened before the rename.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    #[cfg(unix)]
    if !private {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic(path, data, true)
}

pub fn write_public(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic(path, data, false)
}
