//! The full-screen terminal UI: what `chat` runs when standard input and
//! output are a terminal (`--plain` keeps the line mode).
//!
//! - [`app`]: the state, and what keys and the connection's updates do to
//!   it (no I/O, no clock);
//! - [`ui`]: drawing that state (a pure function, tested on ratatui's
//!   `TestBackend`);
//! - [`net`]: the connection task, which owns the client, runs requests,
//!   reports pushes and reconnects;
//! - [`input`]: the line editor behind every text field.
//!
//! This module is the loop between them: terminal events and the
//! connection's updates go into the app, the app's requests go to the
//! connection task, and the screen is redrawn after each. Messages are
//! acknowledged only once a frame showing them has been written, so the
//! server keeps any message the user may not have seen.

pub mod app;
pub mod input;
pub mod net;
pub mod ui;

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use crossterm::event::{
    DisableBracketedPaste, EnableBracketedPaste, Event, EventStream, KeyEventKind,
};
use crossterm::execute;
use futures::StreamExt;
use ratatui::DefaultTerminal;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use self::app::{App, Endpoint};
use self::net::{Connect, Request, Update};
use self::ui::Clock;

/// How long the UI, once closed, waits for the connection task to log out.
const LOGOUT_WAIT: Duration = Duration::from_secs(5);

/// Runs the UI until the user quits; the connection task connects through
/// `connect`, and `endpoint` is what the status bar says about it.
pub async fn run<C: Connect>(endpoint: Endpoint, connect: C) -> ExitCode {
    let (requests, requests_rx) = mpsc::unbounded_channel();
    let (updates_tx, mut updates) = mpsc::unbounded_channel();
    let net = tokio::spawn(net::run(connect, requests_rx, updates_tx));
    let mut terminal = match Terminal::enter() {
        Ok(terminal) => terminal,
        Err(err) => {
            eprintln!("chat: cannot start the terminal UI: {err} (chat --plain runs without it)");
            return ExitCode::from(1);
        }
    };
    let mut app = App::new(endpoint);
    let result = event_loop(&mut terminal.inner, &mut app, &requests, &mut updates).await;
    // The terminal is the user's again at once; the logout finishes behind.
    drop(terminal);
    let _ = requests.send(Request::Quit);
    let _ = tokio::time::timeout(LOGOUT_WAIT, net).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chat: {err}");
            ExitCode::from(1)
        }
    }
}

/// The terminal in raw mode on the alternate screen, with bracketed paste
/// (a pasted text arrives whole, its newlines not taken for Enter); all of
/// it undone when dropped, and by the panic hook if the program panics.
struct Terminal {
    inner: DefaultTerminal,
}

impl Terminal {
    fn enter() -> io::Result<Self> {
        // Raw mode, the alternate screen, and a panic hook that leaves both;
        // whatever of it was done is undone if the rest fails.
        let inner = ratatui::try_init().inspect_err(|_| ratatui::restore())?;
        let undo_ratatui = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            leave_extras();
            undo_ratatui(info);
        }));
        let terminal = Self { inner };
        execute!(io::stdout(), EnableBracketedPaste)?;
        Ok(terminal)
    }
}

/// Undoes what this module adds to ratatui's setup: bracketed paste and a
/// hidden cursor.
fn leave_extras() {
    let mut stdout = io::stdout();
    let _ = execute!(stdout, DisableBracketedPaste, crossterm::cursor::Show);
    let _ = stdout.flush();
}

impl Drop for Terminal {
    fn drop(&mut self) {
        leave_extras();
        ratatui::restore();
    }
}

/// Draws, acknowledges what was drawn, and waits for the next key, update,
/// tick (countdowns and the active marks age) or stop signal.
async fn event_loop(
    terminal: &mut DefaultTerminal,
    app: &mut App,
    requests: &mpsc::UnboundedSender<Request>,
    updates: &mut mpsc::UnboundedReceiver<Update>,
) -> io::Result<()> {
    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut stop = std::pin::pin!(stop_signal());
    loop {
        terminal.draw(|frame| ui::render(frame, app, &Clock::now()))?;
        if let Some(through) = app.take_ack() {
            let _ = requests.send(Request::Ack(through));
        }
        if app.quitting() {
            return Ok(());
        }
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(Event::Key(key))) if key.kind != KeyEventKind::Release => {
                    if let Some(request) = app.on_key(key, Clock::now().now_ms) {
                        let _ = requests.send(request);
                    }
                }
                Some(Ok(Event::Paste(text))) => app.on_paste(&text),
                // A resize (or anything else) only needs the redraw.
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err),
                // The terminal is gone: nobody to show anything to.
                None => return Ok(()),
            },
            update = updates.recv() => {
                let Some(update) = update else {
                    return Err(io::Error::other("the connection task stopped unexpectedly"));
                };
                app.on_update(update);
                // Whatever else arrived goes into the same frame.
                while let Ok(update) = updates.try_recv() {
                    app.on_update(update);
                }
            }
            _ = tick.tick() => {}
            () = &mut stop => return Ok(()),
        }
    }
}

/// SIGINT, SIGTERM or SIGHUP (the terminal closed): quit as with Ctrl-C,
/// logging out and restoring the terminal. (In raw mode Ctrl-C is a key,
/// not a signal.)
#[cfg(unix)]
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate), Ok(mut hangup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        // No handlers: the signals keep their default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
        _ = hangup.recv() => {}
    }
}

#[cfg(not(unix))]
async fn stop_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
