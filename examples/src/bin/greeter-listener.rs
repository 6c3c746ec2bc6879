//! greeter-listener: a subscriber in one line. It prints a line for each `greeter.greeted`
//! event (which `greeter-client --announce` publishes); instances share the events as the
//! queue group `greeter-listener`, so each is printed once.
//!
//! Run it beside greeter-server (see that file), in the same network namespace:
//! ```sh
//! cargo run -p examples --bin greeter-listener &                 # you was greeted
//! cargo run -p examples --bin greeter-client -- you --announce   # Hello, you!
//! ```
//! `MICRO_BROKER=nats` (or `rabbitmq`) moves the events to that broker with no code here.

use examples::greeter::HelloRequest;
use micro_core::broker::{Message, SubscribeOptions};

/// The topic greeter-client announces greetings on.
const GREETED: &str = "greeter.greeted";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let served = micro_core::service("greeter-listener")
        .subscribe_proto(GREETED, SubscribeOptions::default().queue("greeter-listener"), print_greeted)
        .run()
        .await;
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", micro_core::error::error_chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn print_greeted(greeted: HelloRequest, message: Message) -> Result<(), micro_core::BoxError> {
    use std::io::Write;
    tracing::debug!(message_id = message.id().unwrap_or("-"), "greeted");
    writeln!(std::io::stdout(), "{} was greeted", greeted.name)?;
    Ok(())
}
