//! Per-method figures for the dashboard, from the instances' own metrics: each instance that
//! announces a metrics address (label `metrics`) is scraped at most every [`SCRAPE_EVERY`];
//! calls per second come from the change between two scrapes, the error ratio and the p50
//! and p99 latency from the calls of that interval (all calls so far until a second scrape
//! saw some). Bounded: only instances the registry lists are kept, each with at most
//! [`MAX_METHODS`] methods, and a scrape reads at most [`MAX_PAGE_BYTES`].

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use micro_core::{Node, labels};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How often one instance's metrics are read at most.
const SCRAPE_EVERY: Duration = Duration::from_secs(2);
/// How long a scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest metrics page read.
const MAX_PAGE_BYTES: u64 = 1 << 20;
/// The most methods kept per instance.
const MAX_METHODS: usize = 256;
/// The server's request counter and latency histogram (see `micro_core::metrics`).
const REQUESTS: &str = "micro_server_requests_total";
const DURATION_BUCKET: &str = "micro_server_request_duration_seconds_bucket";

/// What one method's calls add up to in one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
struct Counts {
    calls: f64,
    errors: f64,
    /// Cumulative histogram buckets: (upper bound in seconds, calls at or under it).
    buckets: Vec<(f64, f64)>,
}

impl Counts {
    /// `self` minus `earlier` (an earlier scrape of the same process).
    fn since(&self, earlier: &Counts) -> Counts {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, n)| {
                let before = earlier.buckets.iter().find(|(e, _)| e == le).map_or(0.0, |(_, n)| *n);
                (*le, (n - before).max(0.0))
            })
            .collect();
        Counts {
            calls: (self.calls - earlier.calls).max(0.0),
            errors: (self.errors - earlier.errors).max(0.0),
            buckets,
        }
    }

    fn add(&mut self, other: &Counts) {
        self.calls += other.calls;
        self.errors += other.errors;
        for (le, n) in &other.buckets {
            match self.buckets.iter_mut().find(|(e, _)| e == le) {
                Some((_, total)) => *total += n,
                None => self.buckets.push((*le, *n)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// The upper bound of the bucket holding quantile `q`, in milliseconds.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let (le, _) = self.buckets.iter().find(|(_, n)| *n >= q * total)?;
        le.is_finite().then_some(le * 1000.0)
    }
}

/// One scrape of an instance: its methods' counts and when it was taken.
#[derive(Debug, Clone)]
struct Scrape {
    taken: Instant,
    methods: BTreeMap<String, Counts>,
}

/// The last two scrapes of an instance.
#[derive(Debug, Default)]
struct Scrapes {
    previous: Option<Scrape>,
    latest: Option<Scrape>,
}

/// The scrapes of every instance listed, by instance id.
#[derive(Default)]
pub struct MethodStats(Mutex<HashMap<String, Scrapes>>);

/// One method of a service as the page shows it.
#[derive(Debug, Serialize, PartialEq)]
pub struct MethodFigures {
    pub method: String,
    /// Calls per second between the last two scrapes; `None` until there are two.
    pub calls_per_s: Option<f64>,
    pub error_ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl MethodStats {
    /// The figures of the methods of `nodes` (one service's instances), scraping those whose
    /// last scrape is older than [`SCRAPE_EVERY`].
    pub async fn service(&self, nodes: &[Node]) -> Vec<MethodFigures> {
        let due: Vec<(&Node, SocketAddr)> = nodes
            .iter()
            .filter_map(|node| Some((node, node.metadata.get(labels::METRICS)?.parse().ok()?)))
            .filter(|(node, _)| {
                let scrapes = self.0.lock().expect("method stats lock");
                scrapes
                    .get(&node.id)
                    .and_then(|s| s.latest.as_ref())
                    .is_none_or(|s| s.taken.elapsed() >= SCRAPE_EVERY)
            })
            .collect();
        let scraped = futures::future::join_all(
            due.into_iter().map(|(node, address)| async move { (node.id.clone(), scrape(address).await) }),
        )
        .await;
        let mut scrapes = self.0.lock().expect("method stats lock");
        for (id, methods) in scraped {
            let Some(methods) = methods else { continue };
            let entry = scrapes.entry(id).or_default();
            entry.previous = entry.latest.take();
            entry.latest = Some(Scrape { taken: Instant::now(), methods });
        }
        let mut calls: BTreeMap<String, (Counts, f64, bool)> = BTreeMap::new();
        for node in nodes {
            let Some(Scrapes { previous, latest: Some(latest) }) = scrapes.get(&node.id) else { continue };
            for (method, counts) in &latest.methods {
                let (total, per_s, timed) = calls.entry(method.clone()).or_default();
                let earlier = previous.as_ref().and_then(|p| Some((p.taken, p.methods.get(method)?)));
                match earlier {
                    Some((taken, before)) => {
                        let interval = counts.since(before);
                        *per_s +=
                            interval.calls / latest.taken.duration_since(taken).as_secs_f64().max(0.001);
                        *timed = true;
                        total.add(if interval.calls > 0.0 { &interval } else { counts });
                    }
                    None => total.add(counts),
                }
            }
        }
        calls
            .into_iter()
            .map(|(method, (counts, per_s, timed))| MethodFigures {
                method,
                calls_per_s: timed.then_some(per_s),
                error_ratio: (counts.calls > 0.0).then(|| counts.errors / counts.calls),
                p50_ms: counts.quantile_ms(0.5),
                p99_ms: counts.quantile_ms(0.99),
            })
            .collect()
    }

    /// Forgets every instance but those in `live`.
    pub fn retain(&self, live: &[&str]) {
        self.0.lock().expect("method stats lock").retain(|id, _| live.contains(&id.as_str()));
    }
}

/// The methods' counts on the metrics page at `address`; `None` when it cannot be read.
async fn scrape(address: SocketAddr) -> Option<BTreeMap<String, Counts>> {
    let page = tokio::time::timeout(SCRAPE_TIMEOUT, read_page(address)).await.ok()?.ok()?;
    Some(parse(&page))
}

async fn read_page(address: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut response = Vec::new();
    stream.take(MAX_PAGE_BYTES).read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_default();
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1).is_none_or(|code| code != "200") {
        return Err(std::io::Error::other("the metrics page was not answered 200"));
    }
    Ok(body.to_owned())
}

/// The request counts and latency buckets per method in a Prometheus text page.
fn parse(page: &str) -> BTreeMap<String, Counts> {
    let mut methods: BTreeMap<String, Counts> = BTreeMap::new();
    for line in page.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let Some((name, labels)) = series.split_once('{') else { continue };
        let labels = parse_labels(labels.trim_end_matches('}'));
        // The label is the call's path; the page shows `package.Service/Method`.
        let Some(method) = labels.get("method").map(|m| m.trim_start_matches('/').to_owned()) else {
            continue;
        };
        if !methods.contains_key(&method) && methods.len() >= MAX_METHODS {
            continue;
        }
        match name {
            REQUESTS => {
                let counts = methods.entry(method).or_default();
                counts.calls += value;
                if labels.get("code").is_some_and(|code| code != "OK") {
                    counts.errors += value;
                }
            }
            DURATION_BUCKET => {
                let le = labels.get("le").and_then(|le| le.parse::<f64>().ok());
                if let Some(le) = le {
                    methods.entry(method).or_default().buckets.push((le, value));
                }
            }
            _ => {}
        }
    }
    for counts in methods.values_mut() {
        counts.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    methods
}

/// `key="value",…` (with `\"` and `\\` escapes) as a map.
fn parse_labels(text: &str) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| if c == 'n' { '\n' } else { c })),
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP micro_server_requests_total Requests.
# TYPE micro_server_requests_total counter
micro_server_requests_total{method="/v.V/Find",code="OK"} 98
micro_server_requests_total{method="v.V/Find",code="Unavailable"} 2
micro_server_request_duration_seconds_bucket{method="v.V/Find",le="0.001"} 50
micro_server_request_duration_seconds_bucket{method="v.V/Find",le="0.01"} 99
micro_server_request_duration_seconds_bucket{method="v.V/Find",le="+Inf"} 100
micro_client_requests_total{service="x",method="a.B/C",code="OK"} 7
"#;

    #[test]
    fn a_page_gives_each_methods_calls_errors_and_quantiles() {
        let methods = parse(PAGE);
        let find = &methods["v.V/Find"];
        assert_eq!((find.calls, find.errors), (100.0, 2.0));
        assert_eq!(find.quantile_ms(0.5), Some(1.0));
        assert_eq!(find.quantile_ms(0.99), Some(10.0));
        assert!(!methods.contains_key("a.B/C"), "client series are not the server's methods");
    }

    #[test]
    fn an_interval_is_the_difference_of_two_scrapes() {
        let before = parse(PAGE)["v.V/Find"].clone();
        let later = PAGE.replace("} 98", "} 198").replace("} 100", "} 200").replace("} 99", "} 199");
        let after = parse(&later)["v.V/Find"].clone();
        let interval = after.since(&before);
        assert_eq!((interval.calls, interval.errors), (100.0, 0.0));
        assert_eq!(interval.quantile_ms(0.99), Some(10.0));
    }

    #[test]
    fn labels_with_escapes_are_read() {
        let labels = parse_labels(r#"method="a\"b",code="OK""#);
        assert_eq!(labels["method"], "a\"b");
        assert_eq!(labels["code"], "OK");
    }
}
