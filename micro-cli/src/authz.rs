//! `micro authz check CALLER SERVICE METHOD`: what a policy file decides for a call, and
//! which rule decided it.
//!
//! # Examples
//! ```sh
//! micro authz check --policy policy.yaml consignment-service vessel-service vessel.VesselService/Reserve
//! # allowed: spiffe://micro.local/svc/consignment-service may call vessel.VesselService/Reserve on vessel-service (allowed by rule 1)
//! ```

use std::path::PathBuf;

use micro_core::auth::{Policy, spiffe_id};

use crate::exit::Failure;

/// `micro authz`'s subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AuthzCommand {
    /// Explains the policy's decision for one caller, service and method; exits 0 when
    /// allowed, 1 when denied.
    Check {
        /// The caller: a SPIFFE id, `anonymous`, a gateway subject (`jwt:<sub>`,
        /// `apikey:<name>`), or a service name (made an id with `--trust-domain`).
        caller: String,
        /// The service called (its registered name), for the explanation.
        service: String,
        /// The method: `package.Service/Method`.
        method: String,
        /// The policy file.
        #[arg(long, env = "MICRO_AUTHZ_POLICY")]
        policy: PathBuf,
        /// The trust domain a bare service name as caller is in.
        #[arg(long, env = "MICRO_TRUST_DOMAIN", default_value = crate::certs::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

/// Runs an `authz` subcommand.
pub fn authz(command: AuthzCommand) -> Result<(), Failure> {
    let AuthzCommand::Check { caller, service, method, policy, trust_domain } = command;
    let policy = Policy::from_file(&policy)?;
    let caller = match caller.as_str() {
        micro_core::auth::policy::ANONYMOUS => None,
        id if id.starts_with("spiffe://") || micro_core::auth::subject::is_subject(id) => Some(id.to_owned()),
        name => Some(spiffe_id(&trust_domain, name)),
    };
    let path = format!("/{}", method.trim_start_matches('/'));
    let decision = policy.decide(caller.as_deref(), &path);
    let shown = caller.as_deref().unwrap_or("a caller without a certificate");
    let method = path.trim_start_matches('/');
    if decision.allowed {
        println!("allowed: {shown} may call {method} on {service} ({})", decision.reason);
        Ok(())
    } else {
        Err(Failure::Other(format!(
            "denied: {shown} may not call {method} on {service} ({})",
            decision.reason
        )))
    }
}
