//! The connection task: it owns the [`ChatClient`], runs what the app
//! asks ([`Request`]), turns the server's pushes and answers into
//! [`Update`]s, and keeps the login alive across dropped connections.
//!
//! The app and this task share nothing but two channels, so the app does
//! no I/O and is tested by feeding it updates, and this task is tested
//! against a real server without a terminal.
//!
//! # Reconnecting
//!
//! The client libraries resend a send whose connection failed, but a
//! connection that dies while the client waits for pushes simply ends:
//! `next_push` returns `None` (on gRPC after a `Goodbye`). This task then
//! opens a new connection, first at once (if the lost one had lasted, see
//! [`STABLE`]) and then with a growing pause ([`FIRST_RETRY`] doubling up
//! to [`LAST_RETRY`]), logs in again with the
//! password it remembers (in this task's memory only, for as long as the
//! login lasts), and fetches what was queued for the user meanwhile.
//! Requests that need the server wait until then, in order; a logout is
//! done at once (the dropped connection already ended the session).
//!
//! Messages that were pushed before the drop but not yet acknowledged are
//! replayed by the server at that login. The new client cannot know they
//! were shown, so the app drops repeats by message id (and acknowledges
//! them again). Acknowledgements asked for while offline are dropped
//! rather than sent on the new connection: a cumulative acknowledgement
//! made for the old connection could cover a message the new one has
//! delivered but the app has not shown, and the replay brings them back
//! to be acknowledged anyway.

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use chat_core::client::{ChatClient, ClientError, Push};
use chat_core::{ErrorCode, LogoutReason, Message, MessageId, SendReceipt, Username};
use chat_grpc::GrpcClient;
use chat_socket::SocketClient;
use chat_tls::ClientTls;
use tokio::sync::mpsc;

use crate::command::Refusal;

/// The pause before the second attempt to reconnect.
pub const FIRST_RETRY: Duration = Duration::from_millis(500);
/// The longest pause between attempts.
pub const LAST_RETRY: Duration = Duration::from_secs(10);
/// A connection that lasted this long was a good one: once it is lost,
/// the next attempt is at once and the pauses start again from the first.
/// One lost sooner continues the backoff, so that a server that takes
/// connections and drops them at once is not hammered.
const STABLE: Duration = Duration::from_secs(10);
/// How long quitting waits for the server to confirm the logout.
const LOGOUT_PATIENCE: Duration = Duration::from_secs(3);
/// A send that takes this long may have been through a reconnect inside
/// the client library (see [`Inbox::handle`]).
const SLOW_SEND: Duration = Duration::from_secs(1);
/// Fetches in a row after a login, each up to the server's cap (256
/// messages by default): what was queued while the user was away, within a
/// bound; Ctrl-F fetches more.
const FETCH_ROUNDS: usize = 8;

/// Opens connections to one server over one transport.
pub trait Connect: Send + Sync + 'static {
    /// The client a connection gives.
    type Client: ChatClient + 'static;
    /// Connects (the handshake included).
    fn connect(&self) -> impl Future<Output = Result<Self::Client, ClientError>> + Send;
}

/// Connections over the socket protocol.
#[derive(Clone)]
pub struct SocketConnect {
    /// `host:port`.
    pub addr: String,
    /// TLS settings, if TLS is on.
    pub tls: Option<ClientTls>,
}

impl Connect for SocketConnect {
    type Client = SocketClient;
    fn connect(&self) -> impl Future<Output = Result<SocketClient, ClientError>> + Send {
        SocketClient::connect_with(self.addr.clone(), self.tls.clone())
    }
}

/// Connections over gRPC.
#[derive(Clone)]
pub struct GrpcConnect {
    /// `host:port` or a URI.
    pub addr: String,
    /// TLS settings, if TLS is on.
    pub tls: Option<ClientTls>,
}

impl Connect for GrpcConnect {
    type Client = GrpcClient;
    async fn connect(&self) -> Result<GrpcClient, ClientError> {
        GrpcClient::connect_with(&self.addr, self.tls.clone()).await
    }
}

/// Identifies a message the user sent, before the server gave it an id.
pub type LocalId = u64;

