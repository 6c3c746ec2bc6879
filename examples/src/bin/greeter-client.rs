//! greeter-client: a client in one line, with a flag of its own beside the standard ones.
//! It finds `greeter` by name and prints its answer; with `--announce` it also publishes the
//! greeting as a `greeter.greeted` event (see greeter-listener).
//!
//! Run it against greeter-server (see that file), in the same network namespace:
//! ```sh
//! cargo run -p examples --bin greeter-client -- you            # Hello, you!
//! cargo run -p examples --bin greeter-client -- you --to greeter --registry consul
//! cargo run -p examples --bin greeter-client -- you --announce # and greeter-listener hears it
//! ```

use clap::Parser;
use examples::greeter::{HelloRequest, greeter_client::GreeterClient};
use micro_core::{
    broker::publish_proto,
    service::{Service, ServiceArgs},
};

/// Asks the greeter service for a greeting.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Who to greet.
    #[arg(default_value = "world")]
    who: String,
    /// The name greeter-server is registered under.
    #[arg(long, default_value = "greeter")]
    to: String,
    /// Also publish the greeting as a `greeter.greeted` event on the broker (`--broker`).
    #[arg(long)]
    announce: bool,
    #[command(flatten)]
    micro: ServiceArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match greet(cli).await {
        Ok(message) => {
            // `| head -0` closes stdout early: that is not an error worth a panic.
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{message}");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn greet(cli: Cli) -> Result<String, String> {
    let service = Service::with_args("greeter-client", cli.micro);
    let client = service.client().await.map_err(|e| e.to_string())?;
    let mut greeter = GreeterClient::new(client.channel(&cli.to));
    let request = HelloRequest { name: cli.who };
    let reply = greeter
        .say_hello(request.clone())
        .await
        .map_err(|status| format!("SayHello: {}: {}", status.code(), status.message()))?;
    if cli.announce {
        let broker = service.broker().await.map_err(|e| e.to_string())?;
        publish_proto(&*broker, "greeter.greeted", None, &request).await.map_err(|e| e.to_string())?;
    }
    Ok(reply.into_inner().message)
}
