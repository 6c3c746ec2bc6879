//! vessel-service: finds a vessel of the fleet that can carry a load, holds room on it for
//! a consignment until the consignment is stored (`Reserve`, then `Confirm` or `Release`),
//! and never books a vessel past its capacity or its max weight, whatever the concurrency
//! and however many instances share the database.
//!
//! [`Fleet`] is the vessels as configured; a [`store::ReservationStore`] keeps what is held
//! and booked on them (SQLite or PostgreSQL); [`VesselHandler`] answers the gRPC methods
//! from both; [`Booker`] confirms the reservation of each `consignment.created` event,
//! subscribed with [`subscribe_created`]; [`reaper::Reaper`] settles holds that outlive
//! their time with the service that made them. `docs/reservations.md` has the protocol.
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use std::sync::Arc;
//! use proto::vessel::{ReserveRequest, Specification, vessel_service_server::VesselService};
//! use vessel_service::{Fleet, VesselHandler, store::SqliteStore};
//!
//! let handler = VesselHandler::new(Fleet::default(), Arc::new(SqliteStore::in_memory().unwrap()));
//! let reserve = |n: usize| tonic::Request::new(ReserveRequest {
//!     specification: Some(Specification { capacity: 3, max_weight: 55_000 }),
//!     holder: "consignment-service".into(), consignment_id: format!("c-{n}"), ..Default::default()
//! });
//! // vessel001 carries 200,000 kg: three of 55,000 fit, the fourth is refused.
//! for n in 0..3 {
//!     assert_eq!(handler.reserve(reserve(n)).await.unwrap().into_inner().state, "held");
//! }
//! let status = handler.reserve(reserve(3)).await.unwrap_err();
//! assert_eq!(status.code(), tonic::Code::FailedPrecondition);
//! assert!(status.message().contains("vessel001 has 491 containers and 35000 kg left"), "{status:?}");
//! # }
//! ```

pub mod reaper;
pub mod store;

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use micro_core::broker::{Broker, Message, SubscribeOptions, Subscription, subscribe_proto};
use proto::{
    consignment::Consignment,
    vessel::{
        ReservationRef, ReserveRequest, Response, Specification, Vessel, vessel_service_server::VesselService,
    },
};
use tonic::{Request, Status};

use crate::store::{Booked, Hold, Load, Released, Reservation, ReservationStore, Reserved, StoreError};

/// Why the fleet could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The file could not be read.
    #[error("cannot read fleet file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a JSON list of vessels.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What is wrong there.
        message: String,
    },
    /// The file parsed but a vessel is unusable.
    #[error("fleet file {path}: {message}")]
    Invalid {
        /// The path given.
        path: String,
        /// Which vessel and why.
        message: String,
    },
}

/// The vessels this service can offer.
#[derive(Debug, Clone)]
pub struct Fleet {
    vessels: Vec<Vessel>,
}

impl Default for Fleet {
    /// One vessel: `vessel001`, "Boaty McBoatface", capacity 500, max weight 200,000.
    fn default() -> Self {
        Fleet {
            vessels: vec![Vessel {
                id: "vessel001".into(),
                name: "Boaty McBoatface".into(),
                capacity: 500,
                max_weight: 200_000,
                available: true,
                owner_id: String::new(),
            }],
        }
    }
}

/// Whether `vessel` can carry a load needing `spec` when empty: capacity at least the
/// container count and max weight at least the weight.
pub fn fits(vessel: &Vessel, spec: &Specification) -> bool {
    vessel.capacity >= spec.capacity && vessel.max_weight >= spec.max_weight
}

/// Whether `vessel`, with `load` booked on it, can still carry a load needing `spec`: its
/// remaining capacity (capacity minus booked containers) and remaining weight (max weight
/// minus booked weight) both fit.
pub fn fits_remaining(vessel: &Vessel, load: &Load, spec: &Specification) -> bool {
    i64::from(vessel.capacity) - load.containers >= i64::from(spec.capacity)
        && i64::from(vessel.max_weight) - load.weight >= i64::from(spec.max_weight)
}

