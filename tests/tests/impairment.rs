//! The impairment matrix's short version (the long one is `cargo run --bin impairment`):
//! clean, 2 % loss and a 5 s blackout, each through the impairing relay with a real unit.
//! The recording must hold every frame the device encoded once backfill is done, and a
//! clean or lossy link must deliver every frame live.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use tianwang_tests::impair::{matrix, run, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_condition_the_spool_covers_ends_with_a_complete_recording() -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for cond in matrix(true) {
        let tmp = tempfile::tempdir()?;
        rows.push(run(tmp.path(), &cond).await?);
    }
    println!("{}", table(&rows));
    for r in &rows {
        assert!(r.frames_encoded > 200, "{r:?}");
        assert_eq!(r.completeness_pct, 100.0, "{r:?}");
        if r.condition != "5 s blackout" {
            assert!(r.live_delivered_pct > 99.0, "{r:?}");
        }
    }
    Ok(())
}
