//! `chat`: the terminal chat client.
//!
//! With standard input and output on a terminal it runs a full-screen UI
//! ([`tui`]): conversations, a message line, a status bar, and reconnection
//! with backoff. With `--plain`, or when standard input is not a terminal
//! (scripts, tests), it runs the line mode: one command per line, one
//! result line per command, in the format README.md documents as stable;
//! on a terminal that mode has a line editor that keeps what you type
//! intact while messages arrive. It speaks either transport
//! (`--transport socket|grpc`).

mod command;
mod tui;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use chat_core::SessionState;
use chat_core::client::{ChatClient, ClientError, Push};
use chat_grpc::GrpcClient;
use chat_socket::SocketClient;
use chat_tls::ClientTls;
use clap::Parser;
use tokio::sync::mpsc;

use crate::command::{Command, execute, parse, push_line};

/// Terminal client for the chat server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Server address [default: 127.0.0.1:7878 for socket, 127.0.0.1:50051
    /// for grpc].
    #[arg(long, env = "CHAT_SERVER")]
    server: Option<String>,
    /// Protocol to speak.
    #[arg(long, value_enum, env = "CHAT_TRANSPORT", default_value_t = Transport::Socket)]
    transport: Transport,
    /// Connect with TLS, trusting the system's root certificates unless
    /// --ca is given.
    #[arg(long, env = "CHAT_TLS")]
    tls: bool,
    /// Trust the CA certificates in this PEM file (implies --tls).
    #[arg(long, env = "CHAT_CA", value_name = "PATH")]
    ca: Option<std::path::PathBuf>,
    /// Check the server's certificate against this name instead of the
    /// host of --server (implies --tls).
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Line mode even on a terminal: one command per line, as in scripts
    /// (the full-screen UI is the default on a terminal).
    #[arg(long)]
    plain: bool,
}

