//! The command language: parsing a line, checking it locally, and running
//! it against any [`ChatClient`].
//!
//! Local checks (name and message limits, login state) give immediate
//! errors with the same codes the server would use; the server checks
//! everything again regardless.

use chat_core::client::{ChatClient, ClientError, Push};
use chat_core::{ErrorCode, Message, MessageBody, MessageId, Password, SessionState, Username};

/// One parsed command. A password left out of the line is `None` until
/// the console supplies it (from `CHAT_PASSWORD`, or asked for without
/// echo on a terminal).
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// `create NAME [PASSWORD]`
    Create(String, Option<String>),
    /// `login NAME [PASSWORD]`
    Login(String, Option<String>),
    /// `logout`
    Logout,
    /// `delete [PASSWORD]`
    Delete(Option<String>),
    /// `passwd [OLD NEW]`
    Passwd(Option<(String, String)>),
    /// `send NAME TEXT...`
    Send(String, String),
    /// `list [PATTERN] [MAX]`
    List(String, u32),
    /// `fetch [MAX]`
    Fetch(u32),
    /// `help`
    Help,
    /// `quit`
    Quit,
}

impl std::fmt::Debug for Command {
    /// Never shows a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Create(name, _) => write!(f, "Create({name:?}, ..)"),
            Command::Login(name, _) => write!(f, "Login({name:?}, ..)"),
            Command::Logout => f.write_str("Logout"),
            Command::Delete(_) => f.write_str("Delete(..)"),
            Command::Passwd(_) => f.write_str("Passwd(..)"),
            Command::Send(to, text) => write!(f, "Send({to:?}, {text:?})"),
            Command::List(pattern, max) => write!(f, "List({pattern:?}, {max})"),
            Command::Fetch(max) => write!(f, "Fetch({max})"),
            Command::Help => f.write_str("Help"),
            Command::Quit => f.write_str("Quit"),
        }
    }
}

impl Command {
    /// What the console must ask for before the command can run: the
    /// prompts for each missing password, in order.
    pub fn missing_passwords(&self) -> Vec<String> {
        match self {
            Command::Create(name, None) => vec![format!("new password for {name}: ")],
            Command::Login(name, None) => vec![format!("password for {name}: ")],
            Command::Delete(None) => vec!["your password, to delete the account: ".into()],
            Command::Passwd(None) => {
                vec!["current password: ".into(), "new password: ".into()]
            }
            _ => Vec::new(),
        }
    }

    /// Fills in the missing passwords, in the order of
    /// [`Command::missing_passwords`].
    pub fn with_passwords(self, mut given: Vec<String>) -> Self {
        let mut next = || (!given.is_empty()).then(|| given.remove(0));
        match self {
            Command::Create(name, None) => Command::Create(name, next()),
            Command::Login(name, None) => Command::Login(name, next()),
            Command::Delete(None) => Command::Delete(next()),
            Command::Passwd(None) => match (next(), next()) {
                (Some(old), Some(new)) => Command::Passwd(Some((old, new))),
                _ => Command::Passwd(None),
            },
            other => other,
        }
    }
}

/// The usage text printed by `help`, one command per line.
pub const HELP: &[&str] = &[
    "create NAME [PASSWORD] create an account and log in (asks for the password if left out)",
    "login NAME [PASSWORD]  log in",
    "logout               log out",
    "delete [PASSWORD]    delete your account (and its undelivered messages)",
    "passwd [OLD NEW]     change your password",
    "send NAME TEXT...    send TEXT to NAME (live if logged in, else queued)",
    "list [PATTERN] [MAX] list accounts matching a regex (unanchored; empty = all)",
    "fetch [MAX]          show queued messages, oldest first",
    "help                 this text",
    "quit                 log out and exit",
];

/// A command line that could not be run, as one output line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable code: a server code, or `usage` / `unknown_command`.
    pub code: String,
    /// Detail.
    pub text: String,
}

