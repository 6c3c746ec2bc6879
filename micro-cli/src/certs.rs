//! `micro certs NAME...`: a development CA (made once, reused after) and a short-lived
//! certificate per service in one folder, for mDNS, etcd and DNS set-ups without a CA of
//! their own. Each certificate names its service twice: as a DNS name (what a client checks
//! when it calls the service by name) and as the SPIFFE id `spiffe://TRUST_DOMAIN/svc/NAME`
//! (what a server's authorization policy checks when the service calls). Run it again
//! before they expire: servers and clients read the files at start.
//!
//! # Examples
//! ```sh
//! micro certs --dir certs vessel-service consignment-service consignment-cli
//! MICRO_TLS_CA=certs/ca.pem MICRO_TLS_CERT=certs/vessel-service.pem \
//!   MICRO_TLS_KEY=certs/vessel-service-key.pem vessel-service
//! ```

use std::{path::PathBuf, time::Duration};

use micro_core::{auth::certs::Authority, cli::Seconds};

use crate::exit::Failure;

/// Default trust domain of the SPIFFE ids.
pub const DEFAULT_TRUST_DOMAIN: &str = "micro.local";
/// Default lifetime of a service certificate: one day.
pub const DEFAULT_VALID_FOR_SECS: u64 = 24 * 3600;
/// Lifetime of a new CA: a year.
const CA_VALID_FOR: Duration = Duration::from_secs(365 * 24 * 3600);

/// `micro certs`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// The services to make certificates for (their registered names).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// The folder to write into: ca.pem and ca-key.pem (reused when there), NAME.pem and
    /// NAME-key.pem.
    #[arg(long, env = "MICRO_CERTS_DIR", default_value = "certs")]
    pub dir: PathBuf,
    /// The trust domain of the SPIFFE ids (`spiffe://TRUST_DOMAIN/svc/NAME`).
    #[arg(long, env = "MICRO_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// How long each service certificate is valid; a bare number is seconds.
    #[arg(long, default_value_t = Seconds::from_units(DEFAULT_VALID_FOR_SECS))]
    pub valid_for: Seconds,
}

/// Writes the CA (unless there) and a certificate and key per name; prints each file.
pub fn certs(args: CertsArgs) -> Result<(), Failure> {
    let failed = |what: String| Failure::Other(what);
    std::fs::create_dir_all(&args.dir)
        .map_err(|err| failed(format!("cannot make {}: {err}", args.dir.display())))?;
    let (ca_path, ca_key_path) = (args.dir.join("ca.pem"), args.dir.join("ca-key.pem"));
    let authority = match (std::fs::read_to_string(&ca_path), std::fs::read_to_string(&ca_key_path)) {
        (Ok(certificate), Ok(key)) => {
            eprintln!("using the CA in {}", ca_path.display());
            Authority::load(&args.trust_domain, &certificate, &key)?
        }
        _ => {
            let authority = Authority::new(&args.trust_domain, CA_VALID_FOR)?;
            write(&ca_path, authority.certificate_pem(), false)?;
            write(&ca_key_path, authority.key_pem(), true)?;
            authority
        }
    };
    let valid_for: Duration = args.valid_for.into();
    for name in &args.names {
        let (certificate, key) = authority.issue(name, valid_for)?;
        write(&args.dir.join(format!("{name}.pem")), &certificate, false)?;
        write(&args.dir.join(format!("{name}-key.pem")), &key, true)?;
    }
    eprintln!(
        "{} certificate(s) valid for {valid_for:?}, SPIFFE ids spiffe://{}/svc/NAME",
        args.names.len(),
        args.trust_domain
    );
    Ok(())
}

/// Writes `text` to `path` (readable by the owner only when `private`) and prints the path.
fn write(path: &std::path::Path, text: &str, private: bool) -> Result<(), Failure> {
    std::fs::write(path, text)
        .map_err(|err| Failure::Other(format!("cannot write {}: {err}", path.display())))?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|err| Failure::Other(format!("cannot restrict {}: {err}", path.display())))?;
    }
    println!("{}", path.display());
    Ok(())
}
