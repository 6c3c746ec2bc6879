//! vessel-service: finds a vessel of the fleet that can carry a load.
//!
//! # Examples
//! ```
//! use proto::vessel::Specification;
//! let fleet = vessel_service::Fleet::default();
//! let vessel = fleet.find_available(&Specification { capacity: 3, max_weight: 55_000 }).unwrap();
//! assert_eq!(vessel.id, "vessel001");
//! ```

use std::path::Path;

use proto::vessel::{Response, Specification, Vessel, vessel_service_server::VesselService};
use tonic::{Request, Status};

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

/// Whether `vessel` can carry a load needing `spec`: capacity at least the container count
/// and max weight at least the weight.
pub fn fits(vessel: &Vessel, spec: &Specification) -> bool {
    vessel.capacity >= spec.capacity && vessel.max_weight >= spec.max_weight
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

    /// The first available vessel that fits `spec`.
    pub fn find_available(&self, spec: &Specification) -> Option<&Vessel> {
        self.vessels.iter().find(|vessel| vessel.available && fits(vessel, spec))
    }
}

/// The gRPC handler over a [`Fleet`].
#[derive(Debug, Clone)]
pub struct VesselHandler {
    fleet: Fleet,
}

impl VesselHandler {
    /// Serves `fleet`.
    pub fn new(fleet: Fleet) -> Self {
        VesselHandler { fleet }
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
        match self.fleet.find_available(&spec) {
            Some(vessel) => {
                tracing::debug!(vessel = %vessel.id, capacity = spec.capacity, max_weight = spec.max_weight, "vessel found");
                Ok(tonic::Response::new(Response { vessel: Some(vessel.clone()), vessels: vec![] }))
            }
            None => Err(Status::failed_precondition(format!(
                "no available vessel fits capacity {} and max weight {} (fleet of {})",
                spec.capacity,
                spec.max_weight,
                self.fleet.vessels.len()
            ))),
        }
    }
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
        assert!(fleet.find_available(&Specification { capacity: 1, max_weight: 1 }).is_none());
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
