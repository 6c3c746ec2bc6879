//! vessel-service: finds a vessel of the fleet that can carry a load, and books each
//! consignment it hears of (`consignment.created`) on its vessel, so a full vessel is no
//! longer offered.
//!
//! [`Fleet`] is the vessels as configured; [`bookings::BookingStore`] keeps what is booked on
//! them; [`VesselHandler`] answers `FindAvailable` from both; [`Booker`] books each event,
//! subscribed with [`subscribe_created`].
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use proto::{consignment::{Consignment, Container}, vessel::Specification};
//! use micro_core::broker::Message;
//! use vessel_service::{Booker, Fleet, bookings::BookingStore};
//!
//! let (fleet, store) = (Fleet::default(), BookingStore::in_memory().unwrap());
//! let spec = Specification { capacity: 3, max_weight: 55_000 };
//! let loads = store.loads().await.unwrap();
//! assert_eq!(fleet.find_available(&spec, &loads).unwrap().id, "vessel001");
//!
//! // Four consignments of 55,000 each: the fourth overbooks vessel001's 200,000.
//! let booker = Booker::new(fleet.clone(), store.clone());
//! for n in 0..4 {
//!     let consignment = Consignment { id: format!("c-{n}"), vessel_id: "vessel001".into(), weight: 55_000,
//!         containers: vec![Container::default(); 3], ..Default::default() };
//!     booker.book(&consignment, &Message::new("consignment.created", "")).await.unwrap();
//! }
//! assert!(fleet.find_available(&spec, &store.loads().await.unwrap()).is_none());
//! # }
//! ```

pub mod bookings;

use std::{collections::HashMap, path::Path};

use micro_core::broker::{Broker, Message, SubscribeOptions, Subscription, subscribe_proto};
use proto::{
    consignment::Consignment,
    vessel::{Response, Specification, Vessel, vessel_service_server::VesselService},
};
use tonic::{Request, Status};

use crate::bookings::{Booked, Booking, BookingError, BookingStore, Load};

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

/// The gRPC handler: the fleet, less what the bookings store says is booked, read at each
/// call so instances sharing one database agree.
///
/// The vessel it answers with keeps its fleet figures (`capacity`, `max_weight` as
/// configured), not what remains: the figures describe the vessel, and the remaining room
/// changes with every booking.
#[derive(Debug, Clone)]
pub struct VesselHandler {
    fleet: Fleet,
    store: Option<BookingStore>,
}

impl VesselHandler {
    /// Serves `fleet`, every vessel empty unless [`VesselHandler::bookings`] says otherwise.
    pub fn new(fleet: Fleet) -> Self {
        VesselHandler { fleet, store: None }
    }

    /// Counts the bookings in `store` against the fleet. Default: none (every vessel empty).
    pub fn bookings(mut self, store: BookingStore) -> Self {
        self.store = Some(store);
        self
    }
}

#[tonic::async_trait]
impl VesselService for VesselHandler {
    async fn find_available(
        &self,
        request: Request<Specification>,
    ) -> Result<tonic::Response<Response>, Status> {
        let spec = request.into_inner();
        if spec.capacity <= 0 || spec.max_weight <= 0 {
            return Err(Status::invalid_argument(format!(
                "capacity ({}) and max_weight ({}) must both be positive",
                spec.capacity, spec.max_weight
            )));
        }
        let loads = match &self.store {
            Some(store) => store.loads().await?,
            None => Default::default(),
        };
        if let Some(vessel) = self.fleet.find_available(&spec, &loads) {
            tracing::debug!(vessel = %vessel.id, capacity = spec.capacity, max_weight = spec.max_weight, "vessel found");
            return Ok(tonic::Response::new(Response { vessel: Some(vessel.clone()), vessels: vec![] }));
        }
        let fleet_size = self.fleet.vessels.len();
        let booked_full =
            self.fleet.vessels.iter().filter(|vessel| vessel.available && fits(vessel, &spec)).count();
        Err(Status::failed_precondition(if booked_full > 0 {
            format!(
                "no available vessel fits capacity {} and max weight {}: {booked_full} of the fleet of {fleet_size} \
                 would when empty but are fully booked",
                spec.capacity, spec.max_weight
            )
        } else {
            format!(
                "no available vessel fits capacity {} and max weight {} (fleet of {fleet_size})",
                spec.capacity, spec.max_weight
            )
        }))
    }
}

/// The topic consignment-service publishes each stored consignment on.
pub const CONSIGNMENT_CREATED: &str = "consignment.created";

/// The name vessel-service registers under unless `MICRO_SERVER_NAME` says otherwise; its
/// instances subscribe in a queue group of their registered name, so each event is booked
/// by one instance of each differently named deployment.
pub const SERVICE_NAME: &str = "vessel-service";

/// Books the consignment of each `consignment.created` event on its vessel.
#[derive(Debug, Clone)]
pub struct Booker {
    fleet: Fleet,
    store: BookingStore,
}

impl Booker {
    /// Books on `fleet`'s vessels into `store`.
    pub fn new(fleet: Fleet, store: BookingStore) -> Self {
        Booker { fleet, store }
    }

