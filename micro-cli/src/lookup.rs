//! Finding a name, the way every command that takes one does: at once when the registry
//! lists other names but not this one, with the registered name closest to a typo.

use std::sync::Arc;

use micro_core::{Error, Node, Registry, error::error_chain};

use crate::exit::Failure;

/// How long after a listing without the name a second listing confirms it is not there.
const RELIST_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// The instances of `name`. When the registry lists names but not `name`, fails at once
/// (no look-up timeout) with [`Failure::NotFound`], suggesting the closest registered name.
pub async fn find(registry: &Arc<dyn Registry>, name: &str) -> Result<Vec<Node>, Failure> {
    // Two listings a moment apart must both lack the name, so an instance whose mDNS answer
    // comes a little after the others' is still found.
    let elsewhere = async {
        let mut absent_before = false;
        loop {
            match registry.list_services().await {
                Ok(names) if !names.is_empty() && !names.iter().any(|n| n == name) => {
                    if absent_before {
                        return names;
                    }
                    absent_before = true;
                }
                _ => absent_before = false,
            }
            tokio::time::sleep(RELIST_AFTER).await;
        }
    };
    tokio::select! {
        found = registry.lookup(name) => match found {
            Ok(nodes) => Ok(nodes),
            Err(err) => Err(missing(registry, name, err).await),
        },
        names = elsewhere => Err(not_found(registry, name, &names)),
    }
}

/// The failure for a look-up of `name` that failed with `err`, suggesting a near name.
pub async fn missing(registry: &Arc<dyn Registry>, name: &str, err: Error) -> Failure {
    match err {
        Error::NoInstance { .. } => {
            let names = registry.list_services().await.unwrap_or_default();
            not_found(registry, name, &names)
        }
        err => Failure::from(err),
    }
}

fn not_found(registry: &Arc<dyn Registry>, name: &str, names: &[String]) -> Failure {
    let mut message =
        error_chain(&Error::NoInstance { service: name.into(), registry: registry.kind().to_string() });
    if let Some(near) = suggestion(name, names) {
        message = format!("no instance of {name} in registry {}: did you mean {near}?", registry.kind());
    } else if names.is_empty() {
        message.push_str(&format!(" (no services registered in registry {})", registry.kind()));
    } else {
        message.push_str(&format!(" (registered: {})", names.join(", ")));
    }
    Failure::NotFound(message)
}

/// The registered name closest to `name` within two edits, if any.
pub fn suggestion<'a>(name: &str, names: &'a [String]) -> Option<&'a str> {
    names
        .iter()
        .filter(|n| *n != name)
        .map(|n| (edit_distance(n, name), n))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, n)| n.as_str())
}

/// Levenshtein distance in characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_registered_name_is_suggested() {
        let names = ["consignment-service".to_owned(), "vessel-service".to_owned(), "consul".to_owned()];
        assert_eq!(suggestion("vesel-service", &names), Some("vessel-service"));
        assert_eq!(suggestion("vessel-servicf", &names), Some("vessel-service"));
        assert_eq!(suggestion("greeter", &names), None);
        assert_eq!(suggestion("vessel-service", &names), None, "the name itself is no suggestion");
    }
}
