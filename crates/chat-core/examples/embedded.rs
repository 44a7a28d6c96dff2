//! Embeds the chat engine in an app with no network at all: two sessions
//! chat in-process, live and through the offline queue.
//!
//! Run it with `cargo run -p chat-core --example embedded`.

use chat_core::{Chat, ChatError, Event};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), ChatError> {
    let chat = Chat::in_memory();
    let (alice, _alice_events) = chat.open_session();
    let (bob, mut bob_events) = chat.open_session();

    alice.create("alice", "password1").await?;
    bob.create("bob", "password1").await?;

    // Bob is logged in: the message is pushed to his event stream.
    alice.send("bob", "lunch at noon?").await?;
    if let Some(Event::Message(m)) = bob_events.recv().await {
        println!(
            "bob got live message #{} from {}: {}",
            m.id, m.sender, m.body
        );
    }

    // Bob leaves; what alice sends now waits in his queue.
    bob.logout().await?;
    alice.send("bob", "never mind, 1pm").await?;
    alice.send("bob", "see you there").await?;

    bob.login("bob", "password1").await?;
    for m in bob.fetch(10).await? {
        println!(
            "bob fetched queued message #{} from {}: {}",
            m.id, m.sender, m.body
        );
    }

    let everyone = alice.list("", 0).await?;
    println!(
        "accounts: {}",
        everyone
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    alice.close().await;
    bob.close().await;
    Ok(())
}
