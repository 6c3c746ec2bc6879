//! `micro redeliver TOPIC`: publishes the dead letters of a topic to it again, once the
//! handler that gave up on them is mended. Each dead letter goes back as the message it was
//! (same body, message id and headers, without the `dead-letter-*` ones) and is removed only
//! once that publish succeeded; one that fails stays a dead letter. Prints each message id,
//! one line; stops when no dead letter came for `--idle`, after `--count`, or on
//! SIGINT/SIGTERM.
//!
//! Every subscriber of the topic gets a redelivered message, not only the group that gave
//! up on it; they can tell it by its message id.
//!
//! # Examples
//! ```sh
//! micro subscribe consignment.created --dead-letters --count 1   # look first
//! micro redeliver consignment.created                             # then put them all back
//! ```

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use micro_core::{
    BoxError,
    broker::{self, Broker, DEAD_LETTERS, Message, SubscribeOptions, dead_letter_topic, headers},
    cli::Seconds,
};
use tokio::sync::mpsc;

use crate::{exit::Failure, out};

/// `micro redeliver`'s own flags; the broker flags are `micro`'s.
#[derive(Debug, Clone, clap::Args)]
pub struct RedeliverArgs {
    /// The topic whose dead letters (kept on `TOPIC.dead`) go back to it.
    pub topic: String,
    /// Redeliver at most this many (default: all there are).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Stop once no dead letter came for this long (`500ms`, `2s`; a bare number is seconds).
    #[arg(long, default_value = "2")]
    pub idle: Seconds,
}

/// Redelivers the dead letters of `args.topic`; see the module docs.
pub async fn redeliver(args: RedeliverArgs, broker: Arc<dyn Broker>) -> Result<(), Failure> {
    let shutdown = micro_core::server::shutdown_signal();
    tokio::pin!(shutdown);
    let _ = futures::poll!(&mut shutdown);
    let limit = args.count.unwrap_or(u64::MAX);
    let (sent, mut redelivered) = mpsc::unbounded_channel::<String>();
    let taken = Arc::new(AtomicU64::new(0));
    let handler = {
        let (broker, topic) = (broker.clone(), args.topic.clone());
        broker::handler(move |dead: Message| {
            let (broker, topic, sent, taken) = (broker.clone(), topic.clone(), sent.clone(), taken.clone());
            async move {
                if taken.fetch_add(1, Ordering::SeqCst) >= limit {
                    return Err(BoxError::from("--count reached: left for a later run"));
                }
                let message = revived(dead, &topic);
                let id = message.id().unwrap_or("-").to_owned();
                let published = broker.publish(message).await;
                if published.is_err() {
                    taken.fetch_sub(1, Ordering::SeqCst);
                }
                published?;
                let _ = sent.send(id);
                Ok(())
            }
        })
    };
    let dead_letters = dead_letter_topic(&args.topic);
    let keep = SubscribeOptions::default().queue(DEAD_LETTERS).durable();
    let subscription = broker.subscribe(&dead_letters, keep, handler).await?;
    eprintln!(
        "redelivering the dead letters of {} ({dead_letters}) on broker {} at {}",
        args.topic,
        broker.kind(),
        broker.address()
    );
    let idle = Duration::from(args.idle);
    let mut count = 0_u64;
    while count < limit {
        tokio::select! {
            id = redelivered.recv() => match id {
                Some(id) => {
                    count += 1;
                    out::line(id);
                }
                None => break,
            },
            () = tokio::time::sleep(idle) => break,
            () = &mut shutdown => break,
        }
    }
    subscription.unsubscribe().await;
    eprintln!("redelivered {count} dead letter(s) to {}", args.topic);
    Ok(())
}

/// The message `dead` is the dead letter of: its topic back, the `dead-letter-*` headers gone.
fn revived(mut dead: Message, topic: &str) -> Message {
    dead.topic = dead.headers.remove(headers::DEAD_LETTER_TOPIC).unwrap_or_else(|| topic.to_owned());
    for name in [headers::DEAD_LETTER_GROUP, headers::DEAD_LETTER_ERROR, headers::DELIVERY_COUNT] {
        dead.headers.remove(name);
    }
    dead
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revived_message_has_its_topic_back_and_no_dead_letter_headers() {
        let dead = Message::new("orders.dead", "body")
            .header(headers::DEAD_LETTER_TOPIC, "orders")
            .header(headers::DEAD_LETTER_GROUP, "billing")
            .header(headers::DEAD_LETTER_ERROR, "closed")
            .header(headers::DELIVERY_COUNT, "3")
            .header("tenant", "t1");
        let id = dead.id().unwrap().to_owned();
        let message = revived(dead, "ignored");
        assert_eq!(message.topic, "orders");
        assert_eq!(message.id(), Some(id.as_str()));
        let names: Vec<&str> = message.headers.keys().collect();
        assert_eq!(names, [headers::MESSAGE_ID, "tenant"]);
    }
}
