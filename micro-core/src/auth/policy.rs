//! Who may call what: rules of caller × method, allow or deny.
//!
//! A policy file (YAML, or JSON, which YAML reads too):
//! ```yaml
//! rules:
//!   - callers: ["spiffe://shippy/svc/consignment-service"]   # or "spiffe://shippy/svc/*", "*", "anonymous"
//!     methods: ["vessel.VesselService/*"]                      # or "package.Service/Method", "*"
//!     effect: allow                                            # or deny
//! ```
//! A call is denied when a `deny` rule matches it, else allowed when an `allow` rule
//! matches it, else denied: once a policy is set, what it does not allow is refused.
//! `anonymous` matches a caller without a certificate (possible only where client
//! certificates are optional); `*` matches every caller with one.
//!
//! The gateway decides with the subject it authenticated as the caller: `jwt:<sub>`,
//! `apikey:<name>`, or every subject of a kind with `jwt:*`, `apikey:*` (`*` matches
//! every authenticated subject there). A service behind the gateway can require the
//! subject the gateway vouches for (the `x-micro-subject` metadata) with `subjects`; such a
//! rule matches only calls from its `callers` that carry one of those subjects:
//! ```yaml
//!   - callers: ["spiffe://shippy/svc/gateway"]
//!     subjects: ["jwt:alice", "apikey:*"]
//!     methods: ["vessel.VesselService/FindAvailable"]
//!     effect: allow
//! ```
//!
//! # Examples
//! ```
//! use micro_core::auth::Policy;
//! let policy = Policy::from_yaml(r#"{"rules": [{"callers": ["*"], "methods": ["*"], "effect": "allow"},
//!                                              {"callers": ["*"], "methods": ["vessel.VesselService/Release"], "effect": "deny"}]}"#).unwrap();
//! assert!(policy.decide(Some("spiffe://td/svc/a"), "/vessel.VesselService/Reserve").allowed);
//! assert!(!policy.decide(Some("spiffe://td/svc/a"), "/vessel.VesselService/Release").allowed);
//! ```

use serde::Deserialize;

use super::subject::is_subject;
use crate::{Error, Result};

/// The caller pattern for callers without a certificate.
pub const ANONYMOUS: &str = "anonymous";

/// What a rule does with the calls it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// The call is allowed (unless a deny rule matches it too).
    Allow,
    /// The call is refused, whatever else matches.
    Deny,
}

/// One rule: which callers, which methods, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Caller patterns: a SPIFFE id, one ending in `/*` (every id under it), `*` (every
    /// caller with a certificate) or `anonymous`; at the gateway, a subject (`jwt:<sub>`,
    /// `apikey:<name>`, `jwt:*`, `apikey:*`).
    pub callers: Vec<String>,
    /// Subject patterns (`jwt:<sub>`, `apikey:<name>`, `jwt:*`, `apikey:*`, `*`): when
    /// given, the rule matches only calls carrying such a subject in `x-micro-subject`,
    /// which its callers vouch for. Default: none, any call of its callers matches.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Method patterns: `package.Service/Method`, `package.Service/*` or `*`.
    pub methods: Vec<String>,
    /// Allow or deny.
    pub effect: Effect,
}

/// A set of rules; see the module docs for how they decide.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The rules, in any order (a deny wins over an allow).
    pub rules: Vec<Rule>,
}

/// The outcome of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the call may go ahead.
    pub allowed: bool,
    /// Why: the rule that decided (its number, from 1), or that none matched.
    pub reason: String,
}

impl Policy {
    /// Parses a policy from YAML (or JSON) text and checks every pattern.
    pub fn from_yaml(text: &str) -> Result<Policy> {
        let policy: Policy = serde_norway::from_str(text)
            .map_err(|err| Error::invalid("authorization policy", err.to_string()))?;
        policy.check()?;
        Ok(policy)
    }