impl Refusal {
    fn usage(text: impl Into<String>) -> Self {
        Self {
            code: "usage".into(),
            text: text.into(),
        }
    }
    fn local(code: ErrorCode, text: impl Into<String>) -> Self {
        Self {
            code: code.as_str().into(),
            text: text.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    /// `error CODE TEXT` on one line: multi-line detail (a regex error's
    /// caret diagram) is folded so that one result stays one line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error {}", self.code)?;
        for word in self.text.split_whitespace() {
            write!(f, " {word}")?;
        }
        Ok(())
    }
}

impl From<ClientError> for Refusal {
    fn from(err: ClientError) -> Self {
        match &err {
            ClientError::Server { code, message } => Self {
                code: code.as_str().into(),
                text: message.clone(),
            },
            ClientError::Connection(why) => Self {
                code: "connection".into(),
                text: why.clone(),
            },
            ClientError::Protocol(why) => Self {
                code: "protocol".into(),
                text: why.clone(),
            },
        }
    }
}

/// Splits off the first whitespace-separated word.
fn word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

fn number(raw: &str, what: &str) -> Result<u32, Refusal> {
    raw.parse()
        .map_err(|_| Refusal::usage(format!("{what} must be a whole number, not {raw:?}")))
}

/// Parses one line; `Ok(None)` for a blank line.
pub fn parse(line: &str) -> Result<Option<Command>, Refusal> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (verb, rest) = word(line);
    let args: Vec<&str> = rest.split_whitespace().collect();
    let command = match verb {
        "" => return Ok(None),
        "create" | "login" => {
            let (name, password) = match args[..] {
                [name] => (name, None),
                [name, password] => (name, Some(password.to_string())),
                _ => return Err(Refusal::usage(format!("{verb} NAME [PASSWORD]"))),
            };
            if verb == "create" {
                Command::Create(name.into(), password)
            } else {
                Command::Login(name.into(), password)
            }
        }
        "logout" | "help" | "quit" if !args.is_empty() => {
            return Err(Refusal::usage(format!("{verb} takes no arguments")));
        }
        "logout" => Command::Logout,
        "delete" => match args[..] {
            [] => Command::Delete(None),
            [password] => Command::Delete(Some(password.into())),
            _ => return Err(Refusal::usage("delete [PASSWORD]")),
        },
        "passwd" => match args[..] {
            [] => Command::Passwd(None),
            [old, new] => Command::Passwd(Some((old.into(), new.into()))),
            _ => return Err(Refusal::usage("passwd [OLD NEW]")),
        },
        "help" => Command::Help,
        "quit" | "exit" => Command::Quit,
        "send" => {
            let (to, text) = word(rest);
            if to.is_empty() || text.is_empty() {
                return Err(Refusal::usage("send NAME TEXT..."));
            }
            Command::Send(to.into(), text.trim_end().into())
        }
        "list" => match args[..] {
            [] => Command::List(String::new(), 0),
            [pattern] => Command::List(pattern.into(), 0),
            [pattern, max] => Command::List(pattern.into(), number(max, "MAX")?),
            _ => return Err(Refusal::usage("list [PATTERN] [MAX]")),
        },
        "fetch" => match args[..] {
            [] => Command::Fetch(0),
            [max] => Command::Fetch(number(max, "MAX")?),
            _ => return Err(Refusal::usage("fetch [MAX]")),
        },
        other => {
            return Err(Refusal {
                code: "unknown_command".into(),
                text: format!("{other:?} is not a command; try help"),
            });
        }
    };
    Ok(Some(command))
}

