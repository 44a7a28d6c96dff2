//! Drawing the [`App`]: a pure function of the state and the clock, so the
//! tests render every screen into ratatui's `TestBackend` and read it back.
//!
//! The chat screen, top to bottom: conversations (left) and the messages
//! of the one selected (right); a notice line when there is news; the
//! message line; the status bar; the key bindings of what has the focus.
//! The login screen is a box with the two fields and two buttons. Boxes
//! (help, find, delete, password) are drawn over either.

use std::time::Instant;

use chrono::TimeZone;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, List, ListItem, ListState, Padding, Paragraph, Wrap};
use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

use super::app::{
    App, Conversation, DeleteBox, Delivery, Entry, FindBox, Focus, LoginField, LoginForm, Overlay,
    PasswordForm, Screen,
};
use super::input::LineInput;
use super::net::Link;
use chat_core::MAX_BODY_CHARS;

/// The time the screen is drawn at: for countdowns (monotonic) and for
/// message times and the active mark (wall clock, milliseconds since the
/// Unix epoch).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Now, monotonic.
    pub now: Instant,
    /// Now, wall clock.
    pub now_ms: u64,
}

impl Clock {
    /// The current time.
    pub fn now() -> Self {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            now: Instant::now(),
            now_ms,
        }
    }
}

/// The message line shows its length from this many characters on.
const SHOW_LENGTH_FROM: usize = MAX_BODY_CHARS - 80;

/// The style of what has the focus.
fn focused_border(focused: bool) -> Style {
    if focused {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new().fg(Color::DarkGray)
    }
}

/// Draws the whole UI.
pub fn render(frame: &mut Frame, app: &App, clock: &Clock) {
    let [main, status, footer] = Layout::vertical([
        Constraint::Min(0),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let free = app.overlay.is_none();
    match &app.screen {
        Screen::Login(form) => login_screen(frame, main, form, free),
        Screen::Chat => chat_screen(frame, main, app, clock, free),
    }
    status_bar(frame, status, app, clock);
    footer_bar(frame, footer, app);
    match &app.overlay {
        None => {}
        Some(Overlay::Help) => help_box(frame, main),
        Some(Overlay::Find(find)) => find_box(frame, main, find, app),
        Some(Overlay::Delete(delete)) => delete_box(frame, main, delete, app),
        Some(Overlay::Password(form)) => password_box(frame, main, form),
    }
}

/// Draws a one-line text field in a bordered box, and puts the terminal's
/// cursor in it if it has the focus.
fn field(frame: &mut Frame, area: Rect, title: &str, input: &LineInput, focused: bool) {
    let block = Block::bordered()
        .title(format!(" {title} "))
        .border_style(focused_border(focused));
    let inner = block.inner(area);
    let view = input.view(inner.width);
    frame.render_widget(Paragraph::new(view.text).block(block), area);
    if focused && inner.width > 0 && inner.height > 0 {
        frame.set_cursor_position(Position::new(inner.x + view.cursor, inner.y));
    }
}

/// A box of at most `width` by `height` in the middle of `area`, cleared.
fn popup(frame: &mut Frame, area: Rect, width: u16, height: u16) -> Rect {
    let rect = area.centered(
        Constraint::Length(width.min(area.width)),
        Constraint::Length(height.min(area.height)),
    );
    frame.render_widget(Clear, rect);
    rect
}

fn error_line(text: &str) -> Line<'static> {
    Line::from(text.to_owned()).fg(Color::Red)
}

fn login_screen(frame: &mut Frame, area: Rect, form: &LoginForm, free: bool) {
    let rect = popup(frame, area, 64, 15);
    let block = Block::bordered()
        .title(" chat · sign in ")
        .border_style(Style::new().fg(Color::Cyan));
    let inner = block.inner(rect).inner(ratatui::layout::Margin::new(2, 1));
    frame.render_widget(block, rect);
    let [intro, name, password, _, buttons, _, message] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(1),
    ])
    .areas(inner);
    frame.render_widget(
        Paragraph::new("Log in, or create an account with a new name."),
        intro,
    );
    let focus = |f: LoginField| free && form.focus == f;
    field(frame, name, "Name", &form.name, focus(LoginField::Name));
    field(
        frame,
        password,
        "Password",
        &form.password,
        focus(LoginField::Password),
    );
    let button = |label: &str, f: LoginField| {
        if form.focus == f {
            Span::styled(
                format!("[ {label} ]"),
                Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED),
            )
        } else {
            Span::raw(format!("  {label}  "))
        }
    };
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            button("Log in", LoginField::LogIn),
            Span::raw("   "),
            button("Create account", LoginField::Create),
        ])),
        buttons,
    );
    let text = match (form.waiting, &form.error, &form.info) {
        (Some(super::net::Action::Create), ..) => Line::from("creating the account…").dim(),
        (Some(_), ..) => Line::from("logging in…").dim(),
        (None, Some(error), _) => error_line(error),
        (None, None, Some(info)) => Line::from(info.clone()).fg(Color::Green),
        (None, None, None) => Line::from(""),
    };
    frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), message);
}