impl Fleet {
    /// A fleet of the given vessels.
    pub fn new(vessels: Vec<Vessel>) -> Self {
        Fleet { vessels }
    }

    /// Loads a JSON array of vessels, e.g.
    /// `[{"id": "v1", "name": "Ever Given", "capacity": 20000, "max_weight": 200000000, "available": true}]`.
    pub fn from_json_file(path: &Path) -> Result<Self, FleetError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| FleetError::Read { path: shown.clone(), source })?;
        let vessels: Vec<Vessel> = serde_json::from_str(&text).map_err(|err| FleetError::Parse {
            path: shown.clone(),
            line: err.line(),
            column: err.column(),
            message: err.to_string(),
        })?;
        for (index, vessel) in vessels.iter().enumerate() {
            if vessel.id.is_empty() || vessel.capacity < 0 || vessel.max_weight < 0 {
                return Err(FleetError::Invalid {
                    path: shown,
                    message: format!("vessel #{index} needs an id and non-negative capacity and max_weight"),
                });
            }
        }
        Ok(Fleet { vessels })
    }

    /// The vessels, in file order.
    pub fn vessels(&self) -> &[Vessel] {
        &self.vessels
    }

    /// The vessel with id `id`, if the fleet has it.
    pub fn vessel(&self, id: &str) -> Option<&Vessel> {
        self.vessels.iter().find(|vessel| vessel.id == id)
    }

    /// The first available vessel that, with what `loads` says is booked on it, still fits
    /// `spec`. Vessels missing from `loads` are empty.
    pub fn find_available(&self, spec: &Specification, loads: &HashMap<String, Load>) -> Option<&Vessel> {
        self.vessels.iter().find(|vessel| {
            vessel.available
                && fits_remaining(vessel, &loads.get(&vessel.id).copied().unwrap_or_default(), spec)
        })
    }
}

/// How long a hold lasts unless its holder confirms it, when `--reservation-ttl` /
/// `VESSEL_RESERVATION_TTL` does not say (milliseconds).
pub const DEFAULT_RESERVATION_TTL_MS: u64 = 10_000;

/// The gRPC handler: the fleet, less what the store says is booked or held, read at each
/// call so instances sharing one database agree; reservations made, confirmed and released
/// in that database.
///
/// A vessel it answers with keeps its fleet figures (`capacity`, `max_weight` as
/// configured), not what remains: the figures describe the vessel, and the remaining room
/// changes with every booking.
#[derive(Debug, Clone)]
pub struct VesselHandler {
    fleet: Fleet,
    store: Arc<dyn ReservationStore>,
    ttl: Duration,
}

impl VesselHandler {
    /// Serves `fleet`, with what is booked and held kept in `store`.
    pub fn new(fleet: Fleet, store: Arc<dyn ReservationStore>) -> Self {
        VesselHandler { fleet, store, ttl: Duration::from_millis(DEFAULT_RESERVATION_TTL_MS) }
    }

    /// How long a hold lasts unless confirmed. Default: [`DEFAULT_RESERVATION_TTL_MS`].
    pub fn reservation_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The available vessels that could carry `spec` when empty, in fleet order; a
    /// FAILED_PRECONDITION naming the fleet when none could.
    fn candidates(&self, spec: &Specification) -> Result<Vec<Vessel>, Status> {
        let candidates: Vec<Vessel> = self
            .fleet
            .vessels
            .iter()
            .filter(|vessel| vessel.available && fits(vessel, spec))
            .cloned()
            .collect();
        if candidates.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no available vessel fits capacity {} and max weight {} (fleet of {})",
                spec.capacity,
                spec.max_weight,
                self.fleet.vessels.len()
            )));
        }
        Ok(candidates)
    }
}

fn check_specification(spec: &Specification) -> Result<(), Status> {
    if spec.capacity <= 0 || spec.max_weight <= 0 {
        return Err(Status::invalid_argument(format!(
            "capacity ({}) and max_weight ({}) must both be positive",
            spec.capacity, spec.max_weight
        )));
    }
    Ok(())
}