    /// Reads and parses the policy file at `path`; errors name the file.
    pub fn from_file(path: &std::path::Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::invalid(format!("MICRO_AUTHZ_POLICY={}", path.display()), format!("cannot read it: {err}"))
        })?;
        Policy::from_yaml(&text).map_err(|err| {
            Error::invalid(format!("MICRO_AUTHZ_POLICY={}", path.display()), crate::error::error_chain(&err))
        })
    }

    fn check(&self) -> Result<()> {
        for (index, rule) in self.rules.iter().enumerate() {
            let number = index + 1;
            let bad = |what: String| Error::invalid(format!("authorization policy rule {number}"), what);
            if rule.callers.is_empty() || rule.methods.is_empty() {
                return Err(bad("needs at least one caller and one method".into()));
            }
            for caller in &rule.callers {
                if !(caller == "*"
                    || caller == ANONYMOUS
                    || caller.starts_with("spiffe://")
                    || is_subject(caller))
                {
                    return Err(bad(format!(
                        "caller {caller:?}: expected a spiffe:// id, one ending in /*, * or anonymous, \
                         or a subject at the gateway (jwt:<sub>, apikey:<name>, jwt:*, apikey:*)"
                    )));
                }
            }
            for subject in &rule.subjects {
                if !(subject == "*" || is_subject(subject)) {
                    return Err(bad(format!(
                        "subject {subject:?}: expected jwt:<sub>, apikey:<name>, jwt:*, apikey:* or *"
                    )));
                }
            }
            for method in &rule.methods {
                let well_formed = method == "*"
                    || method.split_once('/').is_some_and(|(service, name)| {
                        !service.is_empty()
                            && !name.is_empty()
                            && !service.starts_with('/')
                            && !name.contains('/')
                    });
                if !well_formed {
                    return Err(bad(format!(
                        "method {method:?}: expected package.Service/Method, package.Service/* or *"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether `caller` (a SPIFFE id, or at the gateway a subject; `None` without either)
    /// may call `path` (`/package.Service/Method`). Rules with `subjects` never match.
    pub fn decide(&self, caller: Option<&str>, path: &str) -> Decision {
        self.decide_vouched(caller, None, path)
    }

    /// Whether `caller` may call `path` carrying `subject`, the end user it vouches for
    /// (`x-micro-subject`, set by the gateway).
    pub fn decide_vouched(&self, caller: Option<&str>, subject: Option<&str>, path: &str) -> Decision {
        let method = path.strip_prefix('/').unwrap_or(path);
        let matching = |effect: Effect| {
            self.rules.iter().position(|rule| {
                rule.effect == effect
                    && rule.callers.iter().any(|pattern| caller_matches(pattern, caller))
                    && (rule.subjects.is_empty()
                        || rule
                            .subjects
                            .iter()
                            .any(|pattern| subject.is_some_and(|s| subject_matches(pattern, s))))
                    && rule.methods.iter().any(|pattern| method_matches(pattern, method))
            })
        };
        if let Some(index) = matching(Effect::Deny) {
            return Decision { allowed: false, reason: format!("denied by rule {}", index + 1) };
        }
        if let Some(index) = matching(Effect::Allow) {
            return Decision { allowed: true, reason: format!("allowed by rule {}", index + 1) };
        }
        Decision { allowed: false, reason: "no rule allows it (default deny)".into() }
    }
}

fn caller_matches(pattern: &str, caller: Option<&str>) -> bool {
    match (pattern, caller) {
        (ANONYMOUS, None) => true,
        (_, None) => false,
        ("*", Some(_)) => true,
        (pattern, Some(caller)) if is_subject(pattern) => subject_matches(pattern, caller),
        (pattern, Some(caller)) => match pattern.strip_suffix("/*") {
            Some(prefix) => caller.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/')),
            None => pattern == caller,
        },
    }
}

/// `jwt:*` and `apikey:*` match every subject of their kind; `*` every subject.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    match pattern.strip_suffix('*') {
        _ if pattern == "*" => true,
        Some(kind) if kind.ends_with(':') => subject.strip_prefix(kind).is_some_and(|name| !name.is_empty()),
        _ => pattern == subject,
    }
}

fn method_matches(pattern: &str, method: &str) -> bool {
    match pattern.strip_suffix("/*") {
        _ if pattern == "*" => true,
        Some(service) => method.strip_prefix(service).is_some_and(|rest| rest.starts_with('/')),
        None => pattern == method,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::from_yaml(text).unwrap()
    }

    #[test]
    fn deny_wins_and_nothing_matched_is_denied() {
        let policy = policy(
            "rules:
               - {callers: ['spiffe://td/svc/*'], methods: ['vessel.VesselService/*'], effect: allow}
               - {callers: ['spiffe://td/svc/cli'], methods: ['vessel.VesselService/Reserve'], effect: deny}",
        );
        let allowed = |caller: Option<&str>, path: &str| policy.decide(caller, path).allowed;
        assert!(allowed(Some("spiffe://td/svc/consignment"), "/vessel.VesselService/Reserve"));
        assert!(allowed(Some("spiffe://td/svc/cli"), "/vessel.VesselService/FindAvailable"));
        assert!(!allowed(Some("spiffe://td/svc/cli"), "/vessel.VesselService/Reserve"), "deny wins");
        assert!(!allowed(Some("spiffe://other/svc/consignment"), "/vessel.VesselService/Reserve"));
        assert!(
            !allowed(Some("spiffe://td/svcx"), "/vessel.VesselService/Reserve"),
            "prefix on a / boundary"
        );
        assert!(!allowed(Some("spiffe://td/svc/a"), "/vessel.VesselServiceX/Reserve"));
        assert!(!allowed(None, "/vessel.VesselService/Reserve"));
        assert_eq!(policy.decide(None, "/x.Y/Z").reason, "no rule allows it (default deny)");
    }

    #[test]
    fn anonymous_and_star() {
        let policy = policy("rules: [{callers: [anonymous], methods: ['*'], effect: allow}]");
        assert!(policy.decide(None, "/a.B/C").allowed);
        assert!(
            !policy.decide(Some("spiffe://td/svc/a"), "/a.B/C").allowed,
            "anonymous is only the certless"
        );
    }

    #[test]
    fn subjects_at_the_gateway_and_vouched_for_behind_it() {
        let policy = policy(
            "rules:
               - {callers: ['jwt:*'], methods: ['vessel.VesselService/*'], effect: allow}
               - {callers: ['jwt:mallory'], methods: ['*'], effect: deny}
               - {callers: ['apikey:ci'], methods: ['vessel.VesselService/FindAvailable'], effect: allow}
               - {callers: ['spiffe://td/svc/gateway'], subjects: ['jwt:alice', 'apikey:*'],
                  methods: ['echo.Echo/*'], effect: allow}",
        );
        let allowed = |caller: &str, path: &str| policy.decide(Some(caller), path).allowed;
        assert!(allowed("jwt:alice", "/vessel.VesselService/Reserve"));
        assert!(!allowed("jwt:mallory", "/vessel.VesselService/Reserve"), "deny wins");
        assert!(!allowed("jwt:", "/vessel.VesselService/Reserve"), "a kind needs a name");
        assert!(allowed("apikey:ci", "/vessel.VesselService/FindAvailable"));
        assert!(!allowed("apikey:ci", "/vessel.VesselService/Reserve"));
        assert!(!allowed("apikey:jwt:alice", "/vessel.VesselService/Reserve"), "kinds do not mix");
        assert!(!allowed("spiffe://td/svc/gateway", "/echo.Echo/Say"), "a subject rule needs a subject");
        let vouched = |subject: &str| {
            policy.decide_vouched(Some("spiffe://td/svc/gateway"), Some(subject), "/echo.Echo/Say")
        };
        assert!(vouched("jwt:alice").allowed);
        assert!(vouched("apikey:ops").allowed);
        assert!(!vouched("jwt:bob").allowed);
        assert!(
            !policy
                .decide_vouched(Some("spiffe://td/svc/other"), Some("jwt:alice"), "/echo.Echo/Say")
                .allowed,
            "only the callers named vouch"
        );
    }

    #[test]
    fn bad_rules_are_named() {
        for (text, expected) in [
            ("rules: [{callers: [bob], methods: ['*'], effect: allow}]", "rule 1"),
            ("rules: [{callers: ['*'], methods: [Reserve], effect: allow}]", "package.Service/Method"),
            ("rules: [{callers: ['*'], methods: ['*'], effect: maybe}]", "maybe"),
            ("rules: [{callers: ['*'], methods: ['*'], effect: allow, extra: 1}]", "extra"),
            ("rules: [{callers: [], methods: ['*'], effect: allow}]", "at least one caller"),
            (
                "rules: [{callers: ['*'], subjects: [alice], methods: ['*'], effect: allow}]",
                "subject \"alice\"",
            ),
            ("rules: [{callers: ['jwt:'], methods: ['*'], effect: allow}]", "jwt:<sub>"),
        ] {
            let err = crate::error::error_chain(&Policy::from_yaml(text).unwrap_err());
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