    /// Books `consignment` (from `message`), keyed by its id (the message id when the
    /// consignment has none): its containers and weight on its `vessel_id`. A consignment
    /// booked already books nothing (debug `already booked`); one for a vessel not in the
    /// fleet, or one that overbooks its vessel, is booked all the same with a warning, since
    /// the consignment is stored already. `None` when there is no id to key it by.
    pub async fn book(
        &self,
        consignment: &Consignment,
        message: &Message,
    ) -> Result<Option<Booked>, BookingError> {
        let message_id = message.id().unwrap_or("-");
        let consignment_id =
            [consignment.id.as_str(), message.id().unwrap_or_default()].into_iter().find(|id| !id.is_empty());
        let Some(consignment_id) = consignment_id.map(str::to_owned) else {
            tracing::warn!(topic = %message.topic, vessel = %consignment.vessel_id, "consignment without an id: not booked");
            return Ok(None);
        };
        let booking = Booking {
            consignment_id: consignment_id.clone(),
            vessel_id: consignment.vessel_id.clone(),
            containers: consignment.containers.len() as i64,
            weight: i64::from(consignment.weight),
        };
        let (containers, weight) = (booking.containers, booking.weight);
        let booked = self.store.book(booking).await?;
        if !booked.fresh {
            tracing::debug!(topic = %message.topic, message_id, consignment = %consignment_id, vessel = %booked.vessel_id, "already booked");
            return Ok(Some(booked));
        }
        let vessel = self.fleet.vessel(&booked.vessel_id);
        tracing::info!(
            topic = %message.topic,
            message_id,
            consignment = %consignment_id,
            vessel = %booked.vessel_id,
            containers,
            weight,
            booked_containers = booked.vessel_load.containers,
            capacity = vessel.map(|v| v.capacity),
            booked_weight = booked.vessel_load.weight,
            max_weight = vessel.map(|v| v.max_weight),
            "consignment booked"
        );
        match vessel {
            None => tracing::warn!(
                consignment = %consignment_id,
                vessel = %booked.vessel_id,
                "consignment booked on a vessel not in this fleet (check --fleet on every vessel-service instance)"
            ),
            Some(vessel)
                if booked.vessel_load.containers > i64::from(vessel.capacity)
                    || booked.vessel_load.weight > i64::from(vessel.max_weight) =>
            {
                tracing::warn!(
                    consignment = %consignment_id,
                    vessel = %vessel.id,
                    booked_containers = booked.vessel_load.containers,
                    capacity = vessel.capacity,
                    booked_weight = booked.vessel_load.weight,
                    max_weight = vessel.max_weight,
                    "vessel overbooked (creations raced for its last room)"
                );
            }
            Some(_) => {}
        }
        Ok(Some(booked))
    }
}

/// Subscribes `booker` to [`CONSIGNMENT_CREATED`] in queue group `queue` (the service's
/// registered name, so each event is booked by one of its instances), durably when `durable`
/// (nats, rabbitmq). A booking that fails
/// (e.g. the database locked beyond its busy timeout) fails the handler, so a durable broker
/// delivers the event again.
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

    fn vessel(capacity: i32, max_weight: i32) -> Vessel {
        Vessel { id: "v".into(), capacity, max_weight, available: true, ..Default::default() }
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

    #[tokio::test]
    async fn a_fully_booked_fleet_is_refused_saying_so() {
        let (fleet, store) = (Fleet::new(vec![vessel(3, 100)]), BookingStore::in_memory().unwrap());
        let (booker, handler) =
            (Booker::new(fleet.clone(), store.clone()), VesselHandler::new(fleet).bookings(store));
        let spec = || Request::new(Specification { capacity: 2, max_weight: 50 });
        let found = handler.find_available(spec()).await.unwrap().into_inner().vessel.unwrap();
        assert_eq!((found.id.as_str(), found.capacity), ("v", 3), "fleet figures, not what remains");

        let (consignment, message) = created("c-1", "v", 2, 10);
        assert!(booker.book(&consignment, &message).await.unwrap().unwrap().fresh);
        let status = handler.find_available(spec()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().contains("1 of the fleet of 1 would when empty but are fully booked"),
            "{status:?}"
        );

        let too_big = Request::new(Specification { capacity: 4, max_weight: 50 });
        let status = handler.find_available(too_big).await.unwrap_err();
        assert!(!status.message().contains("booked"), "too big even when empty: {status:?}");
    }

    #[tokio::test]
    async fn unknown_vessels_and_overbookings_are_still_booked() {
        let store = BookingStore::in_memory().unwrap();
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
        let store = BookingStore::in_memory().unwrap();
        let booker = Booker::new(Fleet::default(), store.clone());
        let (consignment, message) = created("", "vessel001", 1, 1);
        let message = message.header(micro_core::broker::headers::MESSAGE_ID, "m-1");
        assert!(booker.book(&consignment, &message).await.unwrap().is_some());
        assert!(store.booking("m-1").await.unwrap().is_some());
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
}
