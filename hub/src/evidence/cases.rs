//! Cases and operations, and the listing of recordings: the rules (what is refused and why)
//! in one place, served over gRPC (`Evidence` service) and, read-only, over HTTP for the
//! browser console.

use std::collections::BTreeMap;
use std::sync::Arc;

use tianwang_proto::v1::evidence_server::{Evidence as EvidenceApi, EvidenceServer};
use tianwang_proto::v1::{
    Case, CloseCaseRequest, CloseOperationRequest, CreateCaseRequest, CreateOperationRequest,
    FetchSegmentRequest, GetCaseRequest, ListCasesRequest, ListCasesResponse,
    ListRecordingsRequest, ListRecordingsResponse, Operation, RecordedGap, RecordedSegment,
    Recording, SegmentData,
};
use tonic::{Request, Response, Status};

use super::Evidence;
use super::audit::unix_us;
use super::index::{CaseRow, IndexError, OperationRow, SegmentRow};
use crate::auth::Claims;
use crate::session::HubContext;

/// Why a request about cases was refused.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl From<CaseError> for Status {
    fn from(e: CaseError) -> Self {
        match e {
            CaseError::Invalid(m) => Status::invalid_argument(m),
            CaseError::NotFound(m) => Status::not_found(m),
            CaseError::Exists(m) => Status::already_exists(m),
            CaseError::Refused(m) => Status::failed_precondition(m),
            CaseError::Index(IndexError::Conflict(m)) => Status::already_exists(m),
            CaseError::Index(e) => {
                tracing::error!(error = %e, "evidence index");
                Status::internal("the evidence index is unavailable")
            }
        }
    }
}

const MAX_TEXT: usize = 200;

