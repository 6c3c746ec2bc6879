//! Which methods a server serves: the only ones that get a metric label of their own.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
};

use super::{MAX_LEARNED_METHODS, MethodMetrics, Shape};
use crate::metrics::UNKNOWN_METHOD;

/// The methods a server serves, which alone get a `method` label of their own.
///
/// A method is known when an encoded descriptor set given to the server describes it, or,
/// for a served gRPC service no set describes, once it has answered with anything but
/// `UNIMPLEMENTED` (what tonic answers for a path it does not route), up to
/// [`MAX_LEARNED_METHODS`]. Every other path counts as [`UNKNOWN_METHOD`].
pub struct ServedMethods {
    /// Full names of the gRPC services served (`package.Service`).
    services: HashSet<String>,
    /// Services whose methods a descriptor set lists: nothing is learned for them.
    described: HashSet<String>,
    /// Known paths and their metric handles.
    known: RwLock<HashMap<String, Arc<MethodMetrics>>>,
    pub(super) unknown: Arc<MethodMetrics>,
    /// Learn any path (a layer used on its own, with no service list).
    learn_any: bool,
}

impl std::fmt::Debug for ServedMethods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedMethods").field("services", &self.services).finish_non_exhaustive()
    }
}

impl Default for ServedMethods {
    /// Knows nothing in advance; learns any path that answers, up to [`MAX_LEARNED_METHODS`].
    fn default() -> Self {
        let mut methods = ServedMethods::new(std::iter::empty::<&str>(), &[]);
        methods.learn_any = true;
        methods
    }
}

impl ServedMethods {
    /// The methods of the gRPC `services` (full names) that the encoded descriptor sets
    /// describe, plus those of undescribed services as they answer.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a str>, descriptor_sets: &[&[u8]]) -> Self {
        let services: HashSet<String> = services.into_iter().map(str::to_owned).collect();
        let mut known = HashMap::new();
        let mut described = HashSet::new();
        for Described { service, method, streaming } in described_methods(descriptor_sets) {
            if services.contains(&service) {
                let path = format!("/{service}/{method}");
                let shape = if streaming { Shape::Streaming } else { Shape::Unary };
                known.insert(path.clone(), MethodMetrics::new(&path, shape));
                described.insert(service);
            }
        }
        ServedMethods {
            services,
            described,
            known: RwLock::new(known),
            unknown: MethodMetrics::new(UNKNOWN_METHOD, Shape::Undescribed),
            learn_any: false,
        }
    }

    /// Whether a descriptor says `path` is a unary method: its answer is one message.
    pub(crate) fn is_unary(&self, path: &str) -> bool {
        self.lookup(path).shape == Shape::Unary
    }

    /// The handles for `path`: its own when known, else the unknown method's.
    pub(super) fn lookup(&self, path: &str) -> Arc<MethodMetrics> {
        match self.known.read().expect("metrics cache lock").get(path) {
            Some(found) => found.clone(),
            None => self.unknown.clone(),
        }
    }

    /// The handles for `path`, which was not known when its call started and ended with
    /// `code`: its own when that answer shows it is served, else none.
    pub(super) fn learn(&self, path: &str, code: tonic::Code) -> Option<Arc<MethodMetrics>> {
        if code == tonic::Code::Unimplemented {
            return None;
        }
        let service = path.strip_prefix('/')?.split_once('/')?.0;
        let learnable =
            self.learn_any || (self.services.contains(service) && !self.described.contains(service));
        if !learnable {
            return None;
        }
        let mut known = self.known.write().expect("metrics cache lock");
        if let Some(found) = known.get(path) {
            return Some(found.clone());
        }
        if known.len() >= MAX_LEARNED_METHODS {
            return None;
        }
        let entry = MethodMetrics::new(path, Shape::Undescribed);
        known.insert(path.to_owned(), entry.clone());
        Some(entry)
    }
}

/// A method an encoded `FileDescriptorSet` describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Described {
    /// `package.Service`.
    pub(crate) service: String,
    pub(crate) method: String,
    /// Whether either side streams.
    pub(crate) streaming: bool,
}

/// Every method in encoded `FileDescriptorSet`s.
pub(crate) fn described_methods(sets: &[&[u8]]) -> Vec<Described> {
    use prost::Message;
    // The few fields of descriptor.proto needed here; prost skips the others.
    #[derive(Clone, PartialEq, prost::Message)]
    struct FileSet {
        #[prost(message, repeated, tag = "1")]
        file: Vec<File>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct File {
        #[prost(string, optional, tag = "2")]
        package: Option<String>,
        #[prost(message, repeated, tag = "6")]
        service: Vec<GrpcService>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct GrpcService {
        #[prost(string, optional, tag = "1")]
        name: Option<String>,
        #[prost(message, repeated, tag = "2")]
        method: Vec<Method>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Method {
        #[prost(string, optional, tag = "1")]
        name: Option<String>,
        #[prost(bool, optional, tag = "5")]
        client_streaming: Option<bool>,
        #[prost(bool, optional, tag = "6")]
        server_streaming: Option<bool>,
    }
    let mut methods = Vec::new();
    for set in sets {
        let Ok(set) = FileSet::decode(*set) else { continue };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                let full = if package.is_empty() { name } else { format!("{package}.{name}") };
                for method in service.method {
                    let streaming = method.client_streaming.unwrap_or_default()
                        || method.server_streaming.unwrap_or_default();
                    methods.push(Described {
                        service: full.clone(),
                        method: method.name.unwrap_or_default(),
                        streaming,
                    });
                }
            }
        }
    }
    methods
}
