//! Evidence end to end: a real agent recorded by a real hub, files checked by ffprobe, the
//! chain checked by `hub verify`; a hub killed mid-recording; tampering of every kind; cases
//! and operations with their errors; export verified elsewhere with the public key only;
//! retention; a full disk; the same index on PostgreSQL.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use tianwang_tests::*;

const CASE: &str = "(2026)京0113执1234号";

fn hub_cmd(args: &[&str]) -> Output {
    Command::new(bin("hub")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `hub verify --data DIR/data [extra]`: (passed, output).
fn verify_data(hub: &Hub, extra: &[&str]) -> (bool, String) {
    let data = hub.dir.join("data");
    let mut args = vec!["verify", "--data", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = hub_cmd(&args);
    (o.status.success(), text(&o))
}

/// A protobuf-JSON 64-bit field (a string), absent when zero.
fn u(v: &Value, key: &str) -> i64 {
    match v.get(key) {
        Some(Value::String(s)) => s.parse().unwrap(),
        Some(Value::Number(n)) => n.as_i64().unwrap(),
        _ => 0,
    }
}

async fn get(hub: &Hub, token: Option<&str>, path: &str) -> (u16, Vec<u8>) {
    let mut req = reqwest::Client::new().get(format!("http://{}{path}", hub.http));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap().to_vec())
}

async fn recordings(hub: &Hub, token: &str, query: &str) -> Value {
    let (status, body) = get(hub, Some(token), &format!("/api/recordings?{query}")).await;
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert_eq!(status, 200, "{v}");
    v
}

fn segments(list: &Value) -> Vec<Value> {
    list["recordings"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["segments"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn media_seconds(list: &Value) -> f64 {
    segments(list)
        .iter()
        .map(|s| u(s, "mediaDuration") as f64 / 90_000.0)
        .sum()
}

/// Polls the recordings listing until `done` holds (bounded).
async fn wait_recorded(
    hub: &Hub,
    token: &str,
    query: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let list = recordings(hub, token, query).await;
        if done(&list) {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not recorded in time: {list}\n{}",
            hub.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// ffprobe on a file: (ok, duration in seconds, stderr).
fn ffprobe(path: &Path) -> (bool, f64, String) {
    let o = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .unwrap();
    let duration = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    (o.status.success() && err.trim().is_empty(), duration, err)
}

fn units_online_is(v: f64) -> impl Fn(f64) -> bool {
    move |x| x == v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_records_30_seconds_of_contiguous_segments_that_ffprobe_accepts()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), None).await?;
    let judge = hub.token("auditor", "judge-1");
    let device = hub.token("device", "bwc-1");
    let agent = Agent::start(
        &hub.quic.to_string(),
        &hub.ca(),
        "bwc-1",
        &device,
        tmp.path(),
        &[],
    )?;
    wait_recorded(&hub, &judge, "unit=bwc-1", Duration::from_secs(90), |l| {
        media_seconds(l) >= 30.0
    })
    .await;
    // The unit goes offline: the recorder closes the segment under way.
    drop(agent);
    hub.wait_metric(
        "tianwang_recordings_active",
        Duration::from_secs(20),
        units_online_is(0.0),
    )
    .await?;
    let list = recordings(&hub, &judge, "unit=bwc-1").await;
    let recs = list["recordings"].as_array().unwrap();
    assert!(list["gaps"].as_array().is_none_or(|g| g.is_empty()));
    // One recording of the whole time. What the agent captured before its link was up, or
    // a group the live path skipped on a loaded machine, comes again from its spool as
    // backfill: such recordings are a group or two.
    let len = |r: &serde_json::Value| r["segments"].as_array().map_or(0, |s| s.len());
    let rec = recs.iter().max_by_key(|r| len(r)).expect("a recording");
    for other in recs.iter().filter(|r| r["recording"] != rec["recording"]) {
        assert!(len(other) <= 2, "more than one long recording: {list}");
    }
    assert!(rec["codecs"].as_str().unwrap().contains("avc1"), "{rec}");
    let segs = rec["segments"].as_array().unwrap();
    assert!(segs.len() >= 7, "30 s in 4 s segments: {}", segs.len());

    // Contiguous: media time exactly, capture time within a frame.
    for pair in segs.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert_eq!(u(b, "number"), u(a, "number") + 1);
        assert_eq!(
            u(b, "mediaStart"),
            u(a, "mediaStart") + u(a, "mediaDuration"),
            "media time runs on: {a} {b}"
        );
        let hole = (u(b, "startUs") - u(a, "endUs")).abs();
        assert!(hole <= 40_000, "gap or overlap of {hole} µs: {a} {b}");
        // GOP-aligned, near the 4 s target.
        let d = u(a, "mediaDuration") as f64 / 90_000.0;
        assert!((3.0..=6.5).contains(&d), "segment of {d} s");
    }

    // Every segment (after the init segment) passes ffprobe; so does the whole recording.
    let (status, init) = get(&hub, Some(&judge), rec["initUrl"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    let mut whole = init.clone();
    for s in segs {
        let (status, data) = get(&hub, Some(&judge), s["url"].as_str().unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(data.len() as i64, u(s, "bytes"));
        let one = tmp.path().join("one.mp4");
        std::fs::write(&one, [init.as_slice(), &data].concat())?;
        let (ok, duration, err) = ffprobe(&one);
        assert!(ok && duration > 2.0, "segment {s}: {err}");
        whole.extend_from_slice(&data);
    }
    let rec_seconds: f64 = segs
        .iter()
        .map(|s| u(s, "mediaDuration") as f64 / 90_000.0)
        .sum();
    let all = tmp.path().join("all.mp4");
    std::fs::write(&all, &whole)?;
    let (ok, duration, err) = ffprobe(&all);
    assert!(ok, "{err}");
    assert!(
        (duration - rec_seconds).abs() < 0.5,
        "{duration} s vs {} s indexed",
        rec_seconds
    );
    // Without a token, nothing is served.
    let (status, _) = get(&hub, None, segs[0]["url"].as_str().unwrap()).await;
    assert_eq!(status, 401);

    let (ok, out) = verify_data(&hub, &["--unit", "bwc-1"]);
    assert!(ok, "{out}");
    assert!(out.contains("OK") && out.contains("segment"), "{out}");
    Ok(())
}

/// A fleet of simulated units recording with short segments.
async fn recording_hub(dir: &Path, config: &str, units: usize) -> anyhow::Result<(Hub, Simulator)> {
    let hub = Hub::start(dir, Some(config)).await?;
    let tokens = hub.fleet("sim-", units);
    let sim = Simulator::start(&hub, units, &tokens, &[])?;
    Ok((hub, sim))
}

const FAST: &str = "[evidence]\nsegment_target = \"1s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_mid_recording_repairs_its_index_and_the_chain_continues_with_a_signed_gap()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (mut hub, _sim) = recording_hub(tmp.path(), FAST, 1).await?;
    let judge = hub.token("auditor", "judge-1");
    wait_recorded(&hub, &judge, "unit=sim-1", Duration::from_secs(60), |l| {
        segments(l).len() >= 3
    })
    .await;
    let before = segments(&recordings(&hub, &judge, "unit=sim-1").await);
    let killed_at = unix_now_us() as i64;
    hub.kill();
    // What a crash leaves: a half-written segment, and a file written but never indexed.
    let unit_dir = hub.dir.join("data/recordings/sim-1");
    let rec_dir = std::fs::read_dir(&unit_dir)?.next().unwrap()?.path();
    std::fs::write(rec_dir.join("999998.tmp"), b"half a segment")?;
    std::fs::write(rec_dir.join("999999.m4s"), b"never indexed")?;

    hub.start_again().await?;
    // The agent reconnects by itself; recording goes on in a new recording.
    let list = wait_recorded(&hub, &judge, "unit=sim-1", Duration::from_secs(60), |l| {
        l["recordings"].as_array().is_some_and(|r| r.len() >= 2)
            && segments(l).len() >= before.len() + 2
    })
    .await;
    let log = hub.log();
    assert!(log.contains("recordings repaired"), "{log}");
    assert!(!rec_dir.join("999998.tmp").exists());
    assert!(!rec_dir.join("999999.m4s").exists());
    assert!(
        hub.dir
            .join("data/recordings/.orphans/sim-1")
            .join(rec_dir.file_name().unwrap())
            .join("999999.m4s")
            .exists()
    );

    // At most the segment being written was lost: the first recording reaches to within
    // one segment (≤ a couple of seconds here) of the kill, and a gap record covers the rest.
    let first = &list["recordings"][0];
    let last_end = first["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| u(s, "endUs"))
        .max()
        .unwrap();
    assert!(
        killed_at - last_end < 3_000_000,
        "{} s lost before the kill",
        (killed_at - last_end) as f64 / 1e6
    );
    let gaps = list["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{list}");
    assert_eq!(u(&gaps[0], "startUs"), last_end);
    let second_start = u(&list["recordings"][1]["segments"][0], "startUs");
    assert_eq!(u(&gaps[0], "endUs"), second_start);

    // The whole chain verifies, gap included.
    let (ok, out) = verify_data(&hub, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("1 gap record"), "{out}");
    Ok(())
}

/// Copies a stopped hub's data dir, applies `tamper` to the copy, and runs `hub verify`.
fn tampered(hub: &Hub, name: &str, tamper: impl FnOnce(&Path)) -> (bool, String) {
    let copy = hub.dir.join(name);
    let status = Command::new("cp")
        .arg("-a")
        .arg(hub.dir.join("data"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    tamper(&copy);
    let o = hub_cmd(&["verify", "--data", copy.to_str().unwrap()]);
    (o.status.success(), text(&o))
}

fn sqlite(db: &Path, sql: &str) {
    let o = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()")
        .arg(db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

/// The media segment files of a data dir, in recording order.
fn media_files(data: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let unit = data.join("recordings/sim-1");
    let mut recs: Vec<_> = std::fs::read_dir(unit)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    recs.sort();
    for rec in recs {
        let mut f: Vec<_> = std::fs::read_dir(rec)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "m4s"))
            .collect();
        f.sort();
        files.extend(f);
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_verify_catches_every_kind_of_tampering() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (mut hub, sim) = recording_hub(tmp.path(), FAST, 1).await?;
    let judge = hub.token("auditor", "judge-1");
    wait_recorded(&hub, &judge, "unit=sim-1", Duration::from_secs(60), |l| {
        segments(l).len() >= 4
    })
    .await;
    drop(sim);
    hub.stop();
    let (ok, out) = verify_data(&hub, &[]);
    assert!(ok, "untouched: {out}");

    let (ok, out) = tampered(&hub, "flip", |d| {
        let f = &media_files(d)[1];
        let mut data = std::fs::read(f).unwrap();
        let i = data.len() / 2;
        data[i] ^= 0x01;
        std::fs::write(f, data).unwrap();
    });
    assert!(!ok && out.contains("its content was changed"), "{out}");

    let (ok, out) = tampered(&hub, "delete", |d| {
        std::fs::remove_file(&media_files(d)[1]).unwrap();
    });
    assert!(!ok && out.contains("cannot be read"), "{out}");

    let (ok, out) = tampered(&hub, "swap", |d| {
        let f = media_files(d);
        let tmp = f[1].with_extension("swap");
        std::fs::rename(&f[1], &tmp).unwrap();
        std::fs::rename(&f[2], &f[1]).unwrap();
        std::fs::rename(&tmp, &f[2]).unwrap();
    });
    assert!(!ok && out.contains("were swapped or moved"), "{out}");

    // Rows: one edited, one removed (and the rest renumbered to hide it), two swapped.
    let (ok, out) = tampered(&hub, "edit-row", |d| {
        sqlite(
            &d.join("index.sqlite"),
            "UPDATE segments SET start_us = start_us + 1000000 WHERE seq = 3",
        );
    });
    assert!(!ok && out.contains("the index row was edited"), "{out}");
    let (ok, out) = tampered(&hub, "delete-row", |d| {
        sqlite(
            &d.join("index.sqlite"),
            "DELETE FROM segments WHERE seq = 3",
        );
    });
    assert!(!ok && out.contains("missing from the index"), "{out}");
    let (ok, out) = tampered(&hub, "swap-rows", |d| {
        sqlite(
            &d.join("index.sqlite"),
            "UPDATE segments SET seq = -1 WHERE seq = 3; UPDATE segments SET seq = 3 WHERE seq = 4; \
             UPDATE segments SET seq = 4 WHERE seq = -1;",
        );
    });
    assert!(!ok && out.contains("does not link"), "{out}");

    // The newest rows cut off the end of the chain, files and all: no link breaks, but the
    // head the audit log recorded when the unit went offline is missing.
    let (ok, out) = tampered(&hub, "cut-tail", |d| {
        let files = media_files(d);
        std::fs::remove_file(files.last().unwrap()).unwrap();
        sqlite(
            &d.join("index.sqlite"),
            "DELETE FROM segments WHERE seq = (SELECT MAX(seq) FROM segments)",
        );
    });
    assert!(!ok && out.contains("cut off the end"), "{out}");

    // The audit log: an entry edited, and one removed.
    let (ok, out) = tampered(&hub, "edit-audit", |d| {
        sqlite(
            &d.join("index.sqlite"),
            "UPDATE audit SET actor = 'nobody' WHERE seq = 1",
        );
    });
    assert!(
        !ok && out.contains("audit #1") && out.contains("edited"),
        "{out}"
    );
    let (ok, out) = tampered(&hub, "delete-audit", |d| {
        sqlite(&d.join("index.sqlite"), "DELETE FROM audit WHERE seq = 1");
    });
    assert!(!ok && out.contains("audit #2"), "{out}");

    // A damaged file is found at start-up and is not served.
    let victim = media_files(&hub.dir.join("data"))[0].clone();
    let data = std::fs::read(&victim)?;
    std::fs::write(&victim, &data[..data.len() / 2])?;
    hub.start_again().await?;
    assert!(
        hub.log().contains("recorded file is a different size"),
        "{}",
        hub.log()
    );
    let list = recordings(&hub, &judge, "unit=sim-1").await;
    let first = segments(&list)[0]["url"].as_str().unwrap().to_string();
    let (status, body) = get(&hub, Some(&judge), &first).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    Ok(())
}

fn case_cli(hub: &Hub, token: &str, args: &[&str]) -> Output {
    let url = format!("http://{}", hub.http);
    let mut all = vec!["case", "--hub", &url, "--token", token];
    all.extend_from_slice(args);
    hub_cmd(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_case_is_recorded_exported_and_verified_on_another_machine() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), Some(FAST)).await?;
    let commander = hub.token("commander", "cmdr-1");
    let viewer = hub.token("viewer", "v-1");

    // Cases and operations, and what is refused.
    let o = case_cli(
        &hub,
        &commander,
        &["create", "--number", CASE, "--party", "张三"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = case_cli(&hub, &commander, &["create", "--number", CASE]);
    assert!(
        !o.status.success() && text(&o).contains("exists already"),
        "{}",
        text(&o)
    );
    let o = case_cli(&hub, &viewer, &["create", "--number", "x"]);
    assert!(
        !o.status.success() && text(&o).contains("PermissionDenied"),
        "{}",
        text(&o)
    );
    let op = [
        "--units",
        "sim-1",
        "--lat",
        "39.9",
        "--lon",
        "116.4",
        "--duration",
        "1h",
    ];
    let o = case_cli(
        &hub,
        &commander,
        &[&["operation", "--case", "(2026)no such"][..], &op].concat(),
    );
    assert!(
        !o.status.success() && text(&o).contains("no case"),
        "{}",
        text(&o)
    );
    let o = case_cli(
        &hub,
        &commander,
        &[&["operation", "--case", CASE, "--id", "op-1"][..], &op].concat(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = case_cli(
        &hub,
        &commander,
        &[&["operation", "--case", CASE, "--id", "op-1"][..], &op].concat(),
    );
    assert!(
        !o.status.success() && text(&o).contains("exists already"),
        "{}",
        text(&o)
    );
    let o = case_cli(
        &hub,
        &commander,
        &[&["operation", "--case", CASE, "--id", "op-2"][..], &op].concat(),
    );
    assert!(
        !o.status.success() && text(&o).contains("already assigned"),
        "{}",
        text(&o)
    );
    let o = case_cli(
        &hub,
        &commander,
        &[
            "operation",
            "--case",
            CASE,
            "--units",
            "sim-1",
            "--lat",
            "91",
            "--lon",
            "0",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("latitude"),
        "{}",
        text(&o)
    );

    // sim-1 is in the operation, sim-2 is not.
    let tokens = hub.fleet("sim-", 2);
    let sim = Simulator::start(&hub, 2, &tokens, &[])?;
    let list = wait_recorded(
        &hub,
        &commander,
        &format!("case={}", tianwang_tests::query_value(CASE)),
        Duration::from_secs(60),
        |l| segments(l).len() >= 3,
    )
    .await;
    assert!(
        list["recordings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["unit"] == "sim-1"),
        "only the operation's unit is bound: {list}"
    );
    for s in segments(&list) {
        assert_eq!(s["caseNumber"], CASE);
        assert_eq!(s["operationId"], "op-1");
    }
    // Playing back one media segment (no init) is audited, bound to the case.
    let first = segments(&list)[0]["url"].as_str().unwrap().to_string();
    let (status, _) = get(&hub, Some(&commander), &first).await;
    assert_eq!(status, 200);
    let o = case_cli(&hub, &commander, &["close", "--number", CASE]);
    assert!(
        !o.status.success() && text(&o).contains("active operation"),
        "{}",
        text(&o)
    );
    let o = case_cli(&hub, &commander, &["close-operation", "--id", "op-1"]);
    assert!(o.status.success(), "{}", text(&o));
    drop(sim);

    // Export while the hub runs; verify it in a fresh place with the public key alone.
    let out = tmp.path().join("export");
    let data = hub.dir.join("data");
    let o = hub_cmd(&[
        "export",
        "--data",
        data.to_str().unwrap(),
        "--case",
        CASE,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let key = String::from_utf8(hub_cmd(&["key", "--data", data.to_str().unwrap()]).stdout)?;
    let elsewhere = tempfile::tempdir()?;
    let moved = elsewhere.path().join("bundle");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&out)
            .arg(&moved)
            .status()?
            .success()
    );
    let verify = |dir: &Path, key: &str| {
        let o = Command::new(bin("hub"))
            .current_dir(elsewhere.path())
            .args(["verify", "--export"])
            .arg(dir)
            .args(["--key", key.trim()])
            .output()
            .unwrap();
        (o.status.success(), text(&o))
    };
    let (ok, report) = verify(&moved, &key);
    assert!(ok, "{report}");
    let manifest: Value = serde_json::from_slice(&std::fs::read(moved.join("manifest.json"))?)?;
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "one MP4 for sim-1 in op-1");
    let mp4 = moved.join(files[0]["name"].as_str().unwrap());
    let (probe_ok, duration, err) = ffprobe(&mp4);
    assert!(probe_ok && duration >= 2.0, "{err}");
    let actions: Vec<&str> = manifest["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for a in [
        "case.create",
        "operation.create",
        "playback",
        "operation.close",
        "export",
    ] {
        assert!(
            actions.contains(&a),
            "{a} in the audit excerpt: {actions:?}"
        );
    }

    // A wrong key and every kind of change are refused.
    let other = "0".repeat(64);
    let (ok, report) = verify(&moved, &other);
    assert!(!ok && report.contains("manifest.sig"), "{report}");
    let mut bytes = std::fs::read(&mp4)?;
    let i = bytes.len() - 100;
    bytes[i] ^= 0x80;
    std::fs::write(&mp4, &bytes)?;
    let (ok, report) = verify(&moved, &key);
    assert!(!ok && report.contains("differ"), "{report}");
    bytes[i] ^= 0x80;
    std::fs::write(&mp4, &bytes)?;
    let manifest_text = std::fs::read_to_string(moved.join("manifest.json"))?;
    std::fs::write(
        moved.join("manifest.json"),
        manifest_text.replace("op-1", "op-9"),
    )?;
    let (ok, report) = verify(&moved, &key);
    assert!(!ok && report.contains("manifest.sig"), "{report}");

    // Now the case closes; an export into a non-empty directory is refused.
    let o = case_cli(&hub, &commander, &["close", "--number", CASE]);
    assert!(o.status.success(), "{}", text(&o));
    let o = hub_cmd(&[
        "export",
        "--data",
        data.to_str().unwrap(),
        "--case",
        CASE,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("not empty"),
        "{}",
        text(&o)
    );
    let (ok, out) = verify_data(&hub, &["--case", CASE]);
    assert!(ok, "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_expired_unbound_recordings_and_audits_each_deletion()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = "[evidence]\nsegment_target = \"1s\"\n[evidence.retention]\ninterval = \"1s\"\nunbound = \"3s\"\nclosed_case = \"3s\"\n";
    let hub = Hub::start(tmp.path(), Some(config)).await?;
    let commander = hub.token("commander", "cmdr-1");
    let o = case_cli(&hub, &commander, &["create", "--number", CASE]);
    assert!(o.status.success(), "{}", text(&o));
    let o = case_cli(
        &hub,
        &commander,
        &[
            "operation",
            "--case",
            CASE,
            "--units",
            "sim-1",
            "--lat",
            "39.9",
            "--lon",
            "116.4",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let tokens = hub.fleet("sim-", 2);
    let _sim = Simulator::start(&hub, 2, &tokens, &[])?;
    // sim-2's oldest segments expire after 3 s; sim-1's belong to an open case.
    hub.wait_metric(
        "tianwang_retention_deleted_total",
        Duration::from_secs(60),
        |v| v >= 2.0,
    )
    .await?;
    let sim1 = recordings(&hub, &commander, "unit=sim-1").await;
    let first = u(&segments(&sim1)[0], "number");
    assert_eq!(first, 1, "the open case's recording is whole: {sim1}");
    let sim2 = recordings(&hub, &commander, "unit=sim-2").await;
    assert!(
        segments(&sim2).first().is_none_or(|s| u(s, "number") > 1),
        "sim-2's oldest segments are gone: {sim2}"
    );
    // Deletions are vouched for by the audit log, so the chain still verifies.
    let (ok, out) = verify_data(&hub, &[]);
    assert!(ok, "{out}");
    Ok(())
}

/// A small tmpfs for recordings, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tianwang-test",
            ])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            text(&o)
        );
        Self(path.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_recording_with_an_error_keeps_finished_segments_and_resumes()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("disk");
    let _mount = SmallDisk::mount(&disk, "8m");
    let config = format!(
        "[evidence]\nsegment_target = \"1s\"\ndir = \"{}\"\n",
        disk.display()
    );
    let (hub, _sim) = recording_hub(tmp.path(), &config, 1).await?;
    hub.wait_metric(
        "tianwang_recorded_segments_total",
        Duration::from_secs(60),
        |v| v >= 2.0,
    )
    .await?;
    let cfg = hub.dir.join("hub.toml");
    let cfg = ["--config", cfg.to_str().unwrap()];
    // Fill the disk.
    let filler = disk.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output();
    hub.wait_metric(
        "tianwang_recording_errors_total",
        Duration::from_secs(30),
        |v| v >= 2.0,
    )
    .await?;
    let log = hub.log();
    assert!(log.contains("a segment could not be recorded"), "{log}");
    assert!(log.contains("No space left on device"), "{log}");
    // The hub stays up, the segments written before are intact.
    let (ok, out) = verify_data(&hub, &cfg);
    assert!(ok, "{out}");
    // Space returns: recording resumes by itself.
    let written = hub.metrics().await?.get("tianwang_recorded_segments_total");
    std::fs::remove_file(&filler)?;
    hub.wait_metric(
        "tianwang_recorded_segments_total",
        Duration::from_secs(30),
        |v| v >= written + 2.0,
    )
    .await?;
    assert!(hub.log().contains("recording resumed"));
    let judge = hub.token("auditor", "judge-1");
    let list = recordings(&hub, &judge, "unit=sim-1").await;
    assert!(
        !list["gaps"].as_array().unwrap().is_empty(),
        "the lost time is a gap record: {list}"
    );
    let (ok, out) = verify_data(&hub, &cfg);
    assert!(ok, "{out}");
    Ok(())
}

/// The same index work on either database: cases and their refusals, case-bound recording,
/// verification, and an edited row caught.
async fn index_round_trip(tmp: &Path, url: &str) -> anyhow::Result<()> {
    let config = format!("[evidence]\nsegment_target = \"1s\"\nindex_url = \"{url}\"\n");
    let mut hub = Hub::start(tmp, Some(&config)).await?;
    let commander = hub.token("commander", "cmdr-1");
    let op = ["--units", "sim-1", "--lat", "39.9", "--lon", "116.4"];
    let ok = |o: Output| assert!(o.status.success(), "{}", text(&o));
    let refused = |o: Output, why: &str| {
        assert!(
            !o.status.success() && text(&o).contains(why),
            "{why}: {}",
            text(&o)
        )
    };
    ok(case_cli(&hub, &commander, &["create", "--number", CASE]));
    refused(
        case_cli(&hub, &commander, &["create", "--number", CASE]),
        "exists already",
    );
    refused(
        case_cli(
            &hub,
            &commander,
            &[&["operation", "--case", "nope"][..], &op].concat(),
        ),
        "no case nope",
    );
    ok(case_cli(
        &hub,
        &commander,
        &[&["operation", "--case", CASE, "--id", "op-1"][..], &op].concat(),
    ));
    refused(
        case_cli(
            &hub,
            &commander,
            &[&["operation", "--case", CASE, "--id", "op-1"][..], &op].concat(),
        ),
        "exists already",
    );
    refused(
        case_cli(&hub, &commander, &["close", "--number", CASE]),
        "active operation",
    );

    let tokens = hub.fleet("sim-", 1);
    let sim = Simulator::start(&hub, 1, &tokens, &[])?;
    let query = format!("case={}", tianwang_tests::query_value(CASE));
    wait_recorded(&hub, &commander, &query, Duration::from_secs(60), |l| {
        segments(l).len() >= 3
    })
    .await;
    ok(case_cli(
        &hub,
        &commander,
        &["close-operation", "--id", "op-1"],
    ));
    ok(case_cli(&hub, &commander, &["close", "--number", CASE]));
    let shown = case_cli(&hub, &commander, &["show", "--number", CASE]);
    assert!(text(&shown).contains("(closed)"), "{}", text(&shown));
    // Revoked through this index (SQLite or PostgreSQL): the running hub refuses the user's
    // token within seconds (it re-reads the table when it changed); a token issued after
    // the revocation's second works.
    let data = hub.dir.join("data").to_string_lossy().into_owned();
    let toml = hub.dir.join("hub.toml").to_string_lossy().into_owned();
    ok(hub_cmd(&[
        "token",
        "revoke",
        "--subject",
        "cmdr-1",
        "--reason",
        "round trip",
        "--data",
        &data,
        "--config",
        &toml,
    ]));
    let t = std::time::Instant::now();
    loop {
        let o = case_cli(&hub, &commander, &["show", "--number", CASE]);
        if !o.status.success() {
            assert!(text(&o).contains("revoked"), "{}", text(&o));
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still accepted 10 s after its revocation"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    ok(case_cli(
        &hub,
        &hub.token("commander", "cmdr-1"),
        &["show", "--number", CASE],
    ));
    drop(sim);
    hub.stop();

    let cfg = hub.dir.join("hub.toml");
    let cfg = ["--config", cfg.to_str().unwrap()];
    let (passed, out) = verify_data(&hub, &[&cfg[..], &["--case", CASE]].concat());
    assert!(passed, "{out}");
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await?;
    sqlx::query("UPDATE segments SET bytes = bytes + 1 WHERE seq = 2")
        .execute(&pool)
        .await?;
    pool.close().await;
    let (passed, out) = verify_data(&hub, &cfg);
    assert!(!passed && out.contains("the index row was edited"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_on_sqlite() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}?mode=rwc",
        tmp.path().join("index.sqlite").display()
    );
    index_round_trip(tmp.path(), &url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_on_a_real_postgresql_server() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let pg = tianwang_tests::postgres::Postgres::start().await?;
    index_round_trip(tmp.path(), &pg.url()).await
}