fn chat_screen(frame: &mut Frame, area: Rect, app: &App, clock: &Clock, free: bool) {
    let notice_rows = u16::from(app.notice.is_some());
    let [body, notice, input] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(notice_rows),
        Constraint::Length(3),
    ])
    .areas(area);
    let list_width = (body.width / 4).clamp(18, 30).min(body.width);
    let [list, messages] =
        Layout::horizontal([Constraint::Length(list_width), Constraint::Min(0)]).areas(body);
    conversation_list(frame, list, app, clock);
    message_pane(frame, messages, app, clock);
    if let Some(n) = &app.notice {
        let line = if n.error {
            error_line(&n.text)
        } else {
            Line::from(n.text.clone()).fg(Color::Green)
        };
        frame.render_widget(Paragraph::new(line), notice);
    }
    message_line(frame, input, app, free);
}

fn conversation_list(frame: &mut Frame, area: Rect, app: &App, clock: &Clock) {
    let block = Block::bordered()
        .title(" Conversations ")
        .border_style(focused_border(app.focus == Focus::List));
    if app.conversations.is_empty() {
        let hint = Paragraph::new(vec![
            Line::from("None yet.").dim(),
            Line::from("Ctrl-N finds").dim(),
            Line::from("someone to talk to.").dim(),
        ])
        .block(block)
        .wrap(Wrap { trim: true });
        frame.render_widget(hint, area);
        return;
    }
    // Two columns go to the selection mark.
    let width = usize::from(block.inner(area).width.saturating_sub(2));
    let items: Vec<ListItem> = app
        .conversations
        .iter()
        .map(|c| ListItem::new(conversation_line(c, width, clock.now_ms)))
        .collect();
    let selected = app
        .selected
        .as_ref()
        .and_then(|peer| app.conversations.iter().position(|c| &c.peer == peer));
    let list = List::new(items)
        .block(block)
        .highlight_symbol("› ")
        .highlight_style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let mut state = ListState::default().with_selected(selected);
    frame.render_stateful_widget(list, area, &mut state);
}

/// `● name      (3)`: the active mark, the name (cut to fit), the unread
/// count at the right edge.
fn conversation_line(c: &Conversation, width: usize, now_ms: u64) -> Line<'static> {
    let mark = if c.active(now_ms) {
        Span::styled("● ", Style::new().fg(Color::Green))
    } else {
        Span::raw("  ")
    };
    let count = if c.unread > 0 {
        format!(" ({})", c.unread)
    } else {
        String::new()
    };
    let room = width.saturating_sub(2 + count.width());
    let name = truncate(c.peer.as_str(), room);
    let pad = room.saturating_sub(name.width());
    let mut spans = vec![mark, Span::raw(name), Span::raw(" ".repeat(pad))];
    if c.unread > 0 {
        spans.push(Span::styled(count, Style::new().fg(Color::Yellow).bold()));
    }
    Line::from(spans)
}

