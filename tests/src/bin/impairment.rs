//! The impairment matrix (issue "Nothing lost"): a real unit through the impairing relay,
//! per condition the live delay, live frames delivered, stall time and the recording's
//! completeness after backfill. `--quick` is the short version CI runs.
//!
//!   cargo run -p tianwang-tests --bin impairment [-- --quick] [--only TEXT]
//!
//! Prints a Markdown table (docs/benchmarks.md, "Impaired networks") and one JSON line per
//! condition.

use tianwang_tests::impair::{matrix, run, table};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // --only TEXT: the conditions whose name contains it.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let mut rows = Vec::new();
    for cond in matrix(quick)
        .into_iter()
        .filter(|c| only.as_ref().is_none_or(|o| c.name.contains(o.as_str())))
    {
        let tmp = tempfile::tempdir()?;
        eprintln!("{} ({:?})…", cond.name, cond.window);
        let figures = run(tmp.path(), &cond).await?;
        if std::env::var_os("IMPAIR_KEEP").is_some() {
            eprintln!("kept {}", tmp.keep().display());
        }
        println!("{}", serde_json::to_string(&figures)?);
        rows.push(figures);
    }
    println!("\n{}", table(&rows));
    Ok(())
}