/// Checks what can be checked without the server.
pub fn check(command: &Command, state: &SessionState) -> Result<(), Refusal> {
    let logged_in = state.user().is_some();
    match command {
        Command::Create(name, password) | Command::Login(name, password) => {
            Username::parse(name).map_err(|e| Refusal::local(e.code(), e.to_string()))?;
            if let Some(password) = password {
                Password::parse(password).map_err(|e| Refusal::local(e.code(), e.to_string()))?;
            }
            if let Some(user) = state.user() {
                return Err(Refusal::local(
                    ErrorCode::SessionLoggedIn,
                    format!("you are logged in as {user}; log out first"),
                ));
            }
        }
        Command::Send(to, text) => {
            Username::parse(to).map_err(|e| Refusal::local(e.code(), e.to_string()))?;
            MessageBody::parse(text).map_err(|e| Refusal::local(e.code(), e.to_string()))?;
            if !logged_in {
                return Err(Refusal::local(ErrorCode::NotLoggedIn, "log in first"));
            }
        }
        Command::Logout | Command::Delete(_) | Command::Passwd(_) | Command::Fetch(_)
            if !logged_in =>
        {
            return Err(Refusal::local(ErrorCode::NotLoggedIn, "log in first"));
        }
        _ => {}
    }
    Ok(())
}

/// Formats a message as its output line.
pub fn message_line(m: &Message) -> String {
    format!("message {} {} {}", m.id, m.sender, m.body)
}

/// Formats a pushed event as its output line.
pub fn push_line(push: &Push) -> String {
    match push {
        Push::Message(m) => message_line(m),
        Push::LoggedOut { user, reason } => format!("notice logged_out {user} {}", reason.as_str()),
        Push::Goodbye { code, message } => {
            format!(
                "notice closed {code} {}",
                message.split_whitespace().collect::<Vec<_>>().join(" ")
            )
        }
    }
}

/// What running a command produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Output lines: messages first, the result line last.
    pub lines: Vec<String>,
    /// Acknowledge messages up to this id once the lines are shown.
    pub ack: Option<MessageId>,
}

/// Runs a checked command.
pub async fn execute<C: ChatClient>(client: &mut C, command: &Command) -> Outcome {
    let mut ack = None;
    let lines = run(client, command, &mut ack).await;
    Outcome { lines, ack }
}

