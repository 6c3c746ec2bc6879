//! consignment-service: stores a consignment once `vessel-service`, found by name through
//! the registry, offers a vessel that can carry it; durably (SQLite, see [`repository`])
//! and at most once per idempotency key.
//!
//! A `CreateConsignment` call may carry an [`IDEMPOTENCY_KEY_HEADER`] metadata entry. The
//! first call with a key stores the consignment; any later call with the same key and the
//! same consignment returns the first result (with [`IDEMPOTENT_REPLAYED_HEADER`] set) and
//! stores nothing; the same key with a different consignment is `ALREADY_EXISTS`. With a
//! key, a client may therefore retry `CreateConsignment` safely.
//!
//! # Examples
//! ```
//! use consignment_service::validate;
//! use proto::consignment::{Consignment, Container};
//!
//! let container = Container { customer_id: "cust001".into(), origin: "Derby".into(), ..Default::default() };
//! let ok = Consignment { weight: 100, containers: vec![container], ..Default::default() };
//! assert!(validate(&ok).is_ok());
//! let status = validate(&Consignment::default()).unwrap_err();
//! assert_eq!(status.code(), tonic::Code::InvalidArgument);
//! ```

pub mod outbox;
pub mod repository;
pub mod watch;

use std::{sync::Arc, time::Duration};

use micro_core::NamedChannel;
use proto::{
    consignment::{
        Consignment, CreateSummary, GetRequest, Rejection, Response, SettleRequest, Settlement, WatchRequest,
        shipping_service_server::{ShippingService, ShippingServiceServer},
    },
    vessel::{
        Reservation, ReservationRef, ReserveRequest, Specification,
        vessel_service_client::VesselServiceClient,
    },
};
use tonic::{Code, Request, Status, body::Body, metadata::MetadataMap};

pub use self::repository::{
    CONSIGNMENT_CREATED, ConsignmentRepository, Created, IN_MEMORY, OutboxEvent, PostgresRepository,
    RepositoryError, Settled, SqliteRepository,
};

/// The stream [`ShippingHandler`] answers `WatchConsignments` with.
pub type ConsignmentStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Consignment, Status>> + Send + 'static>>;

/// Default time the vessel look-up may take, in milliseconds.
pub const DEFAULT_VESSEL_TIMEOUT_MS: u64 = 5000;
/// Default database file, relative to the working directory.
pub const DEFAULT_DB: &str = "consignments.db";
/// The request metadata entry (lower-case ASCII) that makes `CreateConsignment` idempotent.
/// The SDK client retries a call that carries it.
pub const IDEMPOTENCY_KEY_HEADER: &str = micro_core::client::IDEMPOTENCY_KEY_HEADER;
/// The response metadata entry, value `true`, set when a create was answered from an
/// earlier call with the same idempotency key and nothing new was stored.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";
/// The longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// The longest description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 1024;
/// The most containers one consignment may have.
pub const MAX_CONTAINERS: usize = 10_000;
/// The largest request message, in bytes; beyond it a call fails `RESOURCE_EXHAUSTED`.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// The most consignments one `CreateConsignments` stream may carry.
pub const MAX_BULK_CONSIGNMENTS: usize = 10_000;
/// At most this many rejections are listed in a `CreateSummary`.
pub const MAX_LISTED_REJECTIONS: usize = 100;
/// The bytes a bulk load's per-consignment key adds to the stream's key: `/` and the index.
const MAX_BULK_INDEX_BYTES: usize = 6;
/// At most this many container problems are listed in one error message.
const MAX_LISTED_CONTAINER_PROBLEMS: usize = 10;

/// The name this service registers under unless `MICRO_SERVER_NAME` says otherwise, and the
/// holder its reservations name unless [`ShippingHandler::holder`] says otherwise.
pub const SERVICE_NAME: &str = "consignment-service";