/// The answer when every vessel that could carry `spec` is too full: what room each has left.
fn fully_booked(spec: &Specification, candidates: &[Vessel], loads: &[(String, Load)]) -> Status {
    let room: Vec<String> = candidates
        .iter()
        .zip(loads)
        .map(|(vessel, (_, load))| {
            format!(
                "{} has {} containers and {} kg left of {} and {}",
                vessel.id,
                (i64::from(vessel.capacity) - load.containers).max(0),
                (i64::from(vessel.max_weight) - load.weight).max(0),
                vessel.capacity,
                vessel.max_weight
            )
        })
        .collect();
    Status::failed_precondition(format!(
        "no available vessel has room for {} containers and {} kg: {} of the fleet would when empty but are \
         fully booked ({})",
        spec.capacity,
        spec.max_weight,
        candidates.len(),
        room.join("; ")
    ))
}

fn reservation_message(reservation: &Reservation, vessel: Option<&Vessel>) -> proto::vessel::Reservation {
    proto::vessel::Reservation {
        id: reservation.id.clone(),
        vessel: Some(
            vessel
                .cloned()
                .unwrap_or_else(|| Vessel { id: reservation.vessel_id.clone(), ..Default::default() }),
        ),
        consignment_id: reservation.consignment_id.clone(),
        state: reservation.state.clone(),
        expires_at_unix_ms: reservation.expires_at_ms.unwrap_or_default(),
        containers: i32::try_from(reservation.containers).unwrap_or(i32::MAX),
        weight: i32::try_from(reservation.weight).unwrap_or(i32::MAX),
    }
}

fn reservation_id(request: Request<ReservationRef>) -> Result<String, Status> {
    let id = request.into_inner().reservation_id;
    if id.is_empty() {
        return Err(Status::invalid_argument("reservation_id: required"));
    }
    Ok(id)
}

#[tonic::async_trait]
impl VesselService for VesselHandler {
    async fn find_available(
        &self,
        request: Request<Specification>,
    ) -> Result<tonic::Response<Response>, Status> {
        let spec = request.into_inner();
        check_specification(&spec)?;
        let loads = self.store.loads().await?;
        if let Some(vessel) = self.fleet.find_available(&spec, &loads) {
            tracing::debug!(vessel = %vessel.id, capacity = spec.capacity, max_weight = spec.max_weight, "vessel found");
            return Ok(tonic::Response::new(Response { vessel: Some(vessel.clone()), vessels: vec![] }));
        }
        let candidates = self.candidates(&spec)?;
        let loads: Vec<(String, Load)> = candidates
            .iter()
            .map(|vessel| (vessel.id.clone(), loads.get(&vessel.id).copied().unwrap_or_default()))
            .collect();
        Err(fully_booked(&spec, &candidates, &loads))
    }

    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<tonic::Response<proto::vessel::Reservation>, Status> {
        let request = request.into_inner();
        let spec = request.specification.unwrap_or_default();
        check_specification(&spec)?;
        for (field, value) in [("holder", &request.holder), ("consignment_id", &request.consignment_id)] {
            if value.is_empty() {
                return Err(Status::invalid_argument(format!("{field}: required")));
            }
        }
        let candidates = self.candidates(&spec)?;
        let hold = Hold {
            holder: request.holder,
            request_key: Some(request.request_key).filter(|key| !key.is_empty()),
            consignment_id: request.consignment_id,
            containers: i64::from(spec.capacity),
            weight: i64::from(spec.max_weight),
            ttl: self.ttl,
        };
        match self.store.reserve(hold, candidates.clone()).await? {
            Reserved::Held { reservation, fresh, vessel_load } => {
                let vessel = self.fleet.vessel(&reservation.vessel_id);
                tracing::info!(
                    reservation = %reservation.id,
                    consignment = %reservation.consignment_id,
                    holder = %reservation.holder,
                    vessel = %reservation.vessel_id,
                    containers = reservation.containers,
                    weight = reservation.weight,
                    booked_containers = vessel_load.containers,
                    booked_weight = vessel_load.weight,
                    fresh,
                    "room held"
                );
                Ok(tonic::Response::new(reservation_message(&reservation, vessel)))
            }
            Reserved::Full { loads } => Err(fully_booked(&spec, &candidates, &loads)),
        }
    }