/// What the app asks the connection task to do.
#[derive(Clone, PartialEq, Eq)]
pub enum Request {
    /// Create an account and log in as it.
    Create {
        /// The account name.
        name: String,
        /// Its password.
        password: String,
    },
    /// Log in.
    Login {
        /// The account name.
        name: String,
        /// Its password.
        password: String,
    },
    /// Log out (and forget the password).
    Logout,
    /// Delete the logged-in account.
    Delete {
        /// Its password, asked again.
        password: String,
    },
    /// Change the logged-in account's password.
    ChangePassword {
        /// The current password.
        old: String,
        /// The new one.
        new: String,
    },
    /// Send a message.
    Send {
        /// The app's name for it, echoed in the answer.
        local: LocalId,
        /// The recipient.
        to: String,
        /// The text.
        body: String,
    },
    /// List the accounts whose names match a pattern.
    Search {
        /// A regular expression, unanchored; empty for all.
        pattern: String,
    },
    /// Take queued messages.
    Fetch,
    /// Acknowledge the messages received up to an id: they are shown.
    Ack(MessageId),
    /// Log out and stop.
    Quit,
}

impl std::fmt::Debug for Request {
    /// Never shows a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Create { name, .. } => write!(f, "Create({name:?}, ..)"),
            Request::Login { name, .. } => write!(f, "Login({name:?}, ..)"),
            Request::Logout => f.write_str("Logout"),
            Request::Delete { .. } => f.write_str("Delete(..)"),
            Request::ChangePassword { .. } => f.write_str("ChangePassword(..)"),
            Request::Send { local, to, body } => write!(f, "Send({local}, {to:?}, {body:?})"),
            Request::Search { pattern } => write!(f, "Search({pattern:?})"),
            Request::Fetch => f.write_str("Fetch"),
            Request::Ack(id) => write!(f, "Ack({id})"),
            Request::Quit => f.write_str("Quit"),
        }
    }
}

/// Which request failed (see [`Update::Failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// [`Request::Create`].
    Create,
    /// [`Request::Login`].
    Login,
    /// [`Request::Logout`].
    Logout,
    /// [`Request::Delete`].
    Delete,
    /// [`Request::ChangePassword`].
    ChangePassword,
    /// [`Request::Search`].
    Search,
    /// [`Request::Fetch`], or the fetch after a login.
    Fetch,
}

/// The state of the connection, for the status bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// An attempt to connect is under way.
    Connecting {
        /// There was a connection before.
        again: bool,
    },
    /// Connected (and logged in again, if there was a login to restore).
    Connected,
    /// Not connected; the next attempt is at `retry_at`.
    Waiting {
        /// When the next attempt starts.
        retry_at: Instant,
        /// Why the last attempt or the connection failed.
        why: String,
        /// There was a connection before (reconnecting), rather than
        /// none yet (offline).
        again: bool,
    },
}

/// Why a login ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The user logged out.
    Requested,
    /// The user deleted the account.
    Deleted,
    /// Logging in again after a reconnect was refused (the password was
    /// changed elsewhere, the account deleted, ...).
    Refused(Refusal),
}

/// What the connection task tells the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The connection changed state.
    Link(Link),
    /// The connection was lost (why); reconnecting follows.
    Lost(String),
    /// Logged in.
    Entered {
        /// As whom.
        user: Username,
        /// The account was created by this login.
        created: bool,
        /// A login restored after a reconnect, not one the user asked for.
        again: bool,
    },
    /// Logged out.
    LoggedOut(Ended),
    /// The password was changed.
    PasswordChanged,
    /// The server stored a sent message.
    Sent {
        /// The app's name for it.
        local: LocalId,
        /// The server's id and time for it.
        receipt: SendReceipt,
    },
    /// A message was not sent (the server refused it, or it could not be
    /// reached for a minute).
    NotSent {
        /// The app's name for it.
        local: LocalId,
        /// Why.
        refusal: Refusal,
    },
    /// A message was pushed (live, or replayed at a login because it was
    /// never acknowledged).
    Received(Message),
    /// Queued messages, oldest first.
    Fetched {
        /// The messages (possibly none).
        messages: Vec<Message>,
        /// The user asked for the fetch (else it followed a login).
        asked: bool,
    },
    /// The accounts matching a pattern.
    Found {
        /// The pattern.
        pattern: String,
        /// The names, sorted.
        names: Vec<Username>,
    },
    /// A request failed.
    Failed {
        /// Which.
        action: Action,
        /// Why.
        refusal: Refusal,
    },
}