/// A test-only fault point: where [`ShippingHandler`] stops to let a test kill the process
/// at a chosen moment of a creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultPoint {
    /// After the vessel reservation, before the consignment is stored: the creation logs
    /// `fault point reached` and waits for ever.
    PauseAfterReserve,
}

/// The gRPC handler: validates, reserves room on a vessel through `vessel-service`, stores
/// the consignment (with its outbox event) under that reservation, and answers for the
/// reservations it made when vessel-service asks (`SettleReservation`).
/// `docs/reservations.md` has the protocol and why it is safe at each crash point.
pub struct ShippingHandler {
    repository: Arc<dyn ConsignmentRepository>,
    vessels: VesselServiceClient<NamedChannel>,
    vessel_service: String,
    vessel_timeout: Duration,
    holder: String,
    stored: Option<Arc<tokio::sync::Notify>>,
    fault: Option<FaultPoint>,
    feed: watch::Feed,
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
            feed: watch::Feed::new(repository.clone()),
            repository,
            vessels: VesselServiceClient::new(vessels),
            vessel_service,
            vessel_timeout,
            holder: SERVICE_NAME.to_owned(),
            stored: None,
            fault: None,
        }
    }

    /// The name this service is registered under, which its reservations name as their
    /// holder so vessel-service can settle them with it. Default: [`SERVICE_NAME`].
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = holder.into();
        self
    }

    /// Stops every creation at `fault` (tests only). Default: none.
    pub fn fault_point(mut self, fault: Option<FaultPoint>) -> Self {
        self.fault = fault;
        self
    }

    /// Notifies `stored` after each new consignment (the outbox relay's waker, so its event
    /// goes out at once). Default: nobody.
    pub fn notify_stored(mut self, stored: Arc<tokio::sync::Notify>) -> Self {
        self.stored = Some(stored);
        self
    }

    /// The gRPC service, refusing requests over [`MAX_REQUEST_BYTES`]. Add it with
    /// [`micro_core::Server::add_service`], together with [`request_size_layer`].
    pub fn into_service(self) -> ShippingServiceServer<ShippingHandler> {
        ShippingServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Holds room for `spec` on a vessel, under `key` when the creation has one (so retried
    /// and hedged attempts share one hold).
    async fn reserve(
        &self,
        spec: Specification,
        consignment_id: &str,
        key: Option<&str>,
    ) -> Result<Reservation, Status> {
        let service = &self.vessel_service;
        let mut request = Request::new(ReserveRequest {
            specification: Some(spec),
            holder: self.holder.clone(),
            request_key: key.unwrap_or_default().to_owned(),
            consignment_id: consignment_id.to_owned(),
        });
        request.set_timeout(self.vessel_timeout);
        let reply =
            tokio::time::timeout(self.vessel_timeout, self.vessels.clone().reserve(request)).await.map_err(
                |_| Status::unavailable(format!("{service} did not answer within {:?}", self.vessel_timeout)),
            )?;
        match reply {
            Ok(reply) => {
                let reservation = reply.into_inner();
                match reservation.vessel.is_some() && !reservation.id.is_empty() {
                    true => Ok(reservation),
                    false => Err(internal(format!("{service} answered Reserve OK without a reservation"))),
                }
            }
            Err(status) => Err(remap_vessel_status(service, status)),
        }
    }

    /// Gives up `reservation_id`: settles it as abandoned here first (so nothing is stored
    /// under it later), then releases its room at vessel-service. A failure of either is
    /// left to vessel-service's reaper, which settles the hold once it expires.
    async fn abandon(&self, reservation_id: &str) {
        match self.repository.settle(reservation_id).await {
            Ok(Settled::Abandoned) => {}
            Ok(Settled::Stored(_)) => return,
            Err(err) => {
                tracing::warn!(reservation = %reservation_id, error = %micro_core::error::error_chain(&err), "reservation not abandoned; vessel-service settles it when it expires");
                return;
            }
        }
        let mut request = Request::new(ReservationRef { reservation_id: reservation_id.to_owned() });
        request.set_timeout(self.vessel_timeout);
        if let Err(status) = self.vessels.clone().release(request).await {
            tracing::warn!(reservation = %reservation_id, service = %self.vessel_service, error = %status.message(), "reservation not released; vessel-service releases it when it expires");
        }
    }

    /// Creates one consignment under `key` (when given): the stored consignment, and whether
    /// it was stored by an earlier call with the same key.
    async fn create(&self, requested: Consignment, key: Option<&str>) -> Result<(Consignment, bool), Status> {
        let key = key.map(str::to_owned);
        validate(&requested)?;
        // A call seen before is answered from the store, without asking for a vessel again.
        if let Some(key) = &key
            && let Some(stored) = self.repository.find_by_key(key).await.map_err(storage_status)?
        {
            return replay(key, stored, &requested).map(|stored| (stored, true));
        }
        let capacity = i32::try_from(requested.containers.len())
            .map_err(|_| Status::invalid_argument("containers: too many"))?;
        let spec = Specification { capacity, max_weight: requested.weight };
        let mut consignment = requested.clone();
        if consignment.id.is_empty() {
            consignment.id = new_consignment_id();
        }
        let reservation = self.reserve(spec, &consignment.id, key.as_deref()).await?;
        if requested.id.is_empty() && !reservation.consignment_id.is_empty() {
            // An earlier attempt with the same key made the hold: store under its id.
            consignment.id = reservation.consignment_id.clone();
        }
        consignment.vessel_id =
            reservation.vessel.as_ref().map(|vessel| vessel.id.clone()).unwrap_or_default();
        consignment.reservation_id = reservation.id.clone();
        if self.fault == Some(FaultPoint::PauseAfterReserve) {
            tracing::warn!(reservation = %reservation.id, consignment = %consignment.id, "fault point reached: pausing after the reservation");
            std::future::pending::<()>().await;
        }
        let created = match self.repository.create(consignment, key.as_deref()).await {
            Ok(created) => created,
            Err(RepositoryError::ReservationAbandoned(id)) => {
                return Err(Status::unavailable(format!(
                    "the room {} held for this consignment lapsed before it was stored (reservation {id}); \
                     nothing was stored: try again",
                    self.vessel_service
                )));
            }
            Err(err) => {
                self.abandon(&reservation.id).await;
                return Err(storage_status(err));
            }
        };
        if created.replayed {
            // A concurrent call with the same key stored first; a hold of our own goes back.
            if created.consignment.reservation_id != reservation.id {
                self.abandon(&reservation.id).await;
            }
            return replay(key.as_deref().unwrap_or_default(), created.consignment, &requested)
                .map(|stored| (stored, true));
        }
        let stored = created.consignment;
        if let Some(notify) = &self.stored {
            notify.notify_one();
        }
        self.feed.stored();
        tracing::info!(consignment = %stored.id, vessel = %stored.vessel_id, reservation = %stored.reservation_id, weight = stored.weight, containers = stored.containers.len(), key = key.as_deref().unwrap_or(""), "consignment stored");
        Ok((stored, false))
    }
}

/// Checks what a consignment must have before any vessel is asked for; the message names
/// every bad field (at most ten containers, then how many more).
pub fn validate(consignment: &Consignment) -> Result<(), Status> {
    let mut problems = Vec::new();
    if consignment.weight <= 0 {
        problems.push(format!("weight: must be positive, got {}", consignment.weight));
    }
    let description = consignment.description.len();
    if description > MAX_DESCRIPTION_BYTES {
        problems.push(format!("description: at most {MAX_DESCRIPTION_BYTES} bytes, got {description}"));
    }
    let containers = &consignment.containers;
    if containers.is_empty() {
        problems.push("containers: at least one container is required".to_owned());
    } else if containers.len() > MAX_CONTAINERS {
        problems.push(format!("containers: at most {MAX_CONTAINERS}, got {}", containers.len()));
    } else {
        let mut container_problems = containers.iter().enumerate().flat_map(|(i, container)| {
            let customer =
                container.customer_id.is_empty().then(|| format!("containers[{i}].customer_id: required"));
            let origin = container.origin.is_empty().then(|| format!("containers[{i}].origin: required"));
            customer.into_iter().chain(origin)
        });
        problems.extend(container_problems.by_ref().take(MAX_LISTED_CONTAINER_PROBLEMS));
        let more = container_problems.count();
        if more > 0 {
            problems.push(format!("and {more} more container problems"));
        }
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(Status::invalid_argument(problems.join("; "))),
    }
}

/// The idempotency key of a request, if it carries one; a present but unusable key is
/// `INVALID_ARGUMENT`.
pub fn idempotency_key(metadata: &MetadataMap) -> Result<Option<String>, Status> {
    let Some(value) = metadata.get(IDEMPOTENCY_KEY_HEADER) else { return Ok(None) };
    let invalid = |why: &str| Status::invalid_argument(format!("{IDEMPOTENCY_KEY_HEADER}: {why}"));
    let key = value.to_str().map_err(|_| invalid("must be visible ASCII"))?;
    if key.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(invalid(&format!("at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes, got {}", key.len())));
    }
    Ok(Some(key.to_owned()))
}