    async fn confirm(
        &self,
        request: Request<ReservationRef>,
    ) -> Result<tonic::Response<proto::vessel::Reservation>, Status> {
        let id = reservation_id(request)?;
        match self.store.confirm(&id).await? {
            Some(booked) => {
                log_booked(&self.fleet, &booked, None);
                Ok(tonic::Response::new(reservation_message(
                    &booked.reservation,
                    self.fleet.vessel(&booked.reservation.vessel_id),
                )))
            }
            None => Err(Status::not_found(format!(
                "reservation {id} is unknown: it was released (its holder gave it up or abandoned it) or never made"
            ))),
        }
    }

    async fn release(
        &self,
        request: Request<ReservationRef>,
    ) -> Result<tonic::Response<proto::vessel::Reservation>, Status> {
        let id = reservation_id(request)?;
        let reservation = match self.store.release(&id).await? {
            Released::Released(reservation) => {
                tracing::info!(reservation = %id, consignment = %reservation.consignment_id, vessel = %reservation.vessel_id, "hold released");
                Reservation { state: RELEASED.to_owned(), ..reservation }
            }
            Released::Confirmed(reservation) => reservation,
            Released::Unknown => Reservation {
                id,
                vessel_id: String::new(),
                consignment_id: String::new(),
                containers: 0,
                weight: 0,
                holder: String::new(),
                state: RELEASED.to_owned(),
                expires_at_ms: None,
            },
        };
        Ok(tonic::Response::new(reservation_message(&reservation, self.fleet.vessel(&reservation.vessel_id))))
    }
}

/// The state a `Release` answers with once the room is free (the reservation is gone).
pub const RELEASED: &str = "released";

/// Logs a booking: `consignment booked` (info) when `booked` is new, `already booked`
/// (debug) when it was booked before; a warning when its vessel is not in `fleet` or is
/// overbooked (only a booking made without a reservation can be).
fn log_booked(fleet: &Fleet, booked: &Booked, message: Option<&Message>) {
    let reservation = &booked.reservation;
    let topic = message.map(|message| message.topic.as_str()).unwrap_or("-");
    let message_id = message.and_then(Message::id).unwrap_or("-");
    if !booked.fresh {
        tracing::debug!(topic, message_id, consignment = %reservation.consignment_id, reservation = %reservation.id, vessel = %reservation.vessel_id, "already booked");
        return;
    }
    let vessel = fleet.vessel(&reservation.vessel_id);
    tracing::info!(
        topic,
        message_id,
        consignment = %reservation.consignment_id,
        reservation = %reservation.id,
        vessel = %reservation.vessel_id,
        containers = reservation.containers,
        weight = reservation.weight,
        booked_containers = booked.vessel_load.containers,
        capacity = vessel.map(|v| v.capacity),
        booked_weight = booked.vessel_load.weight,
        max_weight = vessel.map(|v| v.max_weight),
        "consignment booked"
    );
    match vessel {
        None => tracing::warn!(
            consignment = %reservation.consignment_id,
            vessel = %reservation.vessel_id,
            "consignment booked on a vessel not in this fleet (check --fleet on every vessel-service instance)"
        ),
        Some(vessel)
            if booked.vessel_load.containers > i64::from(vessel.capacity)
                || booked.vessel_load.weight > i64::from(vessel.max_weight) =>
        {
            tracing::warn!(
                consignment = %reservation.consignment_id,
                vessel = %vessel.id,
                booked_containers = booked.vessel_load.containers,
                capacity = vessel.capacity,
                booked_weight = booked.vessel_load.weight,
                max_weight = vessel.max_weight,
                "vessel overbooked by a consignment stored without a reservation"
            );
        }
        Some(_) => {}
    }
}