impl Args {
    /// The TLS settings asked for, if any.
    fn tls(&self) -> Result<Option<ClientTls>, chat_tls::TlsError> {
        if !self.tls && self.ca.is_none() && self.tls_server_name.is_none() {
            return Ok(None);
        }
        let tls = match &self.ca {
            Some(path) => ClientTls::with_ca_file(path)?,
            None => ClientTls::system_roots()?,
        };
        match &self.tls_server_name {
            Some(name) => tls.server_name(name).map(Some),
            None => Ok(Some(tls)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    /// The compact binary socket protocol.
    Socket,
    /// gRPC.
    Grpc,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let server = args.server.clone().unwrap_or_else(|| {
        match args.transport {
            Transport::Socket => "127.0.0.1:7878",
            Transport::Grpc => "127.0.0.1:50051",
        }
        .to_string()
    });
    let tls = match args.tls() {
        Ok(tls) => tls,
        Err(err) => {
            eprintln!("chat: {err}");
            return ExitCode::from(2);
        }
    };
    if !args.plain && std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        let endpoint = tui::app::Endpoint {
            server: server.clone(),
            transport: match args.transport {
                Transport::Socket => "socket",
                Transport::Grpc => "grpc",
            },
            tls: tls.is_some(),
        };
        return match args.transport {
            Transport::Socket => {
                let connect = tui::net::SocketConnect { addr: server, tls };
                tui::run(endpoint, connect).await
            }
            Transport::Grpc => {
                let connect = tui::net::GrpcConnect { addr: server, tls };
                tui::run(endpoint, connect).await
            }
        };
    }
    let console = match console() {
        Ok(console) => console,
        Err(err) => {
            eprintln!("chat: cannot start the line editor: {err}");
            return ExitCode::from(1);
        }
    };
    let unreachable = |err: ClientError| {
        eprintln!("chat: cannot connect to {server}: {err}");
        ExitCode::from(1)
    };
    match args.transport {
        Transport::Socket => match SocketClient::connect_with(&server, tls).await {
            Ok(client) => run(client, console).await,
            Err(err) => unreachable(err),
        },
        Transport::Grpc => match GrpcClient::connect_with(&server, tls).await {
            Ok(client) => run(client, console).await,
            Err(err) => unreachable(err),
        },
    }
}

/// The interactive console on a terminal, plain lines otherwise.
fn console() -> rustyline::Result<Console> {
    if std::io::stdin().is_terminal() {
        Console::interactive()
    } else {
        Ok(Console::script())
    }
}

/// Acknowledges messages once they are on the screen, so the server
/// deletes them; a message shown but not acknowledged (the client was
/// killed in between) is delivered again at the next login. A failed ack
/// loses nothing (the message is simply delivered again), so it is not
/// reported.
async fn acknowledge<C: ChatClient>(client: &mut C, through: chat_core::MessageId) {
    let _ = client.ack(through).await;
}

/// Where lines come from and output goes.
struct Console {
    lines: mpsc::Receiver<String>,
    /// Interactive mode: asks the editor thread for the next line with this
    /// prompt, and prints above the line being edited.
    editor: Option<(
        std::sync::mpsc::Sender<String>,
        Box<dyn rustyline::ExternalPrinter + Send>,
    )>,
}

impl Console {
    fn script() -> Self {
        let (tx, lines) = mpsc::channel(16);
        // A plain thread, not tokio's stdin: a blocked read there would
        // hold up runtime shutdown after `quit`.
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            lines,
            editor: None,
        }
    }

    fn interactive() -> rustyline::Result<Self> {
        let mut editor = rustyline::DefaultEditor::new()?;
        let printer = editor.create_external_printer()?;
        let (prompt_tx, prompt_rx) = std::sync::mpsc::channel::<String>();
        let (tx, lines) = mpsc::channel(1);
        std::thread::spawn(move || {
            while let Ok(prompt) = prompt_rx.recv() {
                let line = match editor.readline(&prompt) {
                    Ok(line) => {
                        // A line that may carry a password stays out of
                        // the history.
                        let verb = line.split_whitespace().next().unwrap_or("");
                        if !matches!(verb, "create" | "login" | "delete" | "passwd") {
                            let _ = editor.add_history_entry(line.as_str());
                        }
                        line
                    }
                    // Ctrl-C or Ctrl-D: leave like `quit`.
                    Err(_) => "quit".to_string(),
                };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            lines,
            editor: Some((prompt_tx, Box::new(printer))),
        })
    }

    /// Supplies the passwords a command left out: `CHAT_PASSWORD` for one,
    /// else, on a terminal, asked for without echo. In a script without
    /// either the command stays incomplete, and says so when run.
    async fn fill_passwords(&self, command: Command) -> Command {
        let prompts = command.missing_passwords();
        if prompts.is_empty() {
            return command;
        }
        if prompts.len() == 1
            && let Ok(password) = std::env::var("CHAT_PASSWORD")
        {
            return command.with_passwords(vec![password]);
        }
        if self.editor.is_none() {
            return command;
        }
        let mut given = Vec::new();
        for prompt in prompts {
            // The line editor is idle between commands, so the terminal is
            // free for a prompt that reads without echo.
            let read =
                tokio::task::spawn_blocking(move || rpassword::prompt_password(prompt)).await;
            match read {
                Ok(Ok(password)) => given.push(password),
                _ => return command,
            }
        }
        command.with_passwords(given)
    }

    fn ask(&self, state: &SessionState) {
        if let Some((prompt, _)) = &self.editor {
            let text = match state.user() {
                Some(user) => format!("{user}> "),
                None => "(logged out)> ".to_string(),
            };
            let _ = prompt.send(text);
        }
    }

    fn print(&mut self, line: String) {
        match &mut self.editor {
            Some((_, printer)) => {
                // While the editor is reading, it clears the line being
                // typed, prints this, and redraws; between reads it writes
                // straight to the terminal. The newline serves both.
                let _ = printer.print(format!("{line}\n"));
            }
            None => {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{line}");
                let _ = stdout.flush();
            }
        }
    }
}

async fn run<C: ChatClient>(mut client: C, mut console: Console) -> ExitCode {
    console.ask(client.state());
    loop {
        tokio::select! {
            line = console.lines.recv() => {
                let Some(line) = line else { break };
                let command = match parse(&line) {
                    Ok(Some(command)) => command,
                    Ok(None) => {
                        console.ask(client.state());
                        continue;
                    }
                    Err(refusal) => {
                        console.print(refusal.to_string());
                        console.ask(client.state());
                        continue;
                    }
                };
                let command = console.fill_passwords(command).await;
                let outcome = execute(&mut client, &command).await;
                for out in outcome.lines {
                    console.print(out);
                }
                if let Some(through) = outcome.ack {
                    acknowledge(&mut client, through).await;
                }
                if command == Command::Quit {
                    break;
                }
                console.ask(client.state());
            }
            push = client.next_push() => match push {
                Some(push) => {
                    console.print(push_line(&push));
                    match push {
                        Push::Goodbye { .. } => return ExitCode::from(2),
                        Push::Message(message) => acknowledge(&mut client, message.id).await,
                        Push::LoggedOut { .. } => {}
                    }
                }
                None => {
                    console.print("notice closed connection the server closed the connection".into());
                    return ExitCode::from(2);
                }
            }
        }
    }
    ExitCode::SUCCESS
}