async fn run<C: ChatClient>(
    client: &mut C,
    command: &Command,
    ack: &mut Option<MessageId>,
) -> Vec<String> {
    if let Err(refusal) = check(command, client.state()) {
        return vec![refusal.to_string()];
    }
    let result: Result<Vec<String>, ClientError> = async {
        Ok(match command {
            Command::Create(_, None)
            | Command::Login(_, None)
            | Command::Delete(None)
            | Command::Passwd(None) => {
                vec![
                    Refusal::usage(
                        "give the password on the line, or set CHAT_PASSWORD (on a terminal \
                         it is asked for)",
                    )
                    .to_string(),
                ]
            }
            Command::Create(name, Some(password)) => {
                vec![format!("ok {}", client.create(name, password).await?)]
            }
            Command::Login(name, Some(password)) => {
                vec![format!("ok {}", client.login(name, password).await?)]
            }
            Command::Logout => vec![format!("ok {}", client.logout().await?)],
            Command::Delete(Some(password)) => {
                let who = client
                    .state()
                    .user()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                client.delete(password).await?;
                vec![format!("ok deleted {who}")]
            }
            Command::Passwd(Some((old, new))) => {
                client.change_password(old, new).await?;
                vec!["ok password changed".into()]
            }
            Command::Send(to, text) => {
                let receipt = client.send(to, text).await?;
                vec![format!("ok sent {to} {}", receipt.id)]
            }
            Command::List(pattern, max) => {
                let names = client.list(pattern, *max).await?;
                let mut line = format!("ok accounts {}", names.len());
                for name in &names {
                    line.push(' ');
                    line.push_str(name.as_str());
                }
                vec![line]
            }
            Command::Fetch(max) => {
                let messages = client.fetch(*max).await?;
                *ack = messages.iter().map(|m| m.id).max();
                let mut lines: Vec<String> = messages.iter().map(message_line).collect();
                lines.push(format!("ok fetched {}", messages.len()));
                lines
            }
            Command::Help => HELP
                .iter()
                .map(|l| format!("help {l}"))
                .chain(["ok help".to_string()])
                .collect(),
            Command::Quit => vec!["ok bye".into()],
        })
    }
    .await;
    result.unwrap_or_else(|err| vec![Refusal::from(err).to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(
            parse("create alice").unwrap(),
            Some(Command::Create("alice".into(), None))
        );
        assert_eq!(
            parse("create alice s3cret-pass").unwrap(),
            Some(Command::Create("alice".into(), Some("s3cret-pass".into())))
        );
        assert_eq!(
            parse("  login   bob  pw-of-bob ").unwrap(),
            Some(Command::Login("bob".into(), Some("pw-of-bob".into())))
        );
        assert_eq!(parse("logout").unwrap(), Some(Command::Logout));
        assert_eq!(parse("delete").unwrap(), Some(Command::Delete(None)));
        assert_eq!(
            parse("passwd old-one new-one").unwrap(),
            Some(Command::Passwd(Some(("old-one".into(), "new-one".into()))))
        );
        assert_eq!(
            parse("send bob  hello   there ").unwrap(),
            Some(Command::Send("bob".into(), "hello   there".into()))
        );
        assert_eq!(
            parse("list").unwrap(),
            Some(Command::List(String::new(), 0))
        );
        assert_eq!(
            parse("list ^a").unwrap(),
            Some(Command::List("^a".into(), 0))
        );
        assert_eq!(
            parse("list ^a 5").unwrap(),
            Some(Command::List("^a".into(), 5))
        );
        assert_eq!(parse("fetch").unwrap(), Some(Command::Fetch(0)));
        assert_eq!(parse("fetch 3").unwrap(), Some(Command::Fetch(3)));
        assert_eq!(parse("quit").unwrap(), Some(Command::Quit));
        assert_eq!(parse("   ").unwrap(), None);
    }

    #[test]
    fn refuses_bad_lines() {
        assert_eq!(parse("create").unwrap_err().code, "usage");
        assert_eq!(parse("create a b c").unwrap_err().code, "usage");
        assert_eq!(parse("passwd only-one").unwrap_err().code, "usage");
        assert_eq!(parse("send bob").unwrap_err().code, "usage");
        assert_eq!(parse("fetch many").unwrap_err().code, "usage");
        assert_eq!(parse("logout now").unwrap_err().code, "usage");
        assert_eq!(parse("dance").unwrap_err().code, "unknown_command");
    }

    #[test]
    fn error_lines_stay_on_one_line() {
        let refusal = Refusal {
            code: "invalid_pattern".into(),
            text: "regex parse error:\n    (\n    ^\nerror: unclosed group".into(),
        };
        assert_eq!(
            refusal.to_string(),
            "error invalid_pattern regex parse error: ( ^ error: unclosed group"
        );
    }

    #[test]
    fn local_checks_use_server_codes() {
        let out = SessionState::LoggedOut;
        let alice = SessionState::LoggedIn(Username::parse("alice").unwrap());
        let code = |c: &Command, s: &SessionState| check(c, s).unwrap_err().code;
        assert_eq!(
            code(&Command::Create("x".repeat(51), None), &out),
            "invalid_username"
        );
        assert_eq!(
            code(&Command::Create("bob".into(), Some("short".into())), &out),
            "invalid_password"
        );
        assert_eq!(
            code(&Command::Login("bob".into(), None), &alice),
            "session_logged_in"
        );
        assert_eq!(
            code(&Command::Send("bob".into(), "y".repeat(281)), &alice),
            "message_too_long"
        );
        assert_eq!(
            code(&Command::Send("bob".into(), "hi".into()), &out),
            "not_logged_in"
        );
        assert_eq!(code(&Command::Fetch(1), &out), "not_logged_in");
        assert!(
            check(&Command::List("(".into(), 0), &out).is_ok(),
            "patterns are the server's to judge"
        );
    }

    #[test]
    fn passwords_never_show_in_debug_output() {
        let command = parse("login bob hunter2hunter2").unwrap().unwrap();
        assert!(!format!("{command:?}").contains("hunter2"));
        let filled = parse("passwd")
            .unwrap()
            .unwrap()
            .with_passwords(vec!["old-password".into(), "new-password".into()]);
        assert_eq!(
            filled,
            Command::Passwd(Some(("old-password".into(), "new-password".into())))
        );
    }
}
