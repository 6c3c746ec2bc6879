//! consignment-service: stores a consignment once `vessel-service`, found by name through
//! the registry, offers a vessel that can carry it.
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use consignment_service::{ConsignmentRepository, MemoryRepository};
//! let repository = MemoryRepository::default();
//! assert!(repository.list().await.unwrap().is_empty());
//! # }
//! ```

use std::{sync::Arc, time::Duration};

use micro_core::NamedChannel;
use proto::{
    consignment::{Consignment, GetRequest, Response, shipping_service_server::ShippingService},
    vessel::{Specification, vessel_service_client::VesselServiceClient},
};
use tonic::{Code, Request, Status};

/// Default time the vessel look-up may take, in milliseconds.
pub const DEFAULT_VESSEL_TIMEOUT_MS: u64 = 5000;

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// The storage backend failed.
    #[error("storage: {0}")]
    Storage(String),
}

/// Where consignments are kept.
#[tonic::async_trait]
pub trait ConsignmentRepository: Send + Sync + 'static {
    /// Stores `consignment` whole and returns it as stored.
    async fn create(&self, consignment: Consignment) -> Result<Consignment, RepositoryError>;
    /// Every stored consignment, oldest first.
    async fn list(&self) -> Result<Vec<Consignment>, RepositoryError>;
}

/// Consignments in this process's memory; lost on restart.
#[derive(Debug, Default)]
pub struct MemoryRepository {
    consignments: tokio::sync::RwLock<Vec<Consignment>>,
}

#[tonic::async_trait]
impl ConsignmentRepository for MemoryRepository {
    async fn create(&self, consignment: Consignment) -> Result<Consignment, RepositoryError> {
        self.consignments.write().await.push(consignment.clone());
        Ok(consignment)
    }

    async fn list(&self) -> Result<Vec<Consignment>, RepositoryError> {
        Ok(self.consignments.read().await.clone())
    }
}

/// The gRPC handler: validates, finds a vessel through `vessel-service`, then stores.
pub struct ShippingHandler {
    repository: Arc<dyn ConsignmentRepository>,
    vessels: VesselServiceClient<NamedChannel>,
    vessel_service: String,
    vessel_timeout: Duration,
}

impl ShippingHandler {
    /// Stores in `repository` and asks `vessels` (a channel to `vessel-service`); each
    /// vessel look-up may take up to `vessel_timeout`.
    pub fn new(
        repository: Arc<dyn ConsignmentRepository>,
        vessels: NamedChannel,
        vessel_timeout: Duration,
    ) -> Self {
        let vessel_service = vessels.name().to_owned();
        ShippingHandler {
            repository,
            vessels: VesselServiceClient::new(vessels),
            vessel_service,
            vessel_timeout,
        }
    }

    async fn find_vessel(&self, spec: Specification) -> Result<String, Status> {
        let service = &self.vessel_service;
        let mut request = Request::new(spec);
        request.set_timeout(self.vessel_timeout);
        let reply = tokio::time::timeout(self.vessel_timeout, self.vessels.clone().find_available(request))
            .await
            .map_err(|_| {
                Status::unavailable(format!("{service} did not answer within {:?}", self.vessel_timeout))
            })?;
        match reply {
            Ok(reply) => reply
                .into_inner()
                .vessel
                .map(|vessel| vessel.id)
                .ok_or_else(|| internal(format!("{service} answered OK without a vessel"))),
            Err(status) => Err(remap_vessel_status(service, status)),
        }
    }
}

/// Checks what a consignment must have before any vessel is asked for.
pub fn validate(consignment: &Consignment) -> Result<(), Status> {
    let mut problems = Vec::new();
    if consignment.weight <= 0 {
        problems.push(format!("weight: must be positive, got {}", consignment.weight));
    }
    if consignment.containers.is_empty() {
        problems.push("containers: at least one container is required".to_owned());
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(Status::invalid_argument(problems.join("; "))),
    }
}

/// Maps a status from `vessel-service` onto this service's meaning of it.
fn remap_vessel_status(service: &str, status: Status) -> Status {
    match status.code() {
        Code::FailedPrecondition | Code::NotFound => Status::failed_precondition(format!(
            "no vessel can carry this consignment; it was not stored ({service}: {})",
            status.message()
        )),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => {
            Status::unavailable(format!("{service} unavailable: {}", status.message()))
        }
        _ => internal(format!("{service} failed: {status}")),
    }
}

fn internal(detail: String) -> Status {
    tracing::error!(%detail, "internal error");
    Status::internal("internal error; see consignment-service's log")
}

fn new_consignment_id() -> String {
    format!("c-{:016x}", rand::random::<u64>())
}

#[tonic::async_trait]
impl ShippingService for ShippingHandler {
    async fn create_consignment(
        &self,
        request: Request<Consignment>,
    ) -> Result<tonic::Response<Response>, Status> {
        let mut consignment = request.into_inner();
        validate(&consignment)?;
        let capacity = i32::try_from(consignment.containers.len())
            .map_err(|_| Status::invalid_argument("containers: too many"))?;
        let spec = Specification { capacity, max_weight: consignment.weight };
        let vessel_id = self.find_vessel(spec).await?;
        if consignment.id.is_empty() {
            consignment.id = new_consignment_id();
        }
        consignment.vessel_id = vessel_id;
        let stored = self.repository.create(consignment).await.map_err(|err| internal(err.to_string()))?;
        tracing::info!(consignment = %stored.id, vessel = %stored.vessel_id, weight = stored.weight, containers = stored.containers.len(), "consignment stored");
        Ok(tonic::Response::new(Response { created: true, consignment: Some(stored), consignments: vec![] }))
    }

    async fn get_consignments(
        &self,
        _request: Request<GetRequest>,
    ) -> Result<tonic::Response<Response>, Status> {
        let consignments = self.repository.list().await.map_err(|err| internal(err.to_string()))?;
        Ok(tonic::Response::new(Response { created: false, consignment: None, consignments }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::consignment::Container;

    #[test]
    fn validation_names_each_bad_field() {
        let status = validate(&Consignment::default()).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("weight") && status.message().contains("containers"), "{status:?}");
        let ok = Consignment { weight: 1, containers: vec![Container::default()], ..Default::default() };
        assert!(validate(&ok).is_ok());
    }

    #[test]
    fn vessel_codes_are_remapped_for_this_hop() {
        let none_fits = remap_vessel_status("vessel-service", Status::failed_precondition("no fit"));
        assert_eq!(none_fits.code(), Code::FailedPrecondition);
        assert!(none_fits.message().contains("not stored"));
        let down = remap_vessel_status("vessel-service", Status::unavailable("no instance"));
        assert_eq!(down.code(), Code::Unavailable);
        assert_eq!(
            remap_vessel_status("vessel-service", Status::invalid_argument("bug")).code(),
            Code::Internal
        );
    }
}
