//! A UDP relay between a client and a server that a test can black out: packets in both
//! directions are dropped while the blackout lasts, as when a unit drives into a tunnel.
//! It can also cap the client → server rate, like a narrow uplink: packets wait in a
//! bounded queue (a quarter second at the rate) and are sent paced; past it they drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::UdpSocket;
use tokio::sync::Mutex;

pub struct UdpRelay {
    pub addr: SocketAddr,
    blackout: Arc<AtomicBool>,
    pub dropped: Arc<AtomicU64>,
    /// bit/s of the client → server direction; 0 for no cap.
    rate: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpRelay {
    pub async fn start(server: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let blackout = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            front,
            server,
            Arc::clone(&blackout),
            Arc::clone(&dropped),
            Arc::clone(&rate),
        ));
        Ok(Self {
            addr,
            blackout,
            dropped,
            rate,
            task,
        })
    }

    pub fn set_blackout(&self, on: bool) {
        self.blackout.store(on, Ordering::SeqCst);
    }

    /// Caps the client → server direction at `bits_per_second` (None: no cap).
    pub fn set_rate(&self, bits_per_second: Option<u64>) {
        self.rate
            .store(bits_per_second.unwrap_or(0), Ordering::SeqCst);
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends client → server packets no faster than the cap, from a queue of at most a
/// quarter second at that rate.
async fn shaper(
    mut rx: tokio::sync::mpsc::Receiver<(Arc<UdpSocket>, Vec<u8>)>,
    server: SocketAddr,
    rate: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
) {
    let mut queue: std::collections::VecDeque<(Arc<UdpSocket>, Vec<u8>)> = Default::default();
    let mut queued = 0usize;
    let mut next = tokio::time::Instant::now();
    loop {
        let cap = rate.load(Ordering::SeqCst);
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => {
                    let limit = (cap / 8 / 4).max(3000) as usize;
                    if cap > 0 && queued + p.1.len() > limit {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        queued += p.1.len();
                        queue.push_back(p);
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep_until(next), if !queue.is_empty() => {
                if let Some((up, data)) = queue.pop_front() {
                    queued -= data.len();
                    let _ = up.send_to(&data, server).await;
                    let now = tokio::time::Instant::now();
                    next = match (data.len() as u64 * 8 * 1_000_000_000).checked_div(cap) {
                        Some(ns) => {
                            next.max(now - std::time::Duration::from_millis(5))
                                + std::time::Duration::from_nanos(ns)
                        }
                        None => now,
                    };
                }
            }
        }
    }
}

async fn run(
    front: Arc<UdpSocket>,
    server: SocketAddr,
    blackout: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
) {
    let (shaped, rx) = tokio::sync::mpsc::channel(4096);
    let shaper = tokio::spawn(shaper(rx, server, Arc::clone(&rate), Arc::clone(&dropped)));
    let _stop = AbortOnDrop(shaper);
    // One upstream socket per client address, so the server sees distinct peers.
    let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        if blackout.load(Ordering::SeqCst) {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let up = {
            let mut map = upstreams.lock().await;
            match map.get(&client) {
                Some(s) => Arc::clone(s),
                None => {
                    let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    let s = Arc::new(s);
                    map.insert(client, Arc::clone(&s));
                    // Server → client direction for this client.
                    let (s2, front2, blackout2, dropped2) = (
                        Arc::clone(&s),
                        Arc::clone(&front),
                        Arc::clone(&blackout),
                        Arc::clone(&dropped),
                    );
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok((n, _)) = s2.recv_from(&mut buf).await {
                            if blackout2.load(Ordering::SeqCst) {
                                dropped2.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            let _ = front2.send_to(&buf[..n], client).await;
                        }
                    });
                    s
                }
            }
        };
        if rate.load(Ordering::SeqCst) > 0 {
            let _ = shaped.try_send((up, buf[..n].to_vec()));
        } else {
            let _ = up.send_to(&buf[..n], server).await;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