/// Runs the connection task until the app asks it to quit (or drops its
/// sender): connects, serves requests and pushes, reconnects.
pub async fn run<C: Connect>(
    connect: C,
    requests: mpsc::UnboundedReceiver<Request>,
    updates: mpsc::UnboundedSender<Update>,
) {
    let mut inbox = Inbox {
        requests,
        updates,
        held: VecDeque::new(),
        credentials: None,
    };
    let mut backoff = Backoff::default();
    // Why the last attempt failed; `None`: attempt at once (at the start,
    // and right after a stable connection was lost, so that a blip heals
    // at once).
    let mut failed: Option<String> = None;
    let mut was_connected = false;
    loop {
        if let Some(why) = failed.take() {
            let retry_at = Instant::now() + backoff.next();
            inbox.tell(Update::Link(Link::Waiting {
                retry_at,
                why,
                again: was_connected,
            }));
            let pause = tokio::time::sleep_until(tokio::time::Instant::from_std(retry_at));
            if inbox.meanwhile(pause).await.is_none() {
                return;
            }
        }
        inbox.tell(Update::Link(Link::Connecting {
            again: was_connected,
        }));
        let Some(connected) = inbox.meanwhile(connect.connect()).await else {
            return;
        };
        let mut client = match connected {
            Ok(client) => client,
            Err(err) => {
                failed = Some(err.to_string());
                continue;
            }
        };
        if let Err(why) = inbox.enter_again(&mut client).await {
            failed = Some(why);
            continue;
        }
        inbox.tell(Update::Link(Link::Connected));
        was_connected = true;
        let connected_at = Instant::now();
        match inbox.serve(&mut client).await {
            Served::Quit => {
                if client.state().user().is_some() {
                    let _ = tokio::time::timeout(LOGOUT_PATIENCE, client.logout()).await;
                }
                return;
            }
            Served::Lost(why) => {
                inbox.tell(Update::Lost(why.clone()));
                if connected_at.elapsed() >= STABLE {
                    backoff = Backoff::default();
                } else {
                    failed = Some(why);
                }
            }
        }
    }
}

/// The pauses between failed attempts to connect: [`FIRST_RETRY`],
/// doubling up to [`LAST_RETRY`].
#[derive(Debug, Default)]
struct Backoff {
    last: Option<Duration>,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let pause = match self.last {
            None => FIRST_RETRY,
            Some(last) => (last * 2).min(LAST_RETRY),
        };
        self.last = Some(pause);
        pause
    }
}

/// The login to restore after a reconnect.
struct Credentials {
    user: Username,
    password: String,
}

/// How serving a connection ended.
enum Served {
    /// The app asked to quit (or went away).
    Quit,
    /// The connection was lost; why.
    Lost(String),
}

/// The task's side of the channels, and what it remembers across
/// connections.
struct Inbox {
    requests: mpsc::UnboundedReceiver<Request>,
    updates: mpsc::UnboundedSender<Update>,
    /// Requests that arrived while offline, to run once connected.
    held: VecDeque<Request>,
    credentials: Option<Credentials>,
}

impl Inbox {
    fn tell(&self, update: Update) {
        // The app is gone only when it is quitting: nobody to tell.
        let _ = self.updates.send(update);
    }

