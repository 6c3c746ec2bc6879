//! greeter-server: a service in one line. It registers as `greeter` and answers
//! `greeter.Greeter/SayHello` with "Hello, NAME!", or with the greeting given as its own
//! argument (`greeter-server Howdy`): the one-line service leaves the command line alone.
//!
//! Run it (mDNS inside a private network namespace, as `make run` does), and call it:
//! ```sh
//! scripts/netns-run sh -c 'cargo run -p examples --bin greeter-server & sleep 2;
//!   cargo run -p micro-cli -- call greeter greeter.Greeter/SayHello "{\"name\": \"you\"}";
//!   cargo run -p examples --bin greeter-client -- you; kill %1'
//! ```
//! Every standard setting applies with no code here: `MICRO_REGISTRY=consul`,
//! `MICRO_SERVER_ADDRESS=127.0.0.1:50051`, `RUST_LOG=greeter_server=debug`, … (`--help`
//! lists them).

use examples::greeter::{
    FILE_DESCRIPTOR_SET, HelloReply, HelloRequest,
    greeter_server::{Greeter, GreeterServer},
};
use tonic::{Request, Response, Status};

/// The greeting when the program is given none.
const DEFAULT_GREETING: &str = "Hello";

/// Greets whoever asks, with its greeting.
struct Hello {
    greeting: String,
}

#[tonic::async_trait]
impl Greeter for Hello {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        tracing::debug!(%name, "greeting");
        Ok(Response::new(HelloReply { message: format!("{}, {name}!", self.greeting) }))
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The program's own argument: micro_core::service reads only the environment.
    let greeting = std::env::args().nth(1).unwrap_or_else(|| DEFAULT_GREETING.to_owned());
    let served = micro_core::service("greeter")
        .version(env!("CARGO_PKG_VERSION"))
        .file_descriptor_set(FILE_DESCRIPTOR_SET)
        .add_service(GreeterServer::new(Hello { greeting }))
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