/// `text` cut to `width` columns, ending in `…` if cut.
fn truncate(text: &str, width: usize) -> String {
    if text.width() <= width {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for g in text.graphemes(true) {
        let w = g.width();
        if used + w + 1 > width {
            break;
        }
        out.push_str(g);
        used += w;
    }
    if width > 0 {
        out.push('…');
    }
    out
}

/// A message's time in the local zone: `HH:MM` today, with the date
/// before on other days.
pub fn local_time(at_ms: u64, now_ms: u64) -> String {
    let local = |ms: u64| {
        i64::try_from(ms)
            .ok()
            .and_then(|ms| chrono::Local.timestamp_millis_opt(ms).single())
    };
    match (local(at_ms), local(now_ms)) {
        (Some(at), Some(now)) if at.date_naive() == now.date_naive() => {
            at.format("%H:%M").to_string()
        }
        (Some(at), _) => at.format("%Y-%m-%d %H:%M").to_string(),
        (None, _) => "--:--".to_owned(),
    }
}

fn message_pane(frame: &mut Frame, area: Rect, app: &App, clock: &Clock) {
    let Some(conversation) = app.current() else {
        let block = Block::bordered()
            .title(" Messages ")
            .padding(Padding::horizontal(1));
        let hint = if app.conversations.is_empty() {
            "Press Ctrl-N to find an account and start a conversation."
        } else {
            "Choose a conversation on the left (↑↓, Enter)."
        };
        let hint = Paragraph::new(Line::from(hint).dim())
            .block(block)
            .wrap(Wrap { trim: true });
        frame.render_widget(hint, area);
        return;
    };
    let mut title = vec![Span::raw(format!(" {} ", conversation.peer)).bold()];
    if conversation.active(clock.now_ms) {
        title.push(Span::styled("● active ", Style::new().fg(Color::Green)));
    }
    let mut block = Block::bordered()
        .title(Line::from(title))
        .padding(Padding::horizontal(1));
    let hidden = app.scroll.min(conversation.entries.len());
    if hidden > 0 {
        block = block.title_bottom(Line::from(format!(" ↓ {hidden} more below (PgDn) ")).dim());
    }
    let inner = block.inner(area);
    let width = usize::from(inner.width);
    let shown = conversation.entries.len() - hidden;
    let mut lines: Vec<Line> = Vec::new();
    // Only as many entries as can fill the pane are laid out.
    for entry in conversation.entries.iter().take(shown).rev() {
        let mut entry_lines = entry_lines(entry, conversation, width, clock.now_ms);
        entry_lines.append(&mut lines);
        lines = entry_lines;
        if lines.len() >= usize::from(inner.height) {
            break;
        }
    }
    let skip = lines.len().saturating_sub(usize::from(inner.height));
    let lines: Vec<Line> = lines.into_iter().skip(skip).collect();
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

/// One message as lines of at most `width` columns:
/// `HH:MM name: text` then the delivery mark of a sent one, continued
/// lines indented under the name.
fn entry_lines(
    entry: &Entry,
    conversation: &Conversation,
    width: usize,
    now_ms: u64,
) -> Vec<Line<'static>> {
    let time = local_time(entry.at_ms, now_ms);
    let (who, color) = if entry.mine {
        ("you".to_owned(), Color::Yellow)
    } else {
        (conversation.peer.to_string(), Color::Cyan)
    };
    let mark = match &entry.delivery {
        Delivery::Received => None,
        Delivery::Sending => Some(Span::styled(" (sending)", Style::new().dim())),
        Delivery::Stored => Some(Span::styled(" ✓", Style::new().fg(Color::Green))),
        Delivery::Failed(refusal) => Some(Span::styled(
            format!(" ✗ {}", refusal.code),
            Style::new().fg(Color::Red),
        )),
    };
    let indent = time.width() + 1;
    let prefix = indent + who.width() + 2;
    let first = width.saturating_sub(prefix).max(1);
    let rest = width.saturating_sub(indent).max(1);
    let pieces = wrap(&entry.text, first, rest);
    let last = pieces.len() - 1;
    let mut lines = Vec::with_capacity(pieces.len() + 1);
    for (at, piece) in pieces.into_iter().enumerate() {
        let mut spans = if at == 0 {
            vec![
                Span::styled(time.clone(), Style::new().dim()),
                Span::raw(" "),
                Span::styled(who.clone(), Style::new().fg(color).bold()),
                Span::raw(": "),
            ]
        } else {
            vec![Span::raw(" ".repeat(indent))]
        };
        let used = if at == 0 { prefix } else { indent } + piece.width();
        spans.push(Span::raw(piece));
        if at == last
            && let Some(mark) = &mark
        {
            if used + mark.width() <= width {
                spans.push(mark.clone());
            } else {
                lines.push(Line::from(spans));
                spans = vec![Span::raw(" ".repeat(indent)), mark.clone()];
            }
        }
        lines.push(Line::from(spans));
    }
    lines
}

/// Splits `text` into lines of at most `first` columns, then `rest`:
/// between words where it can, inside a word only when the word is wider
/// than a line (by grapheme, so a wide character is never split).
pub fn wrap(text: &str, first: usize, rest: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut used = 0;
    let mut limit = first.max(1);
    let mut next_line = |line: &mut String, used: &mut usize, limit: &mut usize| {
        lines.push(line.trim_end().to_owned());
        line.clear();
        *used = 0;
        *limit = rest.max(1);
    };
    for word in text.split_inclusive(' ') {
        let visible = word.trim_end_matches(' ').width();
        if used + visible <= limit {
            line.push_str(word);
            used += word.width();
            continue;
        }
        if used > 0 {
            next_line(&mut line, &mut used, &mut limit);
        }
        if visible <= limit {
            line.push_str(word);
            used = word.width();
            continue;
        }
        for g in word.graphemes(true) {
            let w = g.width();
            if used > 0 && used + w > limit && !g.trim().is_empty() {
                next_line(&mut line, &mut used, &mut limit);
            }
            line.push_str(g);
            used += w;
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line.trim_end().to_owned());
    }
    lines
}

fn message_line(frame: &mut Frame, area: Rect, app: &App, free: bool) {
    let focused = free && app.focus == Focus::Input;
    let title = match &app.selected {
        Some(peer) => format!(" Message to {peer} "),
        None => " Message ".to_owned(),
    };
    let mut block = Block::bordered()
        .title(title)
        .border_style(focused_border(app.focus == Focus::Input));
    let chars = app.input.chars();
    if chars >= SHOW_LENGTH_FROM {
        let count = Line::from(format!(" {chars}/{MAX_BODY_CHARS} ")).right_aligned();
        block = block.title(if chars > MAX_BODY_CHARS {
            count.fg(Color::Red)
        } else {
            count
        });
    }
    let inner = block.inner(area);
    let view = app.input.view(inner.width);
    frame.render_widget(Paragraph::new(view.text).block(block), area);
    if focused && inner.width > 0 && inner.height > 0 {
        frame.set_cursor_position(Position::new(inner.x + view.cursor, inner.y));
    }
}

/// What the status bar says about the connection.
pub fn link_text(link: &Link, now: Instant) -> String {
    match link {
        Link::Connected => "connected".to_owned(),
        Link::Connecting { again: false } => "connecting…".to_owned(),
        Link::Connecting { again: true } => "reconnecting…".to_owned(),
        Link::Waiting {
            retry_at,
            why,
            again,
        } => {
            let left = retry_at.saturating_duration_since(now);
            // Rounded up: "in 0s" would be a lie while still waiting.
            let secs = left.as_millis().div_ceil(1000);
            if *again {
                format!("reconnecting in {secs}s ({why})")
            } else {
                format!("offline, retrying in {secs}s ({why})")
            }
        }
    }
}

fn status_bar(frame: &mut Frame, area: Rect, app: &App, clock: &Clock) {
    let user = match &app.user {
        Some(user) => user.to_string(),
        None => "not logged in".to_owned(),
    };
    let tls = if app.endpoint.tls { "TLS" } else { "no TLS" };
    let link_color = match app.link {
        Link::Connected => Color::Green,
        Link::Connecting { .. } => Color::Yellow,
        Link::Waiting { .. } => Color::Red,
    };
    let sep = || Span::raw(" │ ");
    let line = Line::from(vec![
        Span::raw(" "),
        Span::raw(user).bold(),
        sep(),
        Span::raw(app.endpoint.server.clone()),
        sep(),
        Span::raw(app.endpoint.transport),
        sep(),
        Span::raw(tls),
        sep(),
        Span::styled(
            link_text(&app.link, clock.now),
            Style::new().fg(link_color).bold(),
        ),
    ]);
    frame.render_widget(
        Paragraph::new(line).style(Style::new().bg(Color::Rgb(40, 40, 48)).fg(Color::White)),
        area,
    );
}

/// The keys that work now, as `key action` pairs.
fn hints(app: &App) -> &'static [(&'static str, &'static str)] {
    match (&app.overlay, &app.screen, app.focus) {
        (Some(Overlay::Help), ..) => &[("Esc", "close")],
        (Some(Overlay::Find(_)), ..) => &[
            ("Enter", "search / open"),
            ("↑↓", "choose"),
            ("Esc", "close"),
        ],
        (Some(Overlay::Delete(_)), ..) => &[("Enter", "delete the account"), ("Esc", "cancel")],
        (Some(Overlay::Password(_)), ..) => &[
            ("Tab", "next field"),
            ("Enter", "change"),
            ("Esc", "cancel"),
        ],
        (None, Screen::Login(_), _) => &[
            ("Tab", "next"),
            ("Enter", "log in / create"),
            ("F1", "help"),
            ("Ctrl-C", "quit"),
        ],
        (None, Screen::Chat, Focus::Input) => &[
            ("Enter", "send"),
            ("↑↓", "history"),
            ("Tab", "conversations"),
            ("Ctrl-N", "find"),
            ("Ctrl-F", "fetch"),
            ("F1", "help"),
            ("Ctrl-C", "quit"),
        ],
        (None, Screen::Chat, Focus::List) => &[
            ("↑↓", "choose"),
            ("Enter", "write"),
            ("/", "find"),
            ("f", "fetch"),
            ("p", "password"),
            ("o", "log out"),
            ("D", "delete account"),
            ("?", "help"),
            ("q", "quit"),
        ],
    }
}

