//! An impairing UDP relay between a client (a unit) and a server (a hub), controllable from
//! tests: blackouts (packets in both directions dropped, as in a tunnel), loss, delay,
//! jitter (which reorders), duplication, a rate cap on the uplink (paced from a queue of
//! a quarter second at the rate, tail drop past it, like a narrow mobile uplink), and a
//! network change (the client's packets reach the server from a new address, as after a
//! NAT rebinding or a move from Wi-Fi to mobile).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the path does to packets. Delay and jitter apply in each direction (a 200 ms RTT
/// is 100 ms each way); the rate cap to client → server only.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Share of packets dropped, each direction.
    pub loss: f64,
    pub delay: Duration,
    /// Each packet's delay varies uniformly by ± this (packets overtake one another).
    pub jitter: Duration,
    /// Share of packets delivered twice.
    pub duplicate: f64,
    /// bit/s of the uplink; 0 for no cap.
    pub rate_bps: u64,
}

struct State {
    blackout: AtomicBool,
    /// Bumped by a network change: upstream sockets of older generations are dropped.
    generation: AtomicU64,
    impairment: Mutex<Impairment>,
    dropped: Arc<AtomicU64>,
}

pub struct UdpRelay {
    pub addr: SocketAddr,
    state: Arc<State>,
    pub dropped: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl UdpRelay {
    pub async fn start(server: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let dropped = Arc::new(AtomicU64::new(0));
        let state = Arc::new(State {
            blackout: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            impairment: Mutex::new(Impairment::default()),
            dropped: Arc::clone(&dropped),
        });
        let (up_tx, up_rx) = mpsc::channel(8192);
        let (down_tx, down_rx) = mpsc::channel(8192);
        let tasks = vec![
            tokio::spawn(line(up_rx, Arc::clone(&state), true)),
            tokio::spawn(line(down_rx, Arc::clone(&state), false)),
            tokio::spawn(run(front, server, Arc::clone(&state), up_tx, down_tx)),
        ];
        Ok(Self {
            addr,
            state,
            dropped,
            tasks,
        })
    }

    pub fn set_blackout(&self, on: bool) {
        self.state.blackout.store(on, Ordering::SeqCst);
    }

    /// Caps the client → server direction at `bits_per_second` (None: no cap).
    pub fn set_rate(&self, bits_per_second: Option<u64>) {
        self.impair(|i| i.rate_bps = bits_per_second.unwrap_or(0));
    }

    /// A network change: from now on the client's packets leave from a new source address,
    /// and what the server sends to the old one is lost.
    pub fn change_network(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn set_impairment(&self, impairment: Impairment) {
        self.impair(|i| *i = impairment);
    }

    fn impair(&self, f: impl FnOnce(&mut Impairment)) {
        f(&mut self
            .state
            .impairment
            .lock()
            .unwrap_or_else(|e| e.into_inner()));
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A packet on its way: sent from `via` to `to` at its time.
struct Packet {
    via: Arc<UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
}

/// One direction of the path: drops, delays, duplicates and (uplink) paces packets.
async fn line(mut rx: mpsc::Receiver<Packet>, state: Arc<State>, uplink: bool) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64, usize)>> = BinaryHeap::new();
    let mut waiting: HashMap<usize, Packet> = HashMap::new();
    let mut n: u64 = 0;
    let mut key: usize = 0;
    // When the uplink's "wire" is free again.
    let mut wire_free = Instant::now();
    loop {
        let next = heap.peek().map(|Reverse((at, _, _))| *at);
        tokio::select! {
            p = rx.recv() => {
                let Some(p) = p else { return };
                if state.blackout.load(Ordering::SeqCst) {
                    state.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let imp = *state.impairment.lock().unwrap_or_else(|e| e.into_inner());
                let mut rng = rand::rng();
                if imp.loss > 0.0 && rng.random::<f64>() < imp.loss {
                    state.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let now = Instant::now();
                let mut at = now;
                if uplink && imp.rate_bps > 0 {
                    let start = wire_free.max(now);
                    if start > now + Duration::from_millis(250) {
                        // The queue is full: tail drop.
                        state.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    wire_free = start
                        + Duration::from_nanos(p.data.len() as u64 * 8 * 1_000_000_000 / imp.rate_bps);
                    at = wire_free;
                }
                let jitter = if imp.jitter.is_zero() {
                    0.0
                } else {
                    rng.random_range(-1.0..1.0) * imp.jitter.as_secs_f64()
                };
                let delay = (imp.delay.as_secs_f64() + jitter).max(0.0);
                at += Duration::from_secs_f64(delay);
                let twice = imp.duplicate > 0.0 && rng.random::<f64>() < imp.duplicate;
                if twice {
                    key += 1;
                    n += 1;
                    waiting.insert(key, Packet { via: Arc::clone(&p.via), to: p.to, data: p.data.clone() });
                    heap.push(Reverse((at + Duration::from_millis(1), n, key)));
                }
                key += 1;
                n += 1;
                waiting.insert(key, p);
                heap.push(Reverse((at, n, key)));
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while let Some(Reverse((at, _, k))) = heap.peek().copied() {
                    if at > now {
                        break;
                    }
                    heap.pop();
                    if let Some(p) = waiting.remove(&k) {
                        let _ = p.via.send_to(&p.data, p.to).await;
                    }
                }
            }
        }
    }
}

async fn run(
    front: Arc<UdpSocket>,
    server: SocketAddr,
    state: Arc<State>,
    up: mpsc::Sender<Packet>,
    down: mpsc::Sender<Packet>,
) {
    // One upstream socket per client address, so the server sees distinct peers.
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut generation = 0;
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            return;
        };
        if state.blackout.load(Ordering::SeqCst) {
            state.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let now = state.generation.load(Ordering::SeqCst);
        if now != generation {
            generation = now;
            upstreams.clear();
        }
        let via = match upstreams.get(&client) {
            Some(s) => Arc::clone(s),
            None => {
                let Ok(s) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let s = Arc::new(s);
                upstreams.insert(client, Arc::clone(&s));
                // Server → client for this client, through the down line.
                let (s2, front2, down2) = (Arc::clone(&s), Arc::clone(&front), down.clone());
                let state2 = Arc::clone(&state);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, _)) = s2.recv_from(&mut buf).await {
                        if state2.generation.load(Ordering::SeqCst) != generation {
                            // The old address: gone with the network change.
                            return;
                        }
                        let p = Packet {
                            via: Arc::clone(&front2),
                            to: client,
                            data: buf[..n].to_vec(),
                        };
                        if down2.send(p).await.is_err() {
                            return;
                        }
                    }
                });
                s
            }
        };
        let p = Packet {
            via,
            to: server,
            data: buf[..n].to_vec(),
        };
        if up.send(p).await.is_err() {
            return;
        }
    }
}
