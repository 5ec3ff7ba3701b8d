//! The console API from another language: a Python gRPC client, its code generated from
//! proto/ at test time (grpcio-tools), lists units, finds the service by reflection and
//! opens a session.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tianwang_tests::*;

/// A virtualenv with grpcio in the build's target dir, made once per build.
fn python() -> anyhow::Result<PathBuf> {
    let target = bin("hub").parent().unwrap().parent().unwrap().to_path_buf();
    let venv = target.join("grpc-venv");
    let py = venv.join("bin").join("python");
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("grpc")
        .join("requirements.txt");
    let stamp = venv.join("installed.txt");
    let wanted = std::fs::read_to_string(&requirements)?;
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?;
        anyhow::ensure!(
            made.success(),
            "python3 -m venv failed (install python3-venv)"
        );
        let installed = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements)
            .status()?;
        anyhow::ensure!(installed.success(), "pip install of grpcio failed");
        std::fs::write(&stamp, wanted)?;
    }
    Ok(py)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpc_client_lists_units_and_opens_a_session() -> anyhow::Result<()> {
    let py = python()?;
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), None).await?;
    let tokens = hub.fleet("sim-", 2);
    let _sim = Simulator::start(&hub, 2, &tokens, &[])?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(30), |v| {
        v == 2.0
    })
    .await?;
    let token = hub.token("commander", "py-console");
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("grpc")
        .join("console_client.py");
    let out = tokio::process::Command::new(&py)
        .arg(&script)
        .arg(hub.http.to_string())
        .arg(&token)
        .arg("sim-2")
        .output()
        .await?;
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let services: Vec<&str> = report["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(services.contains(&"tianwang.v1.Console"), "{report}");
    assert!(services.contains(&"tianwang.v1.Evidence"), "{report}");
    assert_eq!(
        report["unauthenticated_list"], "UNAUTHENTICATED",
        "{report}"
    );
    let units = report["units"].as_array().unwrap();
    assert_eq!(units.len(), 2, "{report}");
    assert_eq!(units[0]["unit"], "sim-1");
    assert_eq!(units[0]["online"], true);
    assert_eq!(units[0]["tracks"], serde_json::json!(["video", "audio"]));
    assert_eq!(report["user"], "py-console");
    assert_eq!(report["role"], "commander");
    assert_eq!(report["pong"], 7);
    assert_eq!(report["offer_is_sdp"], true);
    assert_eq!(report["offer_has_h264"], true);
    assert_eq!(report["offer_revision"], 1);
    let evidence = &report["evidence"];
    assert!(evidence["segments"].as_u64() >= Some(1), "{report}");
    assert!(
        evidence["codecs"].as_str().unwrap_or("").contains("avc1"),
        "{report}"
    );
    assert_eq!(evidence["init_ok"], true, "{report}");
    assert_eq!(evidence["segment_ok"], true, "{report}");
    assert_eq!(evidence["outside"], "NOT_FOUND", "{report}");
    Ok(())
}
