//! API keys from a file: one key a line, as its name and the SHA-256 of the key, so the
//! file holds no key itself:
//! ```text
//! # name        sha256 of the key (printf %s "$KEY" | sha256sum)
//! ci-deploy     sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
//! ```
//! A presented key is hashed and compared with every entry in constant time; its subject
//! is `apikey:<name>`.

use std::path::Path;

use ring::digest;
use subtle::ConstantTimeEq;

use super::{MAX_CREDENTIAL_BYTES, Rejection};

/// The longest key name taken.
const MAX_NAME_BYTES: usize = 64;
/// The prefix of a key's hash in the file.
const HASH_PREFIX: &str = "sha256:";

/// The configured API keys; see the module docs.
#[derive(Debug)]
pub struct ApiKeys {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    name: String,
    hash: [u8; 32],
}

impl ApiKeys {
    /// Reads the file at `path`; errors name the file and the line.
    pub fn read(path: &Path) -> Result<ApiKeys, String> {
        let what = format!("--api-keys-file {} (MICRO_GATEWAY_API_KEYS_FILE)", path.display());
        let text = std::fs::read_to_string(path).map_err(|err| format!("{what}: cannot read it: {err}"))?;
        ApiKeys::parse(&text).map_err(|err| format!("{what}: {err}"))
    }

    /// Parses the file's text; see the module docs.
    pub fn parse(text: &str) -> Result<ApiKeys, String> {
        let mut entries: Vec<Entry> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}", index + 1);
            let mut fields = line.split_whitespace();
            let (Some(name), Some(hash), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(bad("expected `<name> sha256:<64 hex digits>`"));
            };
            let name_ok = name.len() <= MAX_NAME_BYTES
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
            if !name_ok {
                return Err(bad("a name is up to 64 of A-Z a-z 0-9 . _ - @"));
            }
            let hash = hash
                .strip_prefix(HASH_PREFIX)
                .and_then(parse_hex)
                .ok_or_else(|| bad("expected sha256:<64 hex digits> (printf %s \"$KEY\" | sha256sum)"))?;
            if entries.iter().any(|entry| entry.name == name) {
                return Err(bad(&format!("the name {name:?} is given twice")));
            }
            entries.push(Entry { name: name.to_owned(), hash });
        }
        if entries.is_empty() {
            return Err("no key in it".into());
        }
        Ok(ApiKeys { entries })
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The subject (`apikey:<name>`) of the key `presented`.
    pub fn verify(&self, presented: &str) -> Result<String, Rejection> {
        if presented.len() > MAX_CREDENTIAL_BYTES {
            return Err(Rejection::TooLarge);
        }
        let hash = digest::digest(&digest::SHA256, presented.as_bytes());
        // Every entry is compared, whichever matches.
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.hash.ct_eq(hash.as_ref())) {
                found = Some(&entry.name);
            }
        }
        let name = found.ok_or(Rejection::UnknownApiKey)?;
        Ok(format!("{}{name}", micro_core::auth::subject::API_KEY_PREFIX))
    }
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(key: &str) -> String {
        let hash = digest::digest(&digest::SHA256, key.as_bytes());
        hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_listed_key_names_its_subject_and_others_are_unknown() {
        let text =
            format!("# keys\nci sha256:{}\n\nops@team  sha256:{}\n", hash_of("k-one"), hash_of("k-two"));
        let keys = ApiKeys::parse(&text).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.verify("k-one").unwrap(), "apikey:ci");
        assert_eq!(keys.verify("k-two").unwrap(), "apikey:ops@team");
        assert_eq!(keys.verify("k-three"), Err(Rejection::UnknownApiKey));
        assert_eq!(keys.verify(""), Err(Rejection::UnknownApiKey));
        assert_eq!(keys.verify(&"k".repeat(MAX_CREDENTIAL_BYTES + 1)), Err(Rejection::TooLarge));
    }

    #[test]
    fn bad_lines_are_named_without_echoing_them() {
        let good = hash_of("x");
        for (text, says) in [
            ("ci plain-key".to_owned(), "line 1"),
            (format!("ci sha256:{}", &good[..10]), "64 hex"),
            (format!("\nbad/name sha256:{good}"), "line 2"),
            (format!("ci sha256:{good}\nci sha256:{good}"), "twice"),
            (format!("ci sha256:{good} extra"), "expected"),
            ("# nothing\n".to_owned(), "no key"),
        ] {
            let err = ApiKeys::parse(&text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
            assert!(!err.contains("plain-key"), "the key is not echoed: {err}");
        }
    }
}