fn text(field: &str, value: &str, required: bool) -> Result<String, CaseError> {
    let v = value.trim();
    if required && v.is_empty() {
        return Err(CaseError::Invalid(format!("{field} is required")));
    }
    if v.chars().count() > MAX_TEXT {
        return Err(CaseError::Invalid(format!(
            "{field} is longer than {MAX_TEXT} characters"
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(CaseError::Invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(v.to_string())
}

impl Evidence {
    pub async fn create_case(
        &self,
        actor: &str,
        default_court: &str,
        req: CreateCaseRequest,
    ) -> Result<Case, CaseError> {
        let number = text("number", &req.number, true)?;
        let court = match text("court", &req.court, false)? {
            c if c.is_empty() => default_court.to_string(),
            c => c,
        };
        let parties = req
            .parties
            .iter()
            .map(|p| text("party", p, true))
            .collect::<Result<Vec<_>, _>>()?;
        if self.index.case(&number).await?.is_some() {
            return Err(CaseError::Exists(format!("case {number} exists already")));
        }
        let row = CaseRow {
            number: number.clone(),
            court,
            parties: serde_json::to_string(&parties).unwrap_or_else(|_| "[]".into()),
            state: "open".into(),
            created_us: unix_us(),
            closed_us: None,
        };
        self.index.create_case(&row).await?;
        self.audit.record(
            actor,
            "case.create",
            &number,
            serde_json::json!({ "court": row.court, "parties": parties }),
        );
        self.get_case(&number).await
    }

    pub async fn get_case(&self, number: &str) -> Result<Case, CaseError> {
        let row = self
            .index
            .case(number)
            .await?
            .ok_or_else(|| CaseError::NotFound(format!("no case {number}")))?;
        let mut operations = Vec::new();
        for op in self.index.operations(number).await? {
            let units = self.index.operation_units(&op.id).await?;
            operations.push(operation_message(&op, units));
        }
        Ok(Case {
            number: row.number,
            court: row.court,
            parties: serde_json::from_str(&row.parties).unwrap_or_default(),
            state: row.state,
            created_us: row.created_us.max(0) as u64,
            closed_us: row.closed_us.unwrap_or(0).max(0) as u64,
            operations,
        })
    }

    pub async fn list_cases(&self) -> Result<Vec<Case>, CaseError> {
        let mut out = Vec::new();
        for c in self.index.cases().await? {
            out.push(self.get_case(&c.number).await?);
        }
        Ok(out)
    }

    pub async fn close_case(&self, actor: &str, number: &str) -> Result<Case, CaseError> {
        let case = self.get_case(number).await?;
        if case.state == "closed" {
            return Err(CaseError::Refused(format!(
                "case {number} is closed already"
            )));
        }
        if let Some(op) = case.operations.iter().find(|o| o.state != "closed") {
            return Err(CaseError::Refused(format!(
                "case {number} has an active operation ({}): close it first",
                op.id
            )));
        }
        self.index.close_case(number, unix_us()).await?;
        self.audit
            .record(actor, "case.close", number, serde_json::json!({}));
        self.get_case(number).await
    }

    pub async fn create_operation(
        &self,
        actor: &str,
        req: CreateOperationRequest,
    ) -> Result<Operation, CaseError> {
        let case_number = text("case_number", &req.case_number, true)?;
        let case = self
            .index
            .case(&case_number)
            .await?
            .ok_or_else(|| CaseError::NotFound(format!("no case {case_number}")))?;
        if case.state != "open" {
            return Err(CaseError::Refused(format!(
                "case {case_number} is closed: it takes no new operations"
            )));
        }
        let id = match text("id", &req.id, false)? {
            id if id.is_empty() => format!("op-{:08x}", rand::random::<u32>()),
            id => id,
        };
        let name = text("name", &req.name, false)?;
        let (starts, ends) = (req.starts_us as i64, req.ends_us as i64);
        if req.starts_us > i64::MAX as u64 || req.ends_us > i64::MAX as u64 || starts >= ends {
            return Err(CaseError::Invalid(
                "the planned window must have starts_us < ends_us".into(),
            ));
        }
        let place_ok = (-90.0..=90.0).contains(&req.latitude)
            && (-180.0..=180.0).contains(&req.longitude)
            && req.radius_m > 0.0
            && req.radius_m <= 100_000.0;
        if !place_ok {
            return Err(CaseError::Invalid(
                "the place needs a latitude in -90..=90, a longitude in -180..=180 and a radius in (0, 100 km]"
                    .into(),
            ));
        }
        let mut units = req
            .units
            .iter()
            .map(|u| text("unit", u, true))
            .collect::<Result<Vec<_>, _>>()?;
        units.sort();
        units.dedup();
        if units.is_empty() {
            return Err(CaseError::Invalid(
                "an operation needs at least one unit".into(),
            ));
        }
        if self.index.operation(&id).await?.is_some() {
            return Err(CaseError::Exists(format!("operation {id} exists already")));
        }
        // A unit's recordings bind to one case at a time.
        for unit in &units {
            if let Some(other) = self
                .index
                .overlapping_operations(unit, starts, ends)
                .await?
                .first()
            {
                return Err(CaseError::Exists(format!(
                    "unit {unit} is already assigned to operation {other} in that window"
                )));
            }
        }
        let row = OperationRow {
            id: id.clone(),
            case_number: case_number.clone(),
            name,
            starts_us: starts,
            ends_us: ends,
            latitude: req.latitude,
            longitude: req.longitude,
            radius_m: req.radius_m,
            state: "planned".into(),
            created_us: unix_us(),
            closed_us: None,
        };
        self.index.create_operation(&row, &units).await?;
        self.operations_changed.notify_one();
        self.operations_version.send_modify(|v| *v += 1);
        self.audit.record(
            actor,
            "operation.create",
            &case_number,
            serde_json::json!({ "case": case_number, "operation": id, "units": units,
                "starts_us": starts, "ends_us": ends }),
        );
        Ok(operation_message(&row, units))
    }

    pub async fn close_operation(&self, actor: &str, id: &str) -> Result<Operation, CaseError> {
        let op = self
            .index
            .operation(id)
            .await?
            .ok_or_else(|| CaseError::NotFound(format!("no operation {id}")))?;
        if op.state == "closed" {
            return Err(CaseError::Refused(format!(
                "operation {id} is closed already"
            )));
        }
        let now = unix_us();
        self.index.close_operation(id, now).await?;
        self.operations_changed.notify_one();
        self.operations_version.send_modify(|v| *v += 1);
        self.audit.record(
            actor,
            "operation.close",
            &op.case_number,
            serde_json::json!({ "case": op.case_number, "operation": id }),
        );
        let units = self.index.operation_units(id).await?;
        let op = self.index.operation(id).await?.unwrap_or(op);
        Ok(operation_message(&op, units))
    }

    /// A case's or a unit's recordings, grouped by recording, with file URLs.
    pub async fn list_recordings(
        &self,
        req: &ListRecordingsRequest,
    ) -> Result<ListRecordingsResponse, CaseError> {
        let from = req.from_us.min(i64::MAX as u64) as i64;
        let to = if req.to_us == 0 {
            i64::MAX
        } else {
            req.to_us.min(i64::MAX as u64) as i64
        };
        let rows: Vec<SegmentRow> = match (req.case_number.as_str(), req.unit.as_str()) {
            ("", "") => {
                return Err(CaseError::Invalid("give a case_number or a unit".into()));
            }
            (case, unit) if !case.is_empty() => {
                if self.index.case(case).await?.is_none() {
                    return Err(CaseError::NotFound(format!("no case {case}")));
                }
                self.index
                    .segments_of_case(case)
                    .await?
                    .into_iter()
                    .filter(|r| unit.is_empty() || r.unit == unit)
                    .filter(|r| r.start_us < to && r.end_us > from)
                    .collect()
            }
            (_, unit) => self.index.segments_between(unit, from, to).await?,
        };
        let mut recordings: BTreeMap<(String, String), Recording> = BTreeMap::new();
        let mut gaps = Vec::new();
        for row in rows {
            if row.deleted_us.is_some() {
                continue;
            }
            match row.kind.as_str() {
                "gap" => gaps.push(RecordedGap {
                    unit: row.unit.clone(),
                    start_us: row.start_us.max(0) as u64,
                    end_us: row.end_us.max(0) as u64,
                }),
                "media" => {
                    let key = (row.unit.clone(), row.recording.clone());
                    if !recordings.contains_key(&key) {
                        let Some(init) = self.index.init_of(&row.unit, &row.recording).await?
                        else {
                            continue;
                        };
                        recordings.insert(
                            key.clone(),
                            Recording {
                                unit: row.unit.clone(),
                                recording: row.recording.clone(),
                                codecs: init.codecs.clone(),
                                init_url: file_url(&init.path),
                                segments: Vec::new(),
                                officer: init.officer.clone().unwrap_or_default(),
                            },
                        );
                    }
                    if let Some(r) = recordings.get_mut(&key) {
                        r.segments.push(RecordedSegment {
                            seq: row.seq as u64,
                            number: row.number as u32,
                            start_us: row.start_us.max(0) as u64,
                            end_us: row.end_us.max(0) as u64,
                            media_start: row.media_start.max(0) as u64,
                            media_duration: row.media_duration.max(0) as u64,
                            bytes: row.bytes.max(0) as u64,
                            sha256: row.sha256.clone(),
                            url: file_url(&row.path),
                            case_number: row.case_number.clone().unwrap_or_default(),
                            operation_id: row.operation_id.clone().unwrap_or_default(),
                        });
                    }
                }
                _ => {}
            }
        }
        let mut recordings: Vec<Recording> = recordings.into_values().collect();
        recordings.sort_by_key(|r| {
            (
                r.unit.clone(),
                r.segments.first().map(|s| s.start_us).unwrap_or(0),
            )
        });
        Ok(ListRecordingsResponse { recordings, gaps })
    }
}

/// Where the hub serves a recorded file.
pub fn file_url(path: &str) -> String {
    format!("/recordings/{path}")
}

fn operation_message(op: &OperationRow, units: Vec<String>) -> Operation {
    Operation {
        id: op.id.clone(),
        case_number: op.case_number.clone(),
        name: op.name.clone(),
        starts_us: op.starts_us.max(0) as u64,
        ends_us: op.ends_us.max(0) as u64,
        latitude: op.latitude,
        longitude: op.longitude,
        radius_m: op.radius_m,
        units,
        state: op.state.clone(),
    }
}

/// The `Evidence` gRPC service.
pub struct EvidenceService {
    hub: Arc<HubContext>,
}

impl EvidenceService {
    pub fn server(hub: Arc<HubContext>) -> EvidenceServer<Self> {
        EvidenceServer::new(Self { hub })
    }

    fn authorize<T>(&self, req: &Request<T>, manage: bool) -> Result<Claims, Status> {
        let token = crate::console::grpc::bearer(req).ok_or_else(|| {
            Status::unauthenticated("authorization: Bearer <token> metadata required")
        })?;
        let claims = self
            .hub
            .authority
            .verify(&token)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let allowed = if manage {
            claims.role.can_manage_cases()
        } else {
            claims.role.can_see_recordings()
        };
        if !allowed {
            self.hub.evidence.audit.record(
                &claims.sub,
                "denied",
                "evidence",
                serde_json::json!({ "role": claims.role, "manage": manage }),
            );
            return Err(Status::permission_denied(format!(
                "a {:?} token cannot {}",
                claims.role,
                if manage {
                    "open or close cases and operations"
                } else {
                    "see recordings"
                }
            )));
        }
        if let Err(reason) = self.hub.check_own_court(&claims) {
            self.hub.evidence.audit.record(
                &claims.sub,
                "denied",
                "evidence",
                serde_json::json!({ "reason": reason }),
            );
            return Err(Status::permission_denied(reason));
        }
        Ok(claims)
    }
}

#[tonic::async_trait]
impl EvidenceApi for EvidenceService {
    async fn create_case(&self, req: Request<CreateCaseRequest>) -> Result<Response<Case>, Status> {
        let who = self.authorize(&req, true)?;
        let court = self.hub.config.court.code.clone();
        Ok(Response::new(
            self.hub
                .evidence
                .create_case(&who.sub, &court, req.into_inner())
                .await?,
        ))
    }

    async fn list_cases(
        &self,
        req: Request<ListCasesRequest>,
    ) -> Result<Response<ListCasesResponse>, Status> {
        self.authorize(&req, false)?;
        Ok(Response::new(ListCasesResponse {
            cases: self.hub.evidence.list_cases().await?,
        }))
    }

    async fn get_case(&self, req: Request<GetCaseRequest>) -> Result<Response<Case>, Status> {
        self.authorize(&req, false)?;
        Ok(Response::new(
            self.hub.evidence.get_case(&req.get_ref().number).await?,
        ))
    }

    async fn close_case(&self, req: Request<CloseCaseRequest>) -> Result<Response<Case>, Status> {
        let who = self.authorize(&req, true)?;
        Ok(Response::new(
            self.hub
                .evidence
                .close_case(&who.sub, &req.get_ref().number)
                .await?,
        ))
    }

    async fn create_operation(
        &self,
        req: Request<CreateOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let who = self.authorize(&req, true)?;
        Ok(Response::new(
            self.hub
                .evidence
                .create_operation(&who.sub, req.into_inner())
                .await?,
        ))
    }

    async fn close_operation(
        &self,
        req: Request<CloseOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let who = self.authorize(&req, true)?;
        Ok(Response::new(
            self.hub
                .evidence
                .close_operation(&who.sub, &req.get_ref().id)
                .await?,
        ))
    }

    async fn list_recordings(
        &self,
        req: Request<ListRecordingsRequest>,
    ) -> Result<Response<ListRecordingsResponse>, Status> {
        self.authorize(&req, false)?;
        Ok(Response::new(
            self.hub.evidence.list_recordings(req.get_ref()).await?,
        ))
    }

    async fn fetch_segment(
        &self,
        req: Request<FetchSegmentRequest>,
    ) -> Result<Response<SegmentData>, Status> {
        let who = self.authorize(&req, false)?;
        let (row, data) = self
            .hub
            .evidence
            .read_recorded(&req.get_ref().url)
            .await
            .map_err(|e| match e {
                super::FileError::Unknown => Status::not_found(e.to_string()),
                super::FileError::Deleted => Status::not_found(e.to_string()),
                super::FileError::Damaged => Status::data_loss(e.to_string()),
                other => Status::internal(other.to_string()),
            })?;
        self.hub.evidence.audit_playback(&who.sub, &row, "grpc");
        Ok(Response::new(SegmentData {
            data: data.into(),
            sha256: row.sha256,
        }))
    }
}
