//! The audit trail: every login, view, case change, playback, export and deletion, appended
//! to a hash chain (each row's hash covers the previous row's) and signed by the hub.
//!
//! Recording an event never waits: events go through a bounded queue to one writer task,
//! which keeps the chain in order. A full queue drops the event and counts it (and says so
//! in the log), rather than slowing a session down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::index::{AuditRow, GENESIS, Index};
use super::keys::Signer;

enum Message {
    Event {
        at_us: i64,
        actor: String,
        action: String,
        subject: String,
        detail: serde_json::Value,
        /// Told whether the entry was written, for callers that must know.
        written: Option<oneshot::Sender<bool>>,
    },
    Flush(oneshot::Sender<()>),
}

/// A handle on the audit trail; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

pub fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Audit {
    /// Starts the writer. It runs until every handle is dropped.
    pub fn start(index: Index, signer: Arc<Signer>) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(write(index, signer, rx));
        Self {
            tx,
            dropped: Arc::default(),
        }
    }

    /// Appends an event (never waits).
    pub fn record(&self, actor: &str, action: &str, subject: &str, detail: serde_json::Value) {
        let msg = Message::Event {
            at_us: unix_us(),
            actor: actor.to_string(),
            action: action.to_string(),
            subject: subject.to_string(),
            detail,
            written: None,
        };
        if self.tx.try_send(msg).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            error!(
                action,
                subject, "audit queue full: an event was not recorded"
            );
        }
    }

    /// Appends an event and waits until it is written: for acts that must not happen
    /// unaudited (retention's deletions). False if it could not be written.
    pub async fn record_written(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        detail: serde_json::Value,
    ) -> bool {
        let (tx, rx) = oneshot::channel();
        let msg = Message::Event {
            at_us: unix_us(),
            actor: actor.to_string(),
            action: action.to_string(),
            subject: subject.to_string(),
            detail,
            written: Some(tx),
        };
        if self.tx.send(msg).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Waits until everything recorded so far is written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn write(index: Index, signer: Arc<Signer>, mut rx: mpsc::Receiver<Message>) {
    let (mut seq, mut prev) = loop {
        match index.last_audit().await {
            Ok(Some(last)) => break (last.seq, last.sha256),
            Ok(None) => break (0, GENESIS.to_string()),
            Err(e) => {
                error!(error = %e, "reading the audit log; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    while let Some(msg) = rx.recv().await {
        let (at_us, actor, action, subject, detail, confirm) = match msg {
            Message::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Message::Event {
                at_us,
                actor,
                action,
                subject,
                detail,
                written,
            } => (at_us, actor, action, subject, detail, written),
        };
        let mut row = AuditRow {
            seq: seq + 1,
            at_us,
            actor,
            action,
            subject,
            detail: detail.to_string(),
            prev_sha256: prev.clone(),
            sha256: String::new(),
            signature: String::new(),
        };
        row.sha256 = row.compute_hash();
        row.signature = signer.sign_hex(row.sha256.as_bytes());
        // The chain must not skip: retry a failed write. Another process on the same index
        // (`hub export`) may have appended meanwhile: then link after its entry instead.
        let mut written = false;
        for attempt in 0..5 {
            match index.insert_audit(&row).await {
                Ok(()) => {
                    written = true;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, attempt, "writing an audit row");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    if let Ok(Some(last)) = index.last_audit().await
                        && last.seq >= row.seq
                    {
                        row.seq = last.seq + 1;
                        row.prev_sha256 = last.sha256;
                        row.sha256 = row.compute_hash();
                        row.signature = signer.sign_hex(row.sha256.as_bytes());
                    }
                }
            }
        }
        if let Some(confirm) = confirm {
            let _ = confirm.send(written);
        }
        if written {
            seq = row.seq;
            prev = row.sha256;
        } else {
            error!(action = %row.action, subject = %row.subject, "an audit row could not be written");
        }
    }
}
