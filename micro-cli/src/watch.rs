//! `micro watch [NAME...]`: one line per registry change until SIGINT/SIGTERM.

use std::{collections::HashSet, sync::Arc, time::Duration};

use futures::StreamExt;
use micro_core::{Registry, error::error_chain, registry::Change};

use crate::{Output, exit::Failure, lookup, out};

/// Width of the address column: `255.255.255.255:65535`.
const ADDRESS_WIDTH: usize = 21;

/// Prints each change of the watched names, one line each, until SIGINT/SIGTERM. With no
/// names, watches every registered name and picks up new ones every 2 s. A name that is not
/// registered yet is watched anyway, with a note when a registered name is close to it.
pub async fn watch(registry: Arc<dyn Registry>, names: Vec<String>, output: Output) -> Result<(), Failure> {
    let (sender, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let mut watched = HashSet::new();
    let mut relist = tokio::time::interval(Duration::from_secs(2));
    let shutdown = micro_core::server::shutdown_signal();
    tokio::pin!(shutdown);
    if !names.is_empty() {
        let registered = registry.list_services().await.map_err(Failure::from)?;
        for name in names.iter().filter(|n| !registered.contains(n)) {
            if let Some(near) = lookup::suggestion(name, &registered) {
                eprintln!(
                    "note: {name} is not registered in {}; did you mean {near}? watching {name}",
                    registry.kind()
                );
            }
        }
    }
    // Names are padded to the longest seen so far; ids are `<name>-<12 hex digits>`.
    let mut name_width = names.iter().map(String::len).max().unwrap_or(0).max(12);
    let mut header_printed = false;
    loop {
        tokio::select! {
            _ = relist.tick() => {
                let wanted = if names.is_empty() { registry.list_services().await.unwrap_or_default() } else { names.clone() };
                for name in wanted {
                    if watched.insert(name.clone()) {
                        name_width = name_width.max(name.len());
                        let mut stream = registry.watch(&name);
                        let sender = sender.clone();
                        tokio::spawn(async move {
                            while let Some(change) = stream.next().await {
                                if sender.send((name.clone(), change)).is_err() { return; }
                            }
                        });
                    }
                }
                if output == Output::Table && !header_printed {
                    header_printed = true;
                    out::line(row(["EVENT", "NAME", "ID", "ADDRESS", "VERSION"], name_width));
                }
            }
            Some((name, change)) = changes.recv() => {
                let line = match (change, output) {
                    (Ok(Change::Insert(_, node)), Output::Json) => {
                        let event = if node.draining { "draining" } else { "up" };
                        serde_json::json!({ "event": event, "node": node }).to_string()
                    }
                    (Ok(Change::Remove(id)), Output::Json) => serde_json::json!({ "event": "down", "name": name, "id": id }).to_string(),
                    (Err(err), Output::Json) => serde_json::json!({ "event": "error", "name": name, "error": error_chain(&err) }).to_string(),
                    (Ok(Change::Insert(_, node)), Output::Table) => {
                        let state = if node.draining { "draining" } else { "up" };
                        row([state, &name, &node.id, &node.address.to_string(), &node.version], name_width)
                    }
                    (Ok(Change::Remove(id)), Output::Table) => row(["down", &name, &id, "", ""], name_width),
                    (Err(err), Output::Table) => row(["error", &name, &error_chain(&err), "", ""], name_width),
                };
                out::line(line);
            }
            _ = &mut shutdown => return Ok(()),
        }
    }
}

fn row(cells: [&str; 5], name_width: usize) -> String {
    let [event, name, id, address, version] = cells;
    let id_width = name_width + 13;
    format!("{event:<8}  {name:<name_width$}  {id:<id_width$}  {address:<ADDRESS_WIDTH$}  {version}")
        .trim_end()
        .to_owned()
}