    /// Runs `work` (a connection attempt, a pause) while taking requests:
    /// those that need the server wait, a logout is done at once. `None`
    /// if the app asked to quit meanwhile.
    async fn meanwhile<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                request = self.requests.recv() => match request {
                    None | Some(Request::Quit) => return None,
                    Some(Request::Logout) => {
                        // The lost connection ended the session; only the
                        // wish to restore it is left to drop.
                        self.credentials = None;
                        self.tell(Update::LoggedOut(Ended::Requested));
                    }
                    Some(Request::Ack(_)) => {}
                    Some(other) => self.held.push_back(other),
                },
            }
        }
    }

    /// Logs in again on a new connection, if there is a login to restore,
    /// and fetches what was queued meanwhile. `Err` (why) if the attempt
    /// should be retried on another connection; a refusal that retrying
    /// cannot cure ends the login instead.
    async fn enter_again<C: ChatClient>(&mut self, client: &mut C) -> Result<(), String> {
        let Some(credentials) = &self.credentials else {
            return Ok(());
        };
        let user = credentials.user.clone();
        match client.login(user.as_str(), &credentials.password).await {
            Ok(_) => {
                self.tell(Update::Entered {
                    user,
                    created: false,
                    again: true,
                });
                self.fetch_queued(client).await;
                Ok(())
            }
            Err(err) if lasting(&err) => {
                self.credentials = None;
                self.tell(Update::LoggedOut(Ended::Refused(err.into())));
                Ok(())
            }
            Err(err) => Err(format!("logging in again: {err}")),
        }
    }

    /// Serves one connection: the held requests first, then requests and
    /// pushes as they come, until the app quits or the connection ends.
    async fn serve<C: ChatClient>(&mut self, client: &mut C) -> Served {
        while let Some(request) = self.held.pop_front() {
            if let Some(end) = self.handle(client, request).await {
                return end;
            }
        }
        loop {
            tokio::select! {
                // Pushes first: a connection that has ended is noticed (and
                // restored, with a fetch) before the next request runs on it.
                biased;
                push = client.next_push() => match push {
                    None => return Served::Lost("the connection closed".into()),
                    Some(Push::Message(message)) => self.tell(Update::Received(message)),
                    Some(Push::Goodbye { code, message }) => {
                        return Served::Lost(format!("{code}: {message}"));
                    }
                    Some(Push::LoggedOut { user, reason }) => {
                        if let Some(end) = self.logged_out_by_server(client, user, reason).await {
                            return end;
                        }
                    }
                },
                request = self.requests.recv() => {
                    let Some(request) = request else { return Served::Quit };
                    if let Some(end) = self.handle(client, request).await {
                        return end;
                    }
                }
            }
        }
    }

    /// The server ended the login (a slow consumer's): log in again on the
    /// same connection, the messages meanwhile are queued. A notice about
    /// another user, or about a logout asked for, is old news.
    async fn logged_out_by_server<C: ChatClient>(
        &mut self,
        client: &mut C,
        user: Username,
        reason: LogoutReason,
    ) -> Option<Served> {
        let ours = self.credentials.as_ref().is_some_and(|c| c.user == user);
        if !ours || reason != LogoutReason::SlowConsumer {
            return None;
        }
        match self.enter_again(client).await {
            Ok(()) => None,
            // Retry on a new connection.
            Err(why) => Some(Served::Lost(why)),
        }
    }

    /// Runs one request; `Some` if the task must stop serving this
    /// connection.
    async fn handle<C: ChatClient>(&mut self, client: &mut C, request: Request) -> Option<Served> {
        match request {
            Request::Quit => return Some(Served::Quit),
            Request::Create { name, password } => {
                let result = client.create(&name, &password).await;
                self.entered(client, result, password, Action::Create).await;
            }
            Request::Login { name, password } => {
                let result = client.login(&name, &password).await;
                self.entered(client, result, password, Action::Login).await;
            }
            Request::Logout => {
                let result = client.logout().await;
                if client.state().user().is_none() {
                    self.credentials = None;
                    self.tell(Update::LoggedOut(Ended::Requested));
                } else if let Err(err) = result {
                    self.failed(Action::Logout, err);
                }
            }
            Request::Delete { password } => match client.delete(&password).await {
                Ok(_) => {
                    self.credentials = None;
                    self.tell(Update::LoggedOut(Ended::Deleted));
                }
                Err(err) => self.failed(Action::Delete, err),
            },
            Request::ChangePassword { old, new } => {
                match client.change_password(&old, &new).await {
                    Ok(_) => {
                        if let Some(credentials) = &mut self.credentials {
                            credentials.password = new;
                        }
                        self.tell(Update::PasswordChanged);
                    }
                    Err(err) => self.failed(Action::ChangePassword, err),
                }
            }
            Request::Send { local, to, body } => {
                let started = Instant::now();
                match client.send(&to, &body).await {
                    Ok(receipt) => self.tell(Update::Sent { local, receipt }),
                    Err(err) => self.tell(Update::NotSent {
                        local,
                        refusal: err.into(),
                    }),
                }
                // A send whose connection fails is resent by the library
                // after it reconnects and logs in again, without saying
                // so; what was queued for the user meanwhile is not pushed
                // at that login, so a slow send is followed by a fetch.
                if started.elapsed() >= SLOW_SEND && client.state().user().is_some() {
                    self.fetch_queued(client).await;
                }
            }
            Request::Search { pattern } => match client.list(&pattern, 0).await {
                Ok(names) => self.tell(Update::Found { pattern, names }),
                Err(err) => self.failed(Action::Search, err),
            },
            Request::Fetch => match client.fetch(0).await {
                Ok(messages) => self.tell(Update::Fetched {
                    messages,
                    asked: true,
                }),
                Err(err) => self.failed(Action::Fetch, err),
            },
            Request::Ack(through) => {
                // A failed acknowledgement loses nothing: the message is
                // delivered again at the next login, and the app drops the
                // repeat. (An `Ok` does not say the server deleted
                // anything: the library may hold the acknowledgement back
                // until a login's replay has arrived.)
                let _ = client.ack(through).await;
            }
        }
        None
    }

    /// After a create or login: remembers the password to log in again
    /// after a reconnect, tells the app, and fetches what is queued.
    async fn entered<C: ChatClient>(
        &mut self,
        client: &mut C,
        result: Result<chat_core::SessionState, ClientError>,
        password: String,
        action: Action,
    ) {
        match result {
            Ok(state) => match state.user() {
                Some(user) => {
                    self.credentials = Some(Credentials {
                        user: user.clone(),
                        password,
                    });
                    self.tell(Update::Entered {
                        user: user.clone(),
                        created: action == Action::Create,
                        again: false,
                    });
                    self.fetch_queued(client).await;
                }
                None => self.failed(
                    action,
                    ClientError::Protocol("the server answered a login with no user".into()),
                ),
            },
            Err(err) => self.failed(action, err),
        }
    }

    /// Fetches what was queued for the user while away, a few batches at
    /// most (see [`FETCH_ROUNDS`]).
    async fn fetch_queued<C: ChatClient>(&mut self, client: &mut C) {
        for _ in 0..FETCH_ROUNDS {
            match client.fetch(0).await {
                Ok(messages) if messages.is_empty() => return,
                Ok(messages) => self.tell(Update::Fetched {
                    messages,
                    asked: false,
                }),
                Err(err) => {
                    self.failed(Action::Fetch, err);
                    return;
                }
            }
        }
    }

    fn failed(&self, action: Action, err: ClientError) {
        self.tell(Update::Failed {
            action,
            refusal: err.into(),
        });
    }
}