/// The topic consignment-service publishes each stored consignment on.
pub const CONSIGNMENT_CREATED: &str = "consignment.created";

/// The name vessel-service registers under unless `MICRO_SERVER_NAME` says otherwise; its
/// instances subscribe in a queue group of their registered name, so each event is booked
/// by one instance of each differently named deployment.
pub const SERVICE_NAME: &str = "vessel-service";

/// Books the consignment of each `consignment.created` event: confirms its reservation, or,
/// for a consignment stored without one, books it as it is.
#[derive(Debug, Clone)]
pub struct Booker {
    fleet: Fleet,
    store: Arc<dyn ReservationStore>,
}

impl Booker {
    /// Books on `fleet`'s vessels into `store`.
    pub fn new(fleet: Fleet, store: Arc<dyn ReservationStore>) -> Self {
        Booker { fleet, store }
    }

    /// Books `consignment` (from `message`). With a `reservation_id`, confirms that
    /// reservation (a second time changes nothing). Without one (a consignment-service that
    /// does not reserve), or when the reservation is unknown here (this database is not the
    /// one it was made in), books its containers and weight on its `vessel_id` keyed by its
    /// id (the message id when it has none), once; the consignment is stored already, so an
    /// overbooking is booked all the same, with a warning. `None` when there is no id to key
    /// it by.
    pub async fn book(
        &self,
        consignment: &Consignment,
        message: &Message,
    ) -> Result<Option<Booked>, StoreError> {
        if !consignment.reservation_id.is_empty() {
            if let Some(booked) = self.store.confirm(&consignment.reservation_id).await? {
                log_booked(&self.fleet, &booked, Some(message));
                return Ok(Some(booked));
            }
            tracing::warn!(
                consignment = %consignment.id,
                reservation = %consignment.reservation_id,
                database = %self.store.database(),
                "reservation unknown here: booking the stored consignment without it (was the database replaced?)"
            );
        }
        let consignment_id =
            [consignment.id.as_str(), message.id().unwrap_or_default()].into_iter().find(|id| !id.is_empty());
        let Some(consignment_id) = consignment_id else {
            tracing::warn!(topic = %message.topic, vessel = %consignment.vessel_id, "consignment without an id: not booked");
            return Ok(None);
        };
        let containers = consignment.containers.len() as i64;
        let booked = self
            .store
            .book(consignment_id, &consignment.vessel_id, containers, i64::from(consignment.weight))
            .await?;
        log_booked(&self.fleet, &booked, Some(message));
        Ok(Some(booked))
    }
}

