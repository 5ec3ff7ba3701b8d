//! The console API over gRPC (tonic), with server reflection. Tokens travel as
//! `authorization: Bearer <token>` metadata.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tianwang_proto::v1::console_server::{Console, ConsoleServer};
use tianwang_proto::v1::{
    DirectiveRequest, DirectiveUpdate, ListCourtsRequest, ListCourtsResponse,
    ListDirectivesRequest, ListDirectivesResponse, ListUnitsRequest, ListUnitsResponse,
    SessionEvent, SessionRequest,
};
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

    /// The caller's claims and the court they see; refusals are audited.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(crate::auth::Claims, String), Status> {
        let token = bearer(req).ok_or_else(|| {
            Status::unauthenticated("authorization: Bearer <token> metadata required")
        })?;
        let audit = &self.hub.evidence.audit;
        let claims = self.hub.authority.verify(&token).map_err(|e| {
            audit.record(
                "?",
                "login.refused",
                "console",
                serde_json::json!({ "via": "grpc", "reason": e.to_string() }),
            );
            Status::unauthenticated(e.to_string())
        })?;
        if !claims.role.can_watch_live() {
            let reason = format!("a {:?} token cannot use the console", claims.role);
            audit.record(
                &claims.sub,
                "login.refused",
                "console",
                serde_json::json!({ "via": "grpc", "reason": reason }),
            );
            return Err(Status::permission_denied(reason));
        }
        let scope = self.hub.scope_of(&claims).map_err(|reason| {
            audit.record(
                &claims.sub,
                "login.refused",
                "console",
                serde_json::json!({ "via": "grpc", "reason": reason }),
            );
            Status::permission_denied(reason)
        })?;
        Ok((claims, scope))
    }
}

#[tonic::async_trait]
impl Console for ConsoleService {
    async fn list_units(
        &self,
        req: Request<ListUnitsRequest>,
    ) -> Result<Response<ListUnitsResponse>, Status> {
        let (_, scope) = self.authorize(&req)?;
        let units = self.hub.cascade.visible_units(&self.hub.units, &scope);
        Ok(Response::new(ListUnitsResponse { units }))
    }

    async fn list_courts(
        &self,
        req: Request<ListCourtsRequest>,
    ) -> Result<Response<ListCourtsResponse>, Status> {
        let (_, scope) = self.authorize(&req)?;
        Ok(Response::new(ListCourtsResponse {
            courts: self.hub.cascade.courts_under(&scope),
        }))
    }

    async fn direct(
        &self,
        req: Request<DirectiveRequest>,
    ) -> Result<Response<DirectiveUpdate>, Status> {
        let (claims, scope) = self.authorize(&req)?;
        let req = req.into_inner();
        crate::directives::direct(&self.hub, &claims.sub, claims.role, &scope, &req)
            .await
            .map(Response::new)
            .map_err(|(code, reason)| match code {
                tianwang_proto::ErrorCode::Forbidden => Status::permission_denied(reason),
                tianwang_proto::ErrorCode::UnknownUnit => Status::not_found(reason),
                tianwang_proto::ErrorCode::Protocol => Status::invalid_argument(reason),
                _ => Status::internal(reason),
            })
    }

    async fn list_directives(
        &self,
        req: Request<ListDirectivesRequest>,
    ) -> Result<Response<ListDirectivesResponse>, Status> {
        let (_, scope) = self.authorize(&req)?;
        let req = req.into_inner();
        let limit = if req.limit == 0 { 100 } else { req.limit };
        let all = self
            .hub
            .directives
            .list(&req.unit_id, limit)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let cascade = &self.hub.cascade;
        let directives = all
            .into_iter()
            .filter(|d| {
                cascade
                    .unit_court(&self.hub.units, &d.unit_id)
                    .is_some_and(|c| cascade.covers(&scope, &c))
            })
            .collect();
        Ok(Response::new(ListDirectivesResponse { directives }))
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
