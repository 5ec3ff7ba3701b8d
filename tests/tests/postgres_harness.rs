//! The throwaway PostgreSQL server of the harness: it starts, serves separate databases,
//! and leaves neither a process nor a directory behind.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tianwang_tests::postgres::Postgres;

#[tokio::test]
async fn starts_serves_and_cleans_up() {
    let pg = Postgres::start().await.unwrap();
    let mut conn = PgConnection::connect(&pg.url()).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let (db, user): (String, String) = sqlx::query_as("SELECT current_database(), current_user")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!((db.as_str(), user.as_str()), ("tianwang", "tianwang"));

    // A second database is separate from the first.
    sqlx::query("CREATE TABLE t (x int)")
        .execute(&mut conn)
        .await
        .unwrap();
    let url = pg.fresh_database("other").await.unwrap();
    let mut other = PgConnection::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 't'")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(tables, 0);
    assert!(pg.fresh_database("Bad-Name").await.is_err());

    // Dropping stops the server even with sessions open, and removes its directory.
    let pid = pg.pid().unwrap();
    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while sqlx::query("SELECT 1").execute(&mut conn).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the session survived the server");
}