fn footer_bar(frame: &mut Frame, area: Rect, app: &App) {
    let mut spans = vec![Span::raw(" ")];
    for (at, (key, action)) in hints(app).iter().enumerate() {
        if at > 0 {
            spans.push(Span::raw("  "));
        }
        spans.push(Span::styled(*key, Style::new().fg(Color::Cyan).bold()));
        spans.push(Span::raw(format!(" {action}")));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// Every key binding, and what the marks mean: short enough to fit a
/// 24-row terminal.
pub const HELP: &[(&str, &str)] = &[
    ("", "Keys"),
    ("Ctrl-C", "log out and quit"),
    ("F1, ?", "this help (? where it is not typed text)"),
    ("Esc", "close a box; from the message line, go to the list"),
    ("Enter", "send to the open conversation"),
    ("↑ ↓", "sent lines (history)"),
    (
        "← → Home End",
        "move; Ctrl-← Ctrl-→ by word, Ctrl-A Ctrl-E too",
    ),
    (
        "Ctrl-U Ctrl-K Ctrl-W",
        "delete to the start, to the end, a word",
    ),
    ("Tab", "switch between the list and the message line"),
    ("Ctrl-N", "find accounts; Enter opens a conversation"),
    ("Ctrl-F", "fetch queued messages"),
    (
        "Alt-↑↓, PgUp PgDn",
        "previous / next conversation; scroll it",
    ),
    ("", "In the conversation list"),
    ("↑ ↓ j k, Enter", "choose, then write"),
    ("/ f", "find accounts, fetch queued messages"),
    (
        "p o D q",
        "change password, log out, delete the account, quit",
    ),
    ("", "Marks"),
    ("(sending) ✓ ✗", "being sent, stored by the server, refused"),
    ("●", "sent you a message live in the last 5 minutes"),
    ("(3)", "unread messages"),
];

fn help_box(frame: &mut Frame, area: Rect) {
    let rect = popup(frame, area, 76, HELP.len() as u16 + 2);
    let key_width = HELP.iter().map(|(k, _)| k.width()).max().unwrap_or(0);
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(key, what)| {
            if key.is_empty() {
                Line::from(Span::styled(*what, Style::new().bold().underlined()))
            } else {
                Line::from(vec![
                    Span::styled(
                        format!(" {key:<key_width$}  "),
                        Style::new().fg(Color::Cyan),
                    ),
                    Span::raw(*what),
                ])
            }
        })
        .collect();
    let block = Block::bordered()
        .title(" Help ")
        .title_bottom(Line::from(" Esc closes ").right_aligned())
        .border_style(Style::new().fg(Color::Cyan));
    frame.render_widget(Paragraph::new(lines).block(block), rect);
}

fn find_box(frame: &mut Frame, area: Rect, find: &FindBox, app: &App) {
    let rect = popup(frame, area, 56, 14);
    let block = Block::bordered()
        .title(" Find accounts ")
        .border_style(Style::new().fg(Color::Cyan));
    let inner = block.inner(rect);
    frame.render_widget(block, rect);
    let [pattern, status, results] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(inner);
    field(
        frame,
        pattern,
        "Pattern (regex; empty: everyone)",
        &find.pattern,
        true,
    );
    let status_line = match (&find.error, find.waiting, &find.found) {
        (Some(error), ..) => error_line(error),
        (None, true, _) => Line::from(" searching…").dim(),
        (None, false, Some(found)) if found.pattern != find.pattern.text() => {
            Line::from(" Enter searches for the new pattern").dim()
        }
        (None, false, Some(found)) if found.names.is_empty() => {
            Line::from(format!(" no account matches {:?}", found.pattern)).dim()
        }
        (None, false, Some(found)) => {
            let n = found.names.len();
            let s = if n == 1 { "" } else { "s" };
            Line::from(format!(" {n} account{s}; Enter opens a conversation")).dim()
        }
        (None, false, None) => Line::from(" type a pattern, then Enter").dim(),
    };
    frame.render_widget(Paragraph::new(status_line), status);
    if let Some(found) = &find.found {
        let items: Vec<ListItem> = found
            .names
            .iter()
            .map(|name| {
                let mut spans = vec![Span::raw(name.to_string())];
                if app.user.as_ref() == Some(name) {
                    spans.push(Span::raw(" (you)").dim());
                }
                ListItem::new(Line::from(spans))
            })
            .collect();
        let list = List::new(items)
            .highlight_symbol("› ")
            .highlight_style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
        let mut state =
            ListState::default().with_selected((!found.names.is_empty()).then_some(found.selected));
        frame.render_stateful_widget(list, results, &mut state);
    }
}

fn delete_box(frame: &mut Frame, area: Rect, delete: &DeleteBox, app: &App) {
    let rect = popup(frame, area, 64, 11);
    let user = app.user.as_ref().map(|u| u.to_string()).unwrap_or_default();
    let block = Block::bordered()
        .title(format!(" Delete the account {user}? "))
        .border_style(Style::new().fg(Color::Red));
    let inner = block.inner(rect).inner(ratatui::layout::Margin::new(1, 0));
    frame.render_widget(block, rect);
    let [text, password, message] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Min(1),
    ])
    .areas(inner);
    frame.render_widget(
        Paragraph::new(vec![
            Line::from("This deletes the account and every message waiting"),
            Line::from("for it, and frees the name. It cannot be undone."),
            Line::from("Type your password to confirm, or Esc to keep it."),
        ]),
        text,
    );
    field(frame, password, "Password", &delete.password, true);
    let line = match (&delete.error, delete.waiting) {
        (Some(error), _) => error_line(error),
        (None, true) => Line::from("deleting…").dim(),
        (None, false) => Line::from(""),
    };
    frame.render_widget(Paragraph::new(line).wrap(Wrap { trim: true }), message);
}

