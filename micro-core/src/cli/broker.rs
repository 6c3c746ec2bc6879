//! Broker flags: `--broker` / `MICRO_BROKER` and `--broker-address` / `MICRO_BROKER_ADDRESS`.

use clap::Args;

use crate::config::{BrokerConfig, BrokerKind};

/// Broker flags, for binaries that publish or subscribe.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Message broker backend.
    #[arg(long, global = true, env = "MICRO_BROKER", value_enum, default_value_t = BrokerKind::Registry)]
    pub broker: BrokerKind,
    /// Broker address (nats: host:port, default 127.0.0.1:4222; rabbitmq: host:port or
    /// amqp://user:password@host:port/vhost, default 127.0.0.1:5672); registry and memory ignore it.
    #[arg(long, global = true, env = "MICRO_BROKER_ADDRESS")]
    pub broker_address: Option<String>,
}

impl From<BrokerArgs> for BrokerConfig {
    fn from(args: BrokerArgs) -> Self {
        BrokerConfig { kind: args.broker, address: args.broker_address }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        broker: BrokerArgs,
    }

    #[test]
    fn default_is_the_registry_broker_and_flags_beat_it() {
        let config = BrokerConfig::from(Cli::parse_from(["t"]).broker);
        assert_eq!(config, BrokerConfig::default());
        let cli = Cli::parse_from(["t", "--broker", "memory", "--broker-address", "h:1"]);
        let config = BrokerConfig::from(cli.broker);
        assert_eq!((config.kind, config.address.as_deref()), (BrokerKind::Memory, Some("h:1")));
    }

    #[test]
    fn rabbitmq_is_spelled_rabbitmq() {
        let cli = Cli::parse_from(["t", "--broker", "rabbitmq", "--broker-address", "amqp://h:5672/%2f"]);
        let config = BrokerConfig::from(cli.broker);
        assert_eq!(config.kind, BrokerKind::Rabbitmq);
        assert_eq!(config.kind.as_str(), "rabbitmq");
    }

    #[test]
    fn unknown_broker_lists_the_valid_ones() {
        let err = Cli::try_parse_from(["t", "--broker", "kafka"]).err().expect("not a broker").to_string();
        assert!(err.contains("registry") && err.contains("memory"), "{err}");
    }
}