/// Whether `stored` is what a request for `requested` stored: same description, weight and
/// containers, and the same id if the request named one. The vessel is the service's choice.
fn same_consignment(stored: &Consignment, requested: &Consignment) -> bool {
    stored.description == requested.description
        && stored.weight == requested.weight
        && stored.containers == requested.containers
        && (requested.id.is_empty() || requested.id == stored.id)
}

/// The answer to a call whose key was used before: the first result, or `ALREADY_EXISTS`
/// when the key was used for another consignment.
fn replay(key: &str, stored: Consignment, requested: &Consignment) -> Result<Consignment, Status> {
    if !same_consignment(&stored, requested) {
        return Err(Status::already_exists(format!(
            "{IDEMPOTENCY_KEY_HEADER} {key:?} was already used for consignment {} with different contents; \
             nothing was stored: use a new key (consignment-cli: a new --request-id) for a different consignment",
            stored.id
        )));
    }
    tracing::info!(consignment = %stored.id, %key, "replayed: already stored under this idempotency key");
    Ok(stored)
}

/// Maps a status from `vessel-service` onto this service's meaning of it.
fn remap_vessel_status(service: &str, status: Status) -> Status {
    match status.code() {
        Code::FailedPrecondition | Code::NotFound => Status::failed_precondition(format!(
            "no vessel can carry this consignment; it was not stored ({service}: {})",
            status.message()
        )),
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Aborted => Status::unavailable(format!("{service} unavailable: {}", status.message())),
        // A policy between the services (Consul intentions, MICRO_AUTHZ_POLICY): the caller
        // of this service is not at fault, but the denial is named so it can be fixed.
        Code::PermissionDenied => Status::failed_precondition(format!(
            "{service} refused this service's call; it was not stored ({service}: {})",
            status.message()
        )),
        _ => internal(format!("{service} failed: {status}")),
    }
}