fn password_box(frame: &mut Frame, area: Rect, form: &PasswordForm) {
    let rect = popup(frame, area, 60, 14);
    let block = Block::bordered()
        .title(" Change password ")
        .border_style(Style::new().fg(Color::Cyan));
    let inner = block.inner(rect).inner(ratatui::layout::Margin::new(1, 0));
    frame.render_widget(block, rect);
    let [current, new, again, message] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Min(1),
    ])
    .areas(inner);
    let titles = ["Current password", "New password", "New password again"];
    for (at, area) in [current, new, again].into_iter().enumerate() {
        field(frame, area, titles[at], &form.fields[at], form.focus == at);
    }
    let line = match (&form.error, form.waiting) {
        (Some(error), _) => error_line(error),
        (None, true) => Line::from("changing…").dim(),
        (None, false) => Line::from("8 to 256 characters").dim(),
    };
    frame.render_widget(Paragraph::new(line).wrap(Wrap { trim: true }), message);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chat_core::SendReceipt;
    use crossterm::event::KeyCode;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::*;
    use crate::command::Refusal;
    use crate::tui::app::tests::{ctrl, key, logged_in, message, name, type_text};
    use crate::tui::app::{ACTIVE_MS, App};
    use crate::tui::net::{Action, Request, Update};

    /// A fixed "now": 2025-06-01 12:00 UTC.
    const NOW_MS: u64 = 1_748_779_200_000;

    fn clock() -> Clock {
        Clock {
            now: Instant::now(),
            now_ms: NOW_MS,
        }
    }

    /// Draws `app` on a `width` by `height` test terminal; the screen as
    /// text, one line per row, trailing blanks cut.
    fn draw(app: &App, clock: &Clock, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| render(frame, app, clock)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| {
                let row: String = (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect();
                row.trim_end().to_owned()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The row of `screen` holding `text`.
    fn row_with<'a>(screen: &'a str, text: &str) -> &'a str {
        screen
            .lines()
            .find(|line| line.contains(text))
            .unwrap_or_else(|| panic!("no row with {text:?}:\n{screen}"))
    }

    /// Alice talking with Bob (selected) and Carol (two unread, active):
    /// one received message, one stored, one sending, one refused.
    fn chatting() -> App {
        let mut app = logged_in("alice");
        app.on_update(Update::Received(message(
            1,
            "bob",
            "hi alice, lunch at noon?",
            NOW_MS - 60_000,
        )));
        app.on_key(key(KeyCode::Enter), NOW_MS);
        type_text(&mut app, "sure, see you there");
        let Some(Request::Send { local, .. }) = app.on_key(key(KeyCode::Enter), NOW_MS) else {
            panic!("a send")
        };
        app.on_update(Update::Sent {
            local,
            receipt: SendReceipt {
                id: 4,
                timestamp_ms: NOW_MS - 30_000,
            },
        });
        type_text(&mut app, "bringing the slides");
        app.on_key(key(KeyCode::Enter), NOW_MS);
        type_text(&mut app, "this one fails");
        let Some(Request::Send { local, .. }) = app.on_key(key(KeyCode::Enter), NOW_MS) else {
            panic!("a send")
        };
        app.on_update(Update::NotSent {
            local,
            refusal: Refusal {
                code: "queue_full".into(),
                text: "the queue of bob is full; try again later".into(),
            },
        });
        for (id, text) in [(2, "are you coming to the demo?"), (3, "it starts at 3")] {
            app.on_update(Update::Received(message(
                id,
                "carol",
                text,
                NOW_MS - 10_000,
            )));
        }
        type_text(&mut app, "draft");
        app
    }

    #[test]
    fn the_login_screen_shows_the_fields_masked_and_the_error() {
        let mut app = App::new(crate::tui::app::tests::endpoint());
        type_text(&mut app, "alice");
        app.on_key(key(KeyCode::Tab), 0);
        type_text(&mut app, "pw");
        app.on_key(key(KeyCode::Enter), 0);
        type_text(&mut app, "s3cret");
        let screen = draw(&app, &clock(), 80, 24);
        assert!(screen.contains("chat · sign in"), "{screen}");
        assert!(row_with(&screen, "│alice").contains("│alice"), "{screen}");
        assert!(screen.contains("│••••••"), "masked:\n{screen}");
        assert!(!screen.contains("s3cret"), "{screen}");
        assert!(screen.contains("Log in") && screen.contains("Create account"));
        assert!(
            screen.contains("error invalid_password"),
            "the local check's refusal, with its code:\n{screen}"
        );
        assert!(
            screen.contains(" not logged in │ 127.0.0.1:7878 │ socket │ no TLS │ connecting…"),
            "{screen}"
        );
        assert!(
            screen.contains("Tab next  Enter log in / create"),
            "{screen}"
        );

        // The focused button shows in brackets; the wait for an answer is
        // said.
        app.on_key(key(KeyCode::Tab), 0);
        app.on_key(key(KeyCode::Right), 0);
        let screen = draw(&app, &clock(), 80, 24);
        assert!(screen.contains("[ Create account ]"), "{screen}");
        type_text(&mut app, "");
        app.on_key(key(KeyCode::BackTab), 0);
        app.on_key(key(KeyCode::BackTab), 0);
        type_text(&mut app, "long enough");
        app.on_key(key(KeyCode::Tab), 0);
        app.on_key(key(KeyCode::Tab), 0);
        assert!(app.on_key(key(KeyCode::Enter), 0).is_some());
        let screen = draw(&app, &clock(), 80, 24);
        assert!(screen.contains("creating the account…"), "{screen}");
    }

    #[test]
    fn the_chat_screen_shows_conversations_messages_and_delivery() {
        let app = chatting();
        let clock = clock();
        let screen = draw(&app, &clock, 100, 24);
        // Carol's conversation is newest, with two unread and the mark of
        // a live message; Bob's is selected.
        let carol = row_with(&screen, "carol");
        assert!(
            carol.contains("● carol") && carol.contains("(2)"),
            "{screen}"
        );
        assert!(row_with(&screen, "› ● bob").contains("bob"), "{screen}");
        assert!(screen.contains(" bob ● active "), "{screen}");
        let time = |ms| local_time(ms, NOW_MS);
        assert!(
            screen.contains(&format!(
                "{} bob: hi alice, lunch at noon?",
                time(NOW_MS - 60_000)
            )),
            "{screen}"
        );
        assert!(
            screen.contains(&format!(
                "{} you: sure, see you there ✓",
                time(NOW_MS - 30_000)
            )),
            "{screen}"
        );
        assert!(
            screen.contains(&format!(
                "{} you: bringing the slides (sending)",
                time(NOW_MS)
            )),
            "{screen}"
        );
        assert!(
            screen.contains("you: this one fails ✗ queue_full"),
            "{screen}"
        );
        assert!(
            screen.contains("not sent to bob: error queue_full the queue of bob is full"),
            "the notice line:\n{screen}"
        );
        assert!(screen.contains("Message to bob"), "{screen}");
        assert!(row_with(&screen, "│draft").contains("draft"), "{screen}");
        assert!(
            screen.contains(" alice │ 127.0.0.1:7878 │ socket │ no TLS │ connected"),
            "{screen}"
        );
        assert!(
            screen.contains("Enter send  ↑↓ history  Tab conversations  Ctrl-N find"),
            "{screen}"
        );
        assert!(!screen.contains("are you coming"), "carol's are not shown");

        // Later, nobody is active any more.
        let later = Clock {
            now_ms: NOW_MS + ACTIVE_MS,
            ..clock
        };
        let screen = draw(&app, &later, 100, 24);
        assert!(!screen.contains('●'), "{screen}");
    }

    #[test]
    fn an_empty_chat_screen_says_how_to_start() {
        let app = logged_in("alice");
        let screen = draw(&app, &clock(), 100, 20);
        assert!(screen.contains("Ctrl-N finds"), "{screen}");
        assert!(
            screen.contains("Press Ctrl-N to find an account and start a conversation."),
            "{screen}"
        );
        assert!(
            screen.contains("↑↓ choose  Enter write  / find  f fetch"),
            "the list has the focus:\n{screen}"
        );
    }

    #[test]
    fn the_find_box_lists_the_results() {
        let mut app = chatting();
        app.on_key(ctrl('n'), 0);
        type_text(&mut app, "^[a-c]");
        app.on_key(key(KeyCode::Enter), 0);
        let screen = draw(&app, &clock(), 100, 30);
        assert!(screen.contains("Find accounts"), "{screen}");
        assert!(screen.contains("searching…"), "{screen}");
        app.on_update(Update::Found {
            pattern: "^[a-c]".into(),
            names: vec![name("alice"), name("bob"), name("carol")],
        });
        app.on_key(key(KeyCode::Down), 0);
        let screen = draw(&app, &clock(), 100, 30);
        assert!(screen.contains("│^[a-c]"), "{screen}");
        assert!(
            screen.contains("3 accounts; Enter opens a conversation"),
            "{screen}"
        );
        assert!(screen.contains("alice (you)"), "{screen}");
        assert!(screen.contains("› bob"), "the highlighted one:\n{screen}");
        assert!(screen.contains("Enter search / open  ↑↓ choose  Esc close"));

        app.on_update(Update::Failed {
            action: Action::Search,
            refusal: Refusal {
                code: "invalid_pattern".into(),
                text: "regex parse error".into(),
            },
        });
        let screen = draw(&app, &clock(), 100, 30);
        assert!(
            screen.contains("error invalid_pattern regex parse error"),
            "{screen}"
        );
    }

    #[test]
    fn the_help_box_lists_the_keys_and_fits_24_rows() {
        let mut app = chatting();
        app.on_key(key(KeyCode::F(1)), 0);
        let screen = draw(&app, &clock(), 80, 24);
        for line in HELP {
            assert!(screen.contains(line.1), "{:?} missing:\n{screen}", line.1);
        }
        assert!(screen.contains(" Help "), "{screen}");
        assert!(
            screen.contains("Esc closes"),
            "the bottom border shows:\n{screen}"
        );
    }

    #[test]
    fn the_delete_box_asks_for_the_password_masked() {
        let mut app = chatting();
        app.on_key(key(KeyCode::Esc), 0);
        app.on_key(key(KeyCode::Char('D')), 0);
        type_text(&mut app, "password1");
        let screen = draw(&app, &clock(), 100, 30);
        assert!(screen.contains("Delete the account alice?"), "{screen}");
        assert!(screen.contains("It cannot be undone."), "{screen}");
        assert!(screen.contains("│•••••••••"), "{screen}");
        assert!(!screen.contains("password1"), "{screen}");
        assert!(screen.contains("Enter delete the account  Esc cancel"));
        app.on_key(key(KeyCode::Enter), 0);
        app.on_update(Update::Failed {
            action: Action::Delete,
            refusal: Refusal {
                code: "wrong_password".into(),
                text: "wrong password".into(),
            },
        });
        let screen = draw(&app, &clock(), 100, 30);
        assert!(screen.contains("error wrong_password wrong password"));
    }

    #[test]
    fn the_password_box_has_three_masked_fields() {
        let mut app = chatting();
        app.on_key(key(KeyCode::Esc), 0);
        app.on_key(key(KeyCode::Char('p')), 0);
        type_text(&mut app, "old-one");
        let screen = draw(&app, &clock(), 100, 30);
        for title in ["Current password", "New password", "New password again"] {
            assert!(screen.contains(title), "{screen}");
        }
        assert!(screen.contains("│•••••••"), "{screen}");
        assert!(!screen.contains("old-one"), "{screen}");
    }

    #[test]
    fn the_status_bar_counts_down_to_the_next_attempt() {
        let mut app = chatting();
        let clock = clock();
        app.on_update(Update::Lost("the connection closed".into()));
        app.on_update(Update::Link(Link::Waiting {
            retry_at: clock.now + Duration::from_millis(2_500),
            why: "connection: Connection refused (os error 111)".into(),
            again: true,
        }));
        let screen = draw(&app, &clock, 120, 24);
        assert!(
            screen.contains(
                " alice │ 127.0.0.1:7878 │ socket │ no TLS │ reconnecting in 3s \
                 (connection: Connection refused (os error 111))"
            ),
            "{screen}"
        );
        assert!(
            screen.contains("connection lost (the connection closed); reconnecting"),
            "{screen}"
        );
        // What was sent offline waits, shown as sending.
        assert!(screen.contains("you: bringing the slides (sending)"));

        app.on_update(Update::Link(Link::Connecting { again: true }));
        assert!(draw(&app, &clock, 120, 24).contains("│ reconnecting…"));
        let mut fresh = App::new(crate::tui::app::tests::endpoint());
        fresh.on_update(Update::Link(Link::Waiting {
            retry_at: clock.now + Duration::from_secs(10),
            why: "cannot connect".into(),
            again: false,
        }));
        let screen = draw(&fresh, &clock, 120, 24);
        assert!(
            screen.contains("offline, retrying in 10s (cannot connect)"),
            "{screen}"
        );
    }

    #[test]
    fn odd_text_and_tiny_terminals_never_break_the_screen() {
        let mut app = logged_in("alice");
        let wide = "漢字かな交じり文".repeat(12);
        let long_word = "x".repeat(200);
        let mixed = format!("e\u{301}mojis 👍🏽 and {long_word} then {wide}");
        let long_name = "n".repeat(50);
        for (id, body) in [(1, wide.as_str()), (2, mixed.as_str())] {
            let mut m = message(id, "bob", "x", NOW_MS);
            m.body =
                chat_core::MessageBody::parse(&body.chars().take(280).collect::<String>()).unwrap();
            app.on_update(Update::Received(m));
        }
        app.on_update(Update::Received(message(3, &long_name, "hi", NOW_MS)));
        type_text(&mut app, &wide);
        for (width, height) in [(100, 30), (40, 12), (20, 8), (10, 5), (1, 1), (3, 40)] {
            let screen = draw(&app, &clock(), width, height);
            assert_eq!(screen.split('\n').count(), usize::from(height));
        }
        // Wrapped, every piece of a long message is on screen.
        let screen = draw(&app, &clock(), 100, 40);
        assert!(screen.matches("xxxxxxxxxx").count() >= 10, "{screen}");
        let mut login = App::new(crate::tui::app::tests::endpoint());
        type_text(&mut login, &wide);
        for (width, height) in [(100, 30), (12, 6), (1, 1)] {
            draw(&login, &clock(), width, height);
        }
    }

    #[test]
    fn page_up_scrolls_back_and_says_how_much_is_below() {
        let mut app = logged_in("alice");
        for id in 1..=30 {
            let text = format!("message number {id}");
            app.on_update(Update::Received(message(id, "bob", &text, NOW_MS)));
        }
        let screen = draw(&app, &clock(), 80, 16);
        assert!(screen.contains("message number 30"), "{screen}");
        assert!(!screen.contains("more below"), "{screen}");
        app.on_key(key(KeyCode::PageUp), 0);
        app.on_key(key(KeyCode::PageUp), 0);
        let screen = draw(&app, &clock(), 80, 16);
        assert!(screen.contains("message number 20"), "{screen}");
        assert!(!screen.contains("message number 21"), "{screen}");
        assert!(screen.contains("↓ 10 more below (PgDn)"), "{screen}");
        // A new message keeps the same ones in view.
        app.on_update(Update::Received(message(31, "bob", "news", NOW_MS)));
        let screen = draw(&app, &clock(), 80, 16);
        assert!(screen.contains("message number 20"), "{screen}");
        assert!(screen.contains("↓ 11 more below"), "{screen}");
        for _ in 0..20 {
            app.on_key(key(KeyCode::PageUp), 0);
        }
        let screen = draw(&app, &clock(), 80, 16);
        assert!(screen.contains("message number 1"), "the oldest:\n{screen}");
        for _ in 0..20 {
            app.on_key(key(KeyCode::PageDown), 0);
        }
        let screen = draw(&app, &clock(), 80, 16);
        assert!(
            screen.contains("bob: news"),
            "back at the newest:\n{screen}"
        );
    }

    #[test]
    fn wrapping_breaks_between_words_and_inside_only_long_ones() {
        assert_eq!(wrap("hello there world", 11, 11), ["hello there", "world"]);
        assert_eq!(wrap("hello there world", 5, 20), ["hello", "there world"]);
        assert_eq!(wrap("abcdefghij", 4, 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("漢字漢字漢", 4, 4), ["漢字", "漢字", "漢"]);
        assert_eq!(wrap("", 10, 10), [""]);
        assert_eq!(wrap("a b", 0, 0), ["a", "b"]);
        assert_eq!(truncate("alexandria", 5), "alex…");
        assert_eq!(truncate("bob", 5), "bob");
    }
}
