//! One-shot legacy-unicast queries (RFC 6762 §6.7). A query sent from a port other than
//! 5353 is answered by unicast straight back to that port, and responders do not hold it
//! back the way they limit multicast answers to one a second per record. A fresh process
//! uses it to hear every instance at once instead of waiting for the next multicast round.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use simple_dns::{CLASS, Name, Packet, Question, TYPE, rdata::RData};
use tokio::{net::UdpSocket, time::Instant};

use super::{MDNS_GROUP, SERVICE_TYPE, decode_txt};
use crate::registry::Node;

/// Sends one PTR query for [`SERVICE_TYPE`] on every IPv4 interface and collects the
/// instances answered within `window`, keyed by lower-case full name.
pub(super) async fn query(window: Duration) -> std::io::Result<HashMap<String, Node>> {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into())?;
    let interfaces: Vec<Ipv4Addr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| match i.ip() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
        .collect();
    let mut packet = Packet::new_query(rand::random());
    let service = SERVICE_TYPE.trim_end_matches('.');
    packet.questions.push(Question::new(
        Name::new_unchecked(service),
        TYPE::PTR.into(),
        CLASS::IN.into(),
        false,
    ));
    let bytes = packet.build_bytes_vec_compressed().map_err(std::io::Error::other)?;
    let mut sent = 0;
    for interface in &interfaces {
        if socket.set_multicast_if_v4(interface).is_ok() && socket.send_to(&bytes, &MDNS_GROUP.into()).is_ok()
        {
            sent += 1;
        }
    }
    if sent == 0 {
        return Err(std::io::Error::other("no interface could send an mDNS query"));
    }
    let socket = UdpSocket::from_std(socket.into())?;

    let mut answers = Answers::default();
    let deadline = Instant::now() + window;
    let mut buffer = vec![0u8; 9000];
    while let Ok(Ok((len, _))) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buffer)).await {
        if let Ok(reply) = Packet::parse(&buffer[..len]) {
            answers.add(&reply);
        }
    }
    Ok(answers.nodes())
}

/// The most records of each kind one query keeps, whatever the responders send in its
/// window: twice the instances the cache keeps.
const MAX_ANSWERED: usize = 2 * super::MAX_MDNS_INSTANCES;

/// Inserts unless `map` is full and `key` new.
fn insert_bounded<V>(map: &mut HashMap<String, V>, key: String, value: V) {
    if map.len() < MAX_ANSWERED || map.contains_key(&key) {
        map.insert(key, value);
    }
}

/// Records gathered from the answers, by owner name, at most [`MAX_ANSWERED`] of each kind.
#[derive(Default)]
struct Answers {
    instances: Vec<String>,
    services: HashMap<String, (String, u16)>,
    texts: HashMap<String, Vec<(String, String)>>,
    hosts: HashMap<String, Ipv4Addr>,
}

impl Answers {
    fn add(&mut self, reply: &Packet<'_>) {
        for record in reply.answers.iter().chain(&reply.additional_records) {
            let owner = record.name.to_string().to_lowercase();
            match &record.rdata {
                RData::PTR(instance) if self.instances.len() < MAX_ANSWERED => {
                    self.instances.push(instance.0.to_string().to_lowercase())
                }
                RData::SRV(srv) => {
                    let target = (srv.target.to_string().to_lowercase(), srv.port);
                    insert_bounded(&mut self.services, owner, target);
                }
                RData::TXT(txt) => {
                    let entries =
                        txt.attributes().into_iter().map(|(k, v)| (k, v.unwrap_or_default())).collect();
                    insert_bounded(&mut self.texts, owner, entries);
                }
                RData::A(a) => insert_bounded(&mut self.hosts, owner, Ipv4Addr::from(a.address)),
                _ => {}
            }
        }
    }

    fn nodes(self) -> HashMap<String, Node> {
        let mut nodes = HashMap::new();
        for instance in self.instances {
            let (Some((host, port)), Some(text)) = (self.services.get(&instance), self.texts.get(&instance))
            else {
                continue;
            };
            let Some(ip) = self.hosts.get(host) else { continue };
            let entries = text.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            if let Some(node) = decode_txt(entries, SocketAddr::new(IpAddr::V4(*ip), *port)) {
                nodes.insert(format!("{instance}."), node);
            }
        }
        nodes
    }
}
