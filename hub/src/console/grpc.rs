//! The console API over gRPC (tonic), with server reflection. Tokens travel as
//! `authorization: Bearer <token>` metadata.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tianwang_proto::v1::console_server::{Console, ConsoleServer};
use tianwang_proto::v1::{ListUnitsRequest, ListUnitsResponse, SessionEvent, SessionRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{ConsoleIo, EVENT_QUEUE, Incoming, MAX_MESSAGE};
use crate::session::HubContext;

pub struct ConsoleService {
    hub: Arc<HubContext>,
}

/// The token of a request's `authorization: Bearer` metadata.
pub(crate) fn bearer<T>(req: &Request<T>) -> Option<String> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

impl ConsoleService {
    pub fn new(hub: Arc<HubContext>) -> Self {
        Self { hub }
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<crate::auth::Claims, Status> {
        let token = bearer(req).ok_or_else(|| {
            Status::unauthenticated("authorization: Bearer <token> metadata required")
        })?;
        let claims = self
            .hub
            .authority
            .verify(&token)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        if !claims.role.can_watch_live() {
            return Err(Status::permission_denied(format!(
                "a {:?} token cannot use the console",
                claims.role
            )));
        }
        Ok(claims)
    }
}

#[tonic::async_trait]
impl Console for ConsoleService {
    async fn list_units(
        &self,
        req: Request<ListUnitsRequest>,
    ) -> Result<Response<ListUnitsResponse>, Status> {
        self.authorize(&req)?;
        let mut units: Vec<_> = self.hub.units.list().iter().map(|b| b.summary()).collect();
        units.sort_by(|a, b| a.unit_id.cmp(&b.unit_id));
        Ok(Response::new(ListUnitsResponse { units }))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = Result<SessionEvent, Status>> + Send>>;

    async fn session(
        &self,
        req: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // A token in metadata authenticates at once; without one the first message must.
        let token = bearer(&req);
        let mut inbound = req.into_inner();
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let item = match msg {
                    Ok(r) => Incoming::Request(r),
                    Err(status) => {
                        // A message that does not decode ends the gRPC stream: say why.
                        let _ = in_tx
                            .send(Incoming::Undecodable(status.message().to_string()))
                            .await;
                        break;
                    }
                };
                if in_tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        let hub = Arc::clone(&self.hub);
        tokio::spawn(super::driver::run(
            hub,
            ConsoleIo {
                incoming: in_rx,
                outgoing: out_tx,
            },
            token,
            "grpc",
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx).map(Ok))))
    }
}

/// The gRPC routes: the console and evidence services (message sizes bounded) and
/// reflection.
pub fn routes(hub: Arc<HubContext>) -> Result<axum::Router, tonic_reflection::server::Error> {
    // Both reflection versions: grpcurl speaks v1, many client libraries still v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tianwang_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tianwang_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let evidence = crate::evidence::cases::EvidenceService::server(Arc::clone(&hub))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(256 * MAX_MESSAGE);
    let console = ConsoleServer::new(ConsoleService::new(hub))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(4 * MAX_MESSAGE);
    Ok(tonic::service::Routes::new(console)
        .add_service(evidence)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .into_axum_router())
}