/// Whether a creation failing with `code` is refused for what it is (a bulk load lists it and
/// goes on), rather than failing for the moment (the bulk load stops).
fn is_rejection(code: Code) -> bool {
    matches!(code, Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists)
}

fn storage_status(err: RepositoryError) -> Status {
    match err {
        RepositoryError::DuplicateId(id) => {
            Status::already_exists(format!("a consignment with id {id:?} already exists; nothing was stored"))
        }
        RepositoryError::ReservationAbandoned(id) => Status::unavailable(format!(
            "the vessel reservation {id} lapsed before the consignment was stored; nothing was stored: try again"
        )),
        err @ RepositoryError::Server { .. } => Status::unavailable(format!(
            "consignment-service cannot reach its database: {}",
            micro_core::error::error_chain(&err)
        )),
        err @ (RepositoryError::SchemaTooNew { .. }
        | RepositoryError::Database { .. }
        | RepositoryError::BadAddress { .. }
        | RepositoryError::Task(_)) => internal(micro_core::error::error_chain(&err)),
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
        let key = idempotency_key(request.metadata())?;
        let (stored, replayed) = self.create(request.into_inner(), key.as_deref()).await?;
        let mut response =
            tonic::Response::new(Response { created: true, consignment: Some(stored), consignments: vec![] });
        if replayed {
            response.metadata_mut().insert(IDEMPOTENT_REPLAYED_HEADER, "true".parse().expect("ASCII"));
        }
        Ok(response)
    }

    type WatchConsignmentsStream = ConsignmentStream;

    async fn watch_consignments(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<tonic::Response<ConsignmentStream>, Status> {
        let after_id = request.into_inner().after_id;
        Ok(tonic::Response::new(self.feed.watch(&after_id).await?))
    }

    async fn create_consignments(
        &self,
        request: Request<tonic::Streaming<Consignment>>,
    ) -> Result<tonic::Response<CreateSummary>, Status> {
        let key = idempotency_key(request.metadata())?;
        if let Some(key) = &key
            && key.len() > MAX_IDEMPOTENCY_KEY_BYTES - MAX_BULK_INDEX_BYTES
        {
            return Err(Status::invalid_argument(format!(
                "{IDEMPOTENCY_KEY_HEADER}: at most {} bytes on a stream (each consignment's key adds its \
                 index), got {}",
                MAX_IDEMPOTENCY_KEY_BYTES - MAX_BULK_INDEX_BYTES,
                key.len()
            )));
        }
        let mut messages = request.into_inner();
        let mut summary = CreateSummary::default();
        let mut index: u32 = 0;
        while let Some(requested) = messages.message().await? {
            if index as usize >= MAX_BULK_CONSIGNMENTS {
                return Err(Status::resource_exhausted(format!(
                    "at most {MAX_BULK_CONSIGNMENTS} consignments per stream; the first {MAX_BULK_CONSIGNMENTS} \
                     were handled: send the rest in another stream"
                )));
            }
            let item_key = key.as_ref().map(|key| format!("{key}/{index}"));
            match self.create(requested, item_key.as_deref()).await {
                Ok((stored, replayed)) => {
                    match replayed {
                        true => summary.replayed += 1,
                        false => summary.created += 1,
                    }
                    summary.consignment_ids.push(stored.id);
                }
                Err(status) if is_rejection(status.code()) => {
                    summary.rejected += 1;
                    if summary.rejections.len() < MAX_LISTED_REJECTIONS {
                        summary.rejections.push(Rejection {
                            index,
                            code: micro_core::metrics::code_name(status.code()).to_owned(),
                            message: status.message().to_owned(),
                        });
                    }
                }
                Err(status) => {
                    let resend = match &key {
                        Some(_) => {
                            format!("send the stream again with the same {IDEMPOTENCY_KEY_HEADER} to go on")
                        }
                        None => format!(
                            "with an {IDEMPOTENCY_KEY_HEADER} on the stream, sending it again would store nothing twice"
                        ),
                    };
                    return Err(Status::new(
                        status.code(),
                        format!(
                            "consignment {index} of the stream failed: {}; the {index} before it were handled \
                             ({} stored, {} replayed, {} rejected): {resend}",
                            status.message(),
                            summary.created,
                            summary.replayed,
                            summary.rejected
                        ),
                    ));
                }
            }
            index += 1;
        }
        tracing::info!(
            created = summary.created,
            replayed = summary.replayed,
            rejected = summary.rejected,
            key = key.as_deref().unwrap_or(""),
            "bulk load handled"
        );
        Ok(tonic::Response::new(summary))
    }

    async fn settle_reservation(
        &self,
        request: Request<SettleRequest>,
    ) -> Result<tonic::Response<Settlement>, Status> {
        let reservation_id = request.into_inner().reservation_id;
        if reservation_id.is_empty() {
            return Err(Status::invalid_argument("reservation_id: required"));
        }
        let settled = self.repository.settle(&reservation_id).await.map_err(storage_status)?;
        tracing::info!(reservation = %reservation_id, settled = ?settled, "reservation settled");
        Ok(tonic::Response::new(match settled {
            Settled::Stored(consignment_id) => Settlement { stored: true, consignment_id },
            Settled::Abandoned => Settlement { stored: false, consignment_id: String::new() },
        }))
    }

    async fn get_consignments(
        &self,
        _request: Request<GetRequest>,
    ) -> Result<tonic::Response<Response>, Status> {
        let consignments = self.repository.list().await.map_err(storage_status)?;
        Ok(tonic::Response::new(Response { created: false, consignment: None, consignments }))
    }
}

/// The layer [`request_size_layer`] returns.
pub type RequestSizeLayer = tower::util::MapResponseLayer<fn(http::Response<Body>) -> http::Response<Body>>;

/// A server layer that answers a request over [`MAX_REQUEST_BYTES`] with
/// `RESOURCE_EXHAUSTED` naming the size and the limit. tonic refuses such a message itself
/// (with [`ShippingHandler::into_service`]'s limit) but calls it `OUT_OF_RANGE`, which this
/// service never answers otherwise; the layer renames it.
///
/// ```no_run
/// # async fn demo(handler: consignment_service::ShippingHandler) -> micro_core::Result<()> {
/// micro_core::Server::builder("consignment-service")
///     .layer(consignment_service::request_size_layer())
///     .add_service(handler.into_service())
///     .run()
///     .await
/// # }
/// ```
pub fn request_size_layer() -> RequestSizeLayer {
    tower::util::MapResponseLayer::new(too_large_is_resource_exhausted as fn(_) -> _)
}

fn too_large_is_resource_exhausted(mut response: http::Response<Body>) -> http::Response<Body> {
    let headers = response.headers_mut();
    let Some(status) = Status::from_header_map(headers) else { return response };
    if status.code() != Code::OutOfRange {
        return response;
    }
    // tonic: "Error, decoded message length too large: found N bytes, the limit is: L bytes"
    let found = status
        .message()
        .split_once("found ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .map(|(n, _)| format!("{n} bytes, "))
        .unwrap_or_default();
    let exhausted = Status::resource_exhausted(format!(
        "request too large: {found}the limit is {MAX_REQUEST_BYTES} bytes (4 MiB)"
    ));
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    if exhausted.add_header(headers).is_err() {
        tracing::error!("could not rewrite an oversized request's status");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::consignment::Container;

    fn container(customer_id: &str, origin: &str) -> Container {
        Container { customer_id: customer_id.into(), origin: origin.into(), ..Default::default() }
    }

    fn valid() -> Consignment {
        Consignment { weight: 1, containers: vec![container("c1", "Derby")], ..Default::default() }
    }

    fn problems(consignment: &Consignment) -> String {
        let status = validate(consignment).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        status.message().to_owned()
    }

    #[test]
    fn a_valid_consignment_passes() {
        assert!(validate(&valid()).is_ok());
        let longest = Consignment { description: "x".repeat(MAX_DESCRIPTION_BYTES), ..valid() };
        assert!(validate(&longest).is_ok());
        let most = Consignment { containers: vec![container("c", "o"); MAX_CONTAINERS], ..valid() };
        assert!(validate(&most).is_ok());
    }

    #[test]
    fn each_invalid_field_gets_its_message() {
        let cases = [
            (Consignment { weight: 0, ..valid() }, "weight: must be positive, got 0"),
            (Consignment { weight: -5, ..valid() }, "weight: must be positive, got -5"),
            (Consignment { containers: vec![], ..valid() }, "containers: at least one container is required"),
            (
                Consignment { containers: vec![container("c1", "Derby"), container("", "Derby")], ..valid() },
                "containers[1].customer_id: required",
            ),
            (
                Consignment { containers: vec![container("c1", "")], ..valid() },
                "containers[0].origin: required",
            ),
            (
                Consignment { description: "é".repeat(513), ..valid() },
                "description: at most 1024 bytes, got 1026",
            ),
            (
                Consignment { containers: vec![container("c", "o"); MAX_CONTAINERS + 1], ..valid() },
                "containers: at most 10000, got 10001",
            ),
        ];
        for (consignment, expected) in cases {
            assert_eq!(problems(&consignment), expected);
        }
    }

    #[test]
    fn every_bad_field_is_named_at_once_and_the_list_stays_short() {
        let message = problems(&Consignment::default());
        assert_eq!(
            message,
            "weight: must be positive, got 0; containers: at least one container is required"
        );
        let many = Consignment { containers: vec![container("", ""); 100], ..valid() };
        let message = problems(&many);
        assert!(message.starts_with("containers[0].customer_id: required; containers[0].origin: required"));
        assert!(message.ends_with("and 190 more container problems"), "{message}");
    }

    #[test]
    fn idempotency_key_is_optional_but_must_be_usable() {
        let mut metadata = MetadataMap::new();
        assert_eq!(idempotency_key(&metadata).unwrap(), None);
        metadata.insert(IDEMPOTENCY_KEY_HEADER, "run-1".parse().unwrap());
        assert_eq!(idempotency_key(&metadata).unwrap().as_deref(), Some("run-1"));
        metadata.insert(IDEMPOTENCY_KEY_HEADER, "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1).parse().unwrap());
        let status = idempotency_key(&metadata).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("idempotency-key: at most 128 bytes"), "{status:?}");
        metadata.insert(IDEMPOTENCY_KEY_HEADER, "".parse().unwrap());
        assert!(idempotency_key(&metadata).is_err());
    }

    #[test]
    fn a_replay_with_other_contents_is_already_exists() {
        let stored = Consignment { id: "c-1".into(), vessel_id: "v".into(), ..valid() };
        assert!(replay("k", stored.clone(), &valid()).is_ok());
        let heavier = Consignment { weight: 2, ..valid() };
        let status = replay("k", stored, &heavier).unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists);
        assert!(status.message().contains("\"k\"") && status.message().contains("c-1"), "{status:?}");
    }

    #[test]
    fn only_the_decoders_out_of_range_becomes_resource_exhausted() {
        let tonic_says = Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        );
        let status =
            Status::from_header_map(too_large_is_resource_exhausted(tonic_says.into_http()).headers());
        let status = status.unwrap();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "request too large: 5000000 bytes, the limit is 4194304 bytes (4 MiB)");
        let other = too_large_is_resource_exhausted(Status::invalid_argument("x").into_http());
        assert_eq!(Status::from_header_map(other.headers()).unwrap().code(), Code::InvalidArgument);
    }

    #[test]
    fn vessel_codes_are_remapped_for_this_hop() {
        let none_fits = remap_vessel_status("vessel-service", Status::failed_precondition("no fit"));
        assert_eq!(none_fits.code(), Code::FailedPrecondition);
        assert!(none_fits.message().contains("not stored"));
        let refused = remap_vessel_status("vessel-service", Status::permission_denied("x may not call"));
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(refused.message().contains("x may not call"), "{}", refused.message());
        let down = remap_vessel_status("vessel-service", Status::unavailable("no instance"));
        assert_eq!(down.code(), Code::Unavailable);
        let timed_out = remap_vessel_status("vessel-service", Status::cancelled("Timeout expired"));
        assert_eq!(timed_out.code(), Code::Unavailable, "a cancellation is no internal error");
        assert_eq!(
            remap_vessel_status("vessel-service", Status::invalid_argument("bug")).code(),
            Code::Internal
        );
    }
}
