//! A UDP relay between a client and a server that a test can black out: packets in both
//! directions are dropped while the blackout lasts, as when a unit drives into a tunnel.

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
    task: tokio::task::JoinHandle<()>,
}

impl UdpRelay {
    pub async fn start(server: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let blackout = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            front,
            server,
            Arc::clone(&blackout),
            Arc::clone(&dropped),
        ));
        Ok(Self {
            addr,
            blackout,
            dropped,
            task,
        })
    }

    pub fn set_blackout(&self, on: bool) {
        self.blackout.store(on, Ordering::SeqCst);
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    front: Arc<UdpSocket>,
    server: SocketAddr,
    blackout: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
) {
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
        let _ = up.send_to(&buf[..n], server).await;
    }
}