/// Whether a refused login after a reconnect stays refused however often
/// it is retried: the password or the account changed elsewhere.
fn lasting(err: &ClientError) -> bool {
    matches!(
        err.code(),
        Some(
            ErrorCode::WrongPassword
                | ErrorCode::NoSuchUser
                | ErrorCode::InvalidPassword
                | ErrorCode::InvalidUsername
                | ErrorCode::PasswordNotSet
        )
    )
}

#[cfg(test)]
mod tests {
    use chat_server::{Listen, Storage};

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(30);

    /// The next update that `wanted` picks, skipping the others.
    async fn expect<T>(
        updates: &mut mpsc::UnboundedReceiver<Update>,
        what: &str,
        wanted: impl Fn(Update) -> Option<T>,
    ) -> T {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                let update = updates.recv().await.expect("the task is running");
                if let Some(found) = wanted(update) {
                    return found;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {what} within {PATIENCE:?}"))
    }

    #[test]
    fn pauses_double_up_to_the_last() {
        let mut backoff = Backoff::default();
        let pauses: Vec<u64> = (0..7)
            .map(|_| u64::try_from(backoff.next().as_millis()).unwrap())
            .collect();
        assert_eq!(pauses, [500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
    }

    #[test]
    fn only_a_changed_password_or_account_ends_the_login() {
        let server = |code| ClientError::Server {
            code,
            message: String::new(),
        };
        assert!(lasting(&server(ErrorCode::WrongPassword)));
        assert!(lasting(&server(ErrorCode::NoSuchUser)));
        for passing in [
            server(ErrorCode::AlreadyLoggedIn),
            server(ErrorCode::ShuttingDown),
            server(ErrorCode::TooManyAttempts),
            server(ErrorCode::ServerFull),
            ClientError::Connection("refused".into()),
            ClientError::Protocol("garbled".into()),
        ] {
            assert!(!lasting(&passing), "{passing}");
        }
    }

    /// Started before the server, the task says it is offline and retries;
    /// what the user asked meanwhile runs, in order, once it connects. A
    /// quit ends it at once.
    #[tokio::test]
    async fn requests_made_offline_run_once_the_server_is_up() {
        // A port with nothing on it, for now.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (updates_tx, mut updates) = mpsc::unbounded_channel();
        let connect = SocketConnect {
            addr: addr.to_string(),
            tls: None,
        };
        let task = tokio::spawn(run(connect, requests_rx, updates_tx));
        expect(&mut updates, "an offline state", |u| match u {
            Update::Link(Link::Waiting { again: false, .. }) => Some(()),
            _ => None,
        })
        .await;
        for request in [
            Request::Create {
                name: "alice".into(),
                password: "password1".into(),
            },
            Request::Send {
                local: 1,
                to: "alice".into(),
                body: "a note to self".into(),
            },
            Request::Ack(99),
        ] {
            requests.send(request).unwrap();
        }

        let chat = Storage::memory().open().await.unwrap();
        chat_server::spawn(&[Listen::Socket(addr)], chat)
            .await
            .unwrap();
        let user = expect(&mut updates, "the login", |u| match u {
            Update::Entered {
                user,
                created: true,
                again: false,
            } => Some(user),
            _ => None,
        })
        .await;
        assert_eq!(user.as_str(), "alice");
        let local = expect(&mut updates, "the send's answer", |u| match u {
            Update::Sent { local, .. } => Some(local),
            Update::NotSent { refusal, .. } => panic!("{refusal}"),
            _ => None,
        })
        .await;
        assert_eq!(local, 1);
        let message = expect(&mut updates, "the message", |u| match u {
            Update::Received(m) => Some(m),
            _ => None,
        })
        .await;
        assert_eq!(message.body.as_str(), "a note to self");

        requests.send(Request::Quit).unwrap();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("the task ends")
            .unwrap();
    }

    /// Refusals reach the app with their stable code, for the request
    /// that failed.
    #[tokio::test]
    async fn refusals_come_back_with_their_code() {
        let any = "127.0.0.1:0".parse().unwrap();
        let chat = Storage::memory().open().await.unwrap();
        let addr = chat_server::spawn(&[Listen::Grpc(any)], chat)
            .await
            .unwrap()[0];
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (updates_tx, mut updates) = mpsc::unbounded_channel();
        let connect = GrpcConnect {
            addr: addr.to_string(),
            tls: None,
        };
        let task = tokio::spawn(run(connect, requests_rx, updates_tx));
        let failure = |u| match u {
            Update::Failed { action, refusal } => Some((action, refusal.code)),
            _ => None,
        };
        requests
            .send(Request::Login {
                name: "nobody".into(),
                password: "password1".into(),
            })
            .unwrap();
        assert_eq!(
            expect(&mut updates, "a refusal", failure).await,
            (Action::Login, "no_such_user".to_owned())
        );
        requests
            .send(Request::Search {
                pattern: "(".into(),
            })
            .unwrap();
        assert_eq!(
            expect(&mut updates, "a refusal", failure).await,
            (Action::Search, "invalid_pattern".to_owned())
        );
        requests
            .send(Request::Create {
                name: "bob".into(),
                password: "password1".into(),
            })
            .unwrap();
        requests
            .send(Request::Send {
                local: 7,
                to: "nobody".into(),
                body: "hello?".into(),
            })
            .unwrap();
        let (local, code) = expect(&mut updates, "a refused send", |u| match u {
            Update::NotSent { local, refusal } => Some((local, refusal.code)),
            _ => None,
        })
        .await;
        assert_eq!((local, code.as_str()), (7, "no_such_user"));
        requests
            .send(Request::Delete {
                password: "not-the-password".into(),
            })
            .unwrap();
        assert_eq!(
            expect(&mut updates, "a refusal", failure).await,
            (Action::Delete, "wrong_password".to_owned())
        );
        requests.send(Request::Logout).unwrap();
        expect(&mut updates, "the logout", |u| match u {
            Update::LoggedOut(Ended::Requested) => Some(()),
            _ => None,
        })
        .await;
        drop(requests);
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("the task ends when the app goes")
            .unwrap();
    }
}