/// Subscribes `booker` to [`CONSIGNMENT_CREATED`] in queue group `queue` (the service's
/// registered name, so each event is booked by one of its instances), durably when `durable`
/// (nats, rabbitmq). A booking that fails (e.g. the database unreachable) fails the handler,
/// so a durable broker delivers the event again.
pub async fn subscribe_created(
    broker: &dyn Broker,
    queue: &str,
    durable: bool,
    booker: Booker,
) -> micro_core::Result<Subscription> {
    let mut options = SubscribeOptions::default().queue(queue);
    if durable {
        options = options.durable();
    }
    subscribe_proto(broker, CONSIGNMENT_CREATED, options, move |consignment: Consignment, message| {
        let booker = booker.clone();
        async move {
            booker.book(&consignment, &message).await?;
            Ok(())
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn vessel(capacity: i32, max_weight: i32) -> Vessel {
        Vessel { id: "v".into(), capacity, max_weight, available: true, ..Default::default() }
    }

    fn memory() -> Arc<dyn ReservationStore> {
        Arc::new(SqliteStore::in_memory().unwrap())
    }

    #[test]
    fn fit_needs_both_capacity_and_weight() {
        let spec = Specification { capacity: 3, max_weight: 55_000 };
        assert!(fits(&vessel(3, 55_000), &spec), "exact fit");
        assert!(fits(&vessel(500, 200_000), &spec));
        assert!(!fits(&vessel(2, 200_000), &spec), "too few slots");
        assert!(!fits(&vessel(500, 54_999), &spec), "too light");
    }

    #[test]
    fn unavailable_vessels_are_never_offered() {
        let mut busy = vessel(500, 200_000);
        busy.available = false;
        let fleet = Fleet::new(vec![busy]);
        assert!(
            fleet.find_available(&Specification { capacity: 1, max_weight: 1 }, &HashMap::new()).is_none()
        );
    }

    fn created(id: &str, vessel: &str, containers: usize, weight: i32) -> (Consignment, Message) {
        let consignment = Consignment {
            id: id.into(),
            vessel_id: vessel.into(),
            weight,
            containers: vec![Default::default(); containers],
            ..Default::default()
        };
        (
            consignment,
            Message::new(CONSIGNMENT_CREATED, "").header(micro_core::broker::headers::MESSAGE_ID, id),
        )
    }

    fn reserve(consignment: &str, key: &str, capacity: i32, max_weight: i32) -> Request<ReserveRequest> {
        Request::new(ReserveRequest {
            specification: Some(Specification { capacity, max_weight }),
            holder: "shipping".into(),
            request_key: key.into(),
            consignment_id: consignment.into(),
        })
    }

    fn by_id(id: &str) -> Request<ReservationRef> {
        Request::new(ReservationRef { reservation_id: id.into() })
    }

    #[tokio::test]
    async fn a_fully_booked_fleet_is_refused_saying_what_room_is_left() {
        let (fleet, store) = (Fleet::new(vec![vessel(3, 100)]), memory());
        let (booker, handler) = (Booker::new(fleet.clone(), store.clone()), VesselHandler::new(fleet, store));
        let spec = || Request::new(Specification { capacity: 2, max_weight: 50 });
        let found = handler.find_available(spec()).await.unwrap().into_inner().vessel.unwrap();
        assert_eq!((found.id.as_str(), found.capacity), ("v", 3), "fleet figures, not what remains");

        let (consignment, message) = created("c-1", "v", 2, 10);
        assert!(booker.book(&consignment, &message).await.unwrap().unwrap().fresh);
        let status = handler.find_available(spec()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().contains("1 of the fleet would when empty but are fully booked"),
            "{status:?}"
        );
        assert!(status.message().contains("v has 1 containers and 90 kg left of 3 and 100"), "{status:?}");
        let status = handler.reserve(reserve("c-2", "", 2, 50)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("v has 1 containers and 90 kg left"), "{status:?}");

        let too_big = Request::new(Specification { capacity: 4, max_weight: 50 });
        let status = handler.find_available(too_big).await.unwrap_err();
        assert!(!status.message().contains("booked"), "too big even when empty: {status:?}");
    }

    #[tokio::test]
    async fn a_hold_takes_room_until_released_and_a_confirmed_one_for_good() {
        let handler = VesselHandler::new(Fleet::new(vec![vessel(4, 100)]), memory());
        let first = handler.reserve(reserve("c-1", "k-1", 2, 60)).await.unwrap().into_inner();
        assert_eq!((first.state.as_str(), first.containers, first.weight), (HELD_STATE, 2, 60));
        assert!(first.expires_at_unix_ms > 0);
        let again = handler.reserve(reserve("c-1", "k-1", 2, 60)).await.unwrap().into_inner();
        assert_eq!(again.id, first.id, "the same key while the hold lives: the same reservation");
        let status = handler.reserve(reserve("c-2", "k-2", 2, 60)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "weight: 60 + 60 > 100");

        let released = handler.release(by_id(&first.id)).await.unwrap().into_inner();
        assert_eq!(released.state, RELEASED);
        assert_eq!(
            handler.release(by_id(&first.id)).await.unwrap().into_inner().state,
            RELEASED,
            "twice: same"
        );
        let second = handler.reserve(reserve("c-2", "k-2", 2, 60)).await.unwrap().into_inner();
        let confirmed = handler.confirm(by_id(&second.id)).await.unwrap().into_inner();
        assert_eq!((confirmed.state.as_str(), confirmed.expires_at_unix_ms), ("confirmed", 0));
        assert_eq!(handler.confirm(by_id(&second.id)).await.unwrap().into_inner().state, "confirmed");
        let kept = handler.release(by_id(&second.id)).await.unwrap().into_inner();
        assert_eq!(kept.state, "confirmed", "a booking is not released");
        let status = handler.confirm(by_id(&first.id)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "a released hold cannot be confirmed");
        let status = handler.reserve(reserve("", "", 1, 1)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn racing_reservations_never_overbook() {
        let handler = VesselHandler::new(Fleet::new(vec![vessel(500, 200_000)]), memory());
        let attempts = (0..12).map(|n| {
            let handler = handler.clone();
            tokio::spawn(async move { handler.reserve(reserve(&format!("c-{n}"), "", 3, 55_000)).await })
        });
        let mut held = 0;
        for attempt in attempts {
            match attempt.await.unwrap() {
                Ok(_) => held += 1,
                Err(status) => assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}"),
            }
        }
        assert_eq!(held, 3, "3 of 55,000 kg fit 200,000 kg");
    }

    #[tokio::test]
    async fn an_event_confirms_its_reservation_once() {
        let (fleet, store) = (Fleet::new(vec![vessel(3, 100)]), memory());
        let (booker, handler) =
            (Booker::new(fleet.clone(), store.clone()), VesselHandler::new(fleet, store.clone()));
        let held = handler.reserve(reserve("c-1", "", 2, 60)).await.unwrap().into_inner();
        let (mut consignment, message) = created("c-1", "v", 2, 60);
        consignment.reservation_id = held.id.clone();
        let booked = booker.book(&consignment, &message).await.unwrap().unwrap();
        assert!(booked.fresh && booked.reservation.is_confirmed());
        assert!(!booker.book(&consignment, &message).await.unwrap().unwrap().fresh, "a redelivery");
        assert_eq!(store.loads().await.unwrap()["v"], Load { containers: 2, weight: 60 }, "booked once");
        assert_eq!(store.reservations_for("c-1").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn unknown_vessels_and_overbookings_without_a_reservation_are_still_booked() {
        let store = memory();
        let booker = Booker::new(Fleet::new(vec![vessel(3, 100)]), store.clone());
        for (id, vessel) in [("c-1", "elsewhere"), ("c-2", "v"), ("c-3", "v")] {
            let (consignment, message) = created(id, vessel, 2, 60);
            assert!(booker.book(&consignment, &message).await.unwrap().unwrap().fresh);
        }
        let loads = store.loads().await.unwrap();
        assert_eq!(loads["elsewhere"], Load { containers: 2, weight: 60 });
        assert_eq!(loads["v"], Load { containers: 4, weight: 120 });
    }

    #[tokio::test]
    async fn a_consignment_without_an_id_is_keyed_by_its_message_id_or_not_booked() {
        let store = memory();
        let booker = Booker::new(Fleet::default(), store.clone());
        let (consignment, message) = created("", "vessel001", 1, 1);
        let message = message.header(micro_core::broker::headers::MESSAGE_ID, "m-1");
        assert!(booker.book(&consignment, &message).await.unwrap().is_some());
        assert_eq!(store.reservations_for("m-1").await.unwrap().len(), 1);
        let mut anonymous = message.clone();
        anonymous.headers.clear();
        assert!(booker.book(&consignment, &anonymous).await.unwrap().is_none());
    }

    #[test]
    fn malformed_fleet_file_names_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.json");
        std::fs::write(&path, "[\n  {\"id\": \"v1\",\n   \"capacity\": oops}\n]").unwrap();
        let err = Fleet::from_json_file(&path).unwrap_err().to_string();
        assert!(err.contains("fleet.json:3:"), "{err}");
    }

    const HELD_STATE: &str = crate::store::HELD;
}
