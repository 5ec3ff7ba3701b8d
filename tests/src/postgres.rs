//! A throwaway PostgreSQL server for tests: its own data directory in a temp dir, its own
//! free port on loopback, trust authentication, no fsync. It uses neither the cluster that
//! Debian's package may create nor systemd; it is stopped and its directory removed on drop.
//!
//! The server binaries come from `scripts/deps test` (Debian's `postgresql`, in
//! `/usr/lib/postgresql/<version>/bin`), or from the directory named by `TIANWANG_PG_BIN`.
//! PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::{free_tcp_addr, log_file};

/// The superuser, and the database that `start` creates.
pub const USER: &str = "tianwang";

/// A running PostgreSQL server.
pub struct Postgres {
    child: Option<Child>,
    bin: PathBuf,
    port: u16,
    dir: TempDir,
    /// The user the server runs as when this process is root.
    owner: Option<(u32, u32)>,
}

impl Postgres {
    /// Initialises a fresh cluster, starts it on a free port and creates the database
    /// `tianwang` (bounded: 30 s until the server accepts connections).
    pub async fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        // /proc/self belongs to the effective user.
        let euid = std::fs::metadata("/proc/self")
            .context("reading /proc/self")?
            .uid();
        let owner = if euid == 0 {
            Some(postgres_user().await?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("tianwang-pg-")
            .tempdir()
            .context("creating the PostgreSQL temp dir")?;
        std::fs::create_dir(dir.path().join("sock")).context("creating the socket dir")?;
        if let Some((uid, gid)) = owner {
            for p in [dir.path().to_path_buf(), dir.path().join("sock")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .with_context(|| format!("chown {} to postgres", p.display()))?;
            }
        }

        let mut initdb = tokio::process::Command::new(bin.join("initdb"));
        initdb
            .args([
                "-D",
                "data",
                "-U",
                USER,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .args(["--locale=C.UTF-8", "--no-instructions"])
            .current_dir(dir.path());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().await.context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let mut pg = Self {
            child: None,
            bin,
            port: 0,
            dir,
            owner,
        };
        // The port is free when chosen but may be taken before the server binds it: retry.
        for attempt in 1..=3 {
            pg.port = free_tcp_addr().port();
            match pg.spawn(owner).await {
                Ok(()) => break,
                Err(e) if attempt < 3 && pg.log().contains("already in use") => {
                    tracing::warn!("postgres port {} taken, retrying: {e:#}", pg.port);
                }
                Err(e) => return Err(e),
            }
        }
        pg.create_database(USER).await?;
        Ok(pg)
    }

    async fn spawn(&mut self, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let log = self.dir.path().join("postgres.log");
        let mut cmd = Command::new(self.bin.join("postgres"));
        // Absolute paths: the server changes into its data directory.
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?);
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
        }
        self.child = Some(cmd.spawn().context("starting postgres")?);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!("postgres exited early ({status}); log: {}", self.log());
            }
            let ready = tokio::process::Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", USER, "-d", "postgres", "-t", "1", "-q"])
                .status()
                .await
                .context("running pg_isready")?;
            if ready.success() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                self.stop();
                bail!(
                    "postgres did not accept connections in 30 s; log: {}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the server again after [`Postgres::stop`], on the same port and data (a
    /// database that comes back).
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("postgres is running");
        }
        self.spawn(self.owner).await
    }

    async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .arg(name)
            .output()
            .await
            .context("running createdb")?;
        if !out.status.success() {
            bail!(
                "createdb {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `postgres://tianwang@127.0.0.1:PORT/tianwang`.
    pub fn url(&self) -> String {
        self.url_for(USER)
    }

    /// The URL of database `db` on this server.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database `name` (lowercase letters, digits, `_`) and returns its URL.
    pub async fn fresh_database(&self, name: &str) -> anyhow::Result<String> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            bail!("database name {name:?}: use lowercase letters, digits and _");
        }
        self.create_database(name).await?;
        Ok(self.url_for(name))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The temp dir holding the cluster (`data`), its socket (`sock`) and `postgres.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server: fast shutdown (SIGINT, which ends the sessions), then immediate
    /// (SIGQUIT), then SIGKILL, each bounded in time.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = i32::try_from(child.id()).ok().map(Pid::from_raw);
        for (signal, wait) in [(Signal::SIGINT, 100), (Signal::SIGQUIT, 50)] {
            if let Some(pid) = pid {
                let _ = kill(pid, signal);
            }
            for _ in 0..wait {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The server first; the temp dir goes when the field drops.
        self.stop();
    }
}

/// The directory of the newest PostgreSQL server binaries installed.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let has_server = |d: &Path| {
        ["initdb", "postgres", "pg_isready", "createdb"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(d) = std::env::var_os("TIANWANG_PG_BIN") {
        let d = PathBuf::from(d);
        if has_server(&d) {
            return Ok(d);
        }
        bail!(
            "TIANWANG_PG_BIN={} lacks initdb, postgres, pg_isready or createdb",
            d.display()
        );
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server in {}/<version>/bin: install it with `scripts/deps test` \
             (or point TIANWANG_PG_BIN at a directory with initdb and postgres)",
            root.display()
        ),
    }
}

/// Uid and gid of the `postgres` user, which runs the server when the tests run as root.
async fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let out = tokio::process::Command::new("getent")
        .args(["passwd", "postgres"])
        .output()
        .await
        .context("running getent passwd postgres")?;
    let line = String::from_utf8_lossy(&out.stdout);
    let mut fields = line.trim().split(':').skip(2);
    match (fields.next().map(str::parse), fields.next().map(str::parse)) {
        (Some(Ok(uid)), Some(Ok(gid))) if out.status.success() => Ok((uid, gid)),
        _ => bail!(
            "running as root, PostgreSQL needs the unprivileged `postgres` user, which is \
             missing: install the server with `scripts/deps test`"
        ),
    }
}
