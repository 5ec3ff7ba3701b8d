//! A field unit in-process: a QUIC publisher sending synthetic frames, that counts the
//! keyframe requests the hub sends it and sends the telemetry a test gives it. For tests
//! that need to see or script the device's side.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tianwang_proto::v1::{
    Announce, FrameHeader, GroupHeader, Hello, Role, Telemetry, TrackInfo, TrackKind,
};
use tianwang_proto::wire;
use tianwang_proto::{ControlMessage, Kind};
use tianwang_transport::{Limits, Trust, client, control};

pub struct FakeUnit {
    pub keyframe_requests: Arc<AtomicU64>,
    /// While set, no frames go out (the connection and telemetry stay).
    paused: Arc<std::sync::atomic::AtomicBool>,
    telemetry: tokio::sync::mpsc::UnboundedSender<Telemetry>,
    task: tokio::task::JoinHandle<()>,
    _endpoint: quinn::Endpoint,
}

impl Drop for FakeUnit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUnit {
    /// Connects as `unit` and sends 30 frames a second, a group every 60 (a 2 s GOP).
    pub async fn start(
        hub: SocketAddr,
        trust: &Trust,
        unit: &str,
        token: &str,
    ) -> anyhow::Result<Self> {
        let endpoint = tianwang_transport::client_endpoint(trust, &Limits::default(), false)?;
        let conn = tianwang_transport::connect(&endpoint, &hub.to_string()).await?;
        let hello = Hello {
            role: Role::Publisher as i32,
            unit_id: unit.to_string(),
            token: token.to_string(),
            ..Default::default()
        };
        let (mut ctl, _) = client::hello(&conn, hello, Duration::from_secs(10)).await?;
        ctl.send(ControlMessage::new(Kind::Announce(Announce {
            tracks: vec![TrackInfo {
                id: 0,
                name: "video".into(),
                kind: TrackKind::Video as i32,
                codec: "h264".into(),
                ..Default::default()
            }],
        })))
        .await?;
        let keyframe_requests = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&keyframe_requests);
        let (telemetry, mut points) = tokio::sync::mpsc::unbounded_channel::<Telemetry>();
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hold = Arc::clone(&paused);
        let task = tokio::spawn(async move {
            let (mut tx, mut rx) = ctl.split();
            let telemetry_out = async {
                use futures::SinkExt;
                while let Some(t) = points.recv().await {
                    if tx
                        .send(ControlMessage::new(Kind::Telemetry(t)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                std::future::pending::<()>().await
            };
            let reader = async {
                while let Ok(msg) = control::recv(&mut rx).await {
                    if let Some(Kind::KeyframeRequest(_)) = msg.kind {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            };
            let sender = async {
                let mut tick = tokio::time::interval(Duration::from_millis(33));
                let mut stream: Option<quinn::SendStream> = None;
                for n in 0u64.. {
                    tick.tick().await;
                    if hold.load(Ordering::Relaxed) {
                        continue;
                    }
                    if n.is_multiple_of(60) {
                        if let Some(mut s) = stream.take() {
                            let _ = s.finish();
                        }
                        let Ok(mut s) = conn.open_uni().await else {
                            return;
                        };
                        let mut h = BytesMut::new();
                        wire::encode_delimited(
                            &GroupHeader {
                                track_id: 0,
                                sequence: n / 60 + 1,
                                backfill: false,
                            },
                            &mut h,
                        );
                        if s.write_all(&h).await.is_err() {
                            return;
                        }
                        stream = Some(s);
                    }
                    let mut f = BytesMut::new();
                    let nal = if n.is_multiple_of(60) { 0x65 } else { 0x41 };
                    let payload = [0, 0, 0, 1, nal, 0x88, 0x84, (n & 0xff) as u8];
                    wire::encode_frame(
                        &FrameHeader {
                            timestamp_us: crate::unix_now_us(),
                            duration_us: 33_333,
                        },
                        &payload,
                        &mut f,
                    );
                    if let Some(s) = stream.as_mut()
                        && s.write_all(&f).await.is_err()
                    {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = reader => {}
                _ = sender => {}
                _ = telemetry_out => {}
            }
        });
        Ok(Self {
            keyframe_requests,
            paused,
            telemetry,
            task,
            _endpoint: endpoint,
        })
    }

    /// Sends a telemetry message on the control stream.
    pub fn telemetry(&self, t: Telemetry) {
        let _ = self.telemetry.send(t);
    }

    /// Stops (or resumes) the media, as a camera that froze while its link stays up.
    pub fn pause_media(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub fn keyframe_requests(&self) -> u64 {
        self.keyframe_requests.load(Ordering::Relaxed)
    }
}
