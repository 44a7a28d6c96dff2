//! The TUI's state, and what keys and the connection's updates do to it.
//!
//! Nothing here does I/O or reads a clock: a key (with the time it was
//! pressed) or an [`Update`] goes in, the state changes, and what must go to
//! the server comes out as a [`Request`]. The renderer (`ui.rs`) only reads
//! the state, so every screen can be set up in a test without a terminal or
//! a server.

use std::collections::{BTreeSet, VecDeque};

use chat_core::{Message, MessageId, Password, SessionState, Username};
use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::input::{History, LineInput};
use super::net::{Action, Ended, Link, LocalId, Request, Update};
use crate::command::{Command, Refusal, check};

/// Entries a conversation keeps on screen; older ones are dropped (the
/// server deletes messages once shown, so this is display memory only).
pub const MAX_ENTRIES: usize = 1000;

/// How long after a message from someone arrived live they count as
/// active (●). The protocol reports no presence; a live message is the
/// only sign that its sender was logged in, and only when it was sent.
pub const ACTIVE_MS: u64 = 5 * 60 * 1000;

/// Message ids remembered to drop repeats: the newest this many. A repeat
/// is a message delivered and not yet acknowledged, which the server
/// replays at a login; it holds at most its queue limit (10,000 by default)
/// of those per user, all among the newest ids.
pub const MAX_SEEN: usize = 100_000;

/// Entries one Page Up / Page Down moves the conversation by.
const PAGE_ENTRIES: usize = 5;

/// Where the client is connected, for the status bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The server address as given.
    pub server: String,
    /// `socket` or `grpc`.
    pub transport: &'static str,
    /// Whether the connection uses TLS.
    pub tls: bool,
}

/// The whole state of the UI.
#[derive(Debug)]
pub struct App {
    /// Where the client connects.
    pub endpoint: Endpoint,
    /// The connection's state.
    pub link: Link,
    /// The screen shown.
    pub screen: Screen,
    /// Who is logged in.
    pub user: Option<Username>,
    /// Conversations, the most recently active first.
    pub conversations: Vec<Conversation>,
    /// The conversation shown, by peer.
    pub selected: Option<Username>,
    /// Where keys go on the chat screen.
    pub focus: Focus,
    /// The message line.
    pub input: LineInput,
    /// A box over the screen, if one is open.
    pub overlay: Option<Overlay>,
    /// The last thing worth telling that has no better place; cleared
    /// when the user sends, opens a conversation or presses Esc.
    pub notice: Option<Notice>,
    /// Entries of the shown conversation scrolled out below (0: the
    /// newest is visible).
    pub scroll: usize,
    history: History,
    /// Whose conversations these are: kept across a logout and login as
    /// the same user, dropped for another.
    owner: Option<Username>,
    /// Ids of messages shown to `owner` (the newest [`MAX_SEEN`]): a
    /// repeat (replayed after a reconnect) is dropped. The client library
    /// does not say when an acknowledgement went out (it may hold one back
    /// until a login's replay has arrived), so ids are not forgotten on
    /// acknowledgement but by age.
    seen: BTreeSet<MessageId>,
    /// The highest id received and not yet acknowledged.
    to_ack: Option<MessageId>,
    next_local: LocalId,
    /// Bumped at each message, to order conversations.
    clock: u64,
    quitting: bool,
}

/// A screen.
#[derive(Debug)]
pub enum Screen {
    /// Name and password, to log in or create an account.
    Login(LoginForm),
    /// Conversations, messages and the message line.
    Chat,
}

/// The login screen's fields.
#[derive(Debug)]
pub struct LoginForm {
    /// The account name.
    pub name: LineInput,
    /// The password (masked).
    pub password: LineInput,
    /// The focused field or button.
    pub focus: LoginField,
    /// The request sent and not yet answered.
    pub waiting: Option<Action>,
    /// The last refusal, as an `error CODE TEXT` line.
    pub error: Option<String>,
    /// Something to say that is not an error (e.g. "logged out").
    pub info: Option<String>,
}

/// A field or button of the login screen, in Tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginField {
    /// The name field.
    Name,
    /// The password field.
    Password,
    /// The "Log in" button.
    LogIn,
    /// The "Create account" button.
    Create,
}

impl LoginField {
    const ORDER: [LoginField; 4] = [
        LoginField::Name,
        LoginField::Password,
        LoginField::LogIn,
        LoginField::Create,
    ];

    fn step(self, by: isize) -> Self {
        let at = Self::ORDER.iter().position(|f| *f == self).unwrap_or(0);
        let len = Self::ORDER.len() as isize;
        Self::ORDER[(at as isize + by).rem_euclid(len) as usize]
    }
}

/// Where keys go on the chat screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    /// The conversation list: letters are commands.
    List,
    /// The message line: keys edit it.
    Input,
}

/// A box over the screen.
#[derive(Debug)]
pub enum Overlay {
    /// The key bindings.
    Help,
    /// Find accounts by pattern.
    Find(FindBox),
    /// Confirm deleting the account.
    Delete(DeleteBox),
    /// Change the password.
    Password(PasswordForm),
}

/// The search box.
#[derive(Debug, Default)]
pub struct FindBox {
    /// The pattern being typed.
    pub pattern: LineInput,
    /// The last results.
    pub found: Option<Found>,
    /// A search is under way.
    pub waiting: bool,
    /// The last refusal.
    pub error: Option<String>,
}

/// Results of a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The pattern searched.
    pub pattern: String,
    /// The matching names.
    pub names: Vec<Username>,
    /// The highlighted one.
    pub selected: usize,
}

/// The delete confirmation.
#[derive(Debug)]
pub struct DeleteBox {
    /// The password, asked again (masked).
    pub password: LineInput,
    /// The request is under way.
    pub waiting: bool,
    /// The last refusal.
    pub error: Option<String>,
}

/// The password change form.
#[derive(Debug)]
pub struct PasswordForm {
    /// Current, new, and new again (all masked).
    pub fields: [LineInput; 3],
    /// The focused field.
    pub focus: usize,
    /// The request is under way.
    pub waiting: bool,
    /// The last refusal.
    pub error: Option<String>,
}

/// The messages exchanged with one account.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// The other account.
    pub peer: Username,
    /// Messages, oldest first.
    pub entries: VecDeque<Entry>,
    /// Messages received since the conversation was last shown.
    pub unread: usize,
    /// Server time of the newest message pushed live from the peer.
    pub heard_ms: Option<u64>,
    /// When it was last active, on the app's own counter.
    active: u64,
}

impl Conversation {
    /// Whether the peer sent a message live within [`ACTIVE_MS`] of
    /// `now_ms`.
    pub fn active(&self, now_ms: u64) -> bool {
        self.heard_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < ACTIVE_MS)
    }
}

/// One message in a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Sent by the user (else received from the peer).
    pub mine: bool,
    /// The text.
    pub text: String,
    /// When: the server's time once it stored the message, until then the
    /// time it was typed (milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// Where a sent message is.
    pub delivery: Delivery,
    /// The app's name for a sent message.
    pub local: Option<LocalId>,
}

/// The delivery state of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Received from the peer.
    Received,
    /// Sent, not yet answered (also while the connection is being
    /// restored: it goes out then).
    Sending,
    /// The server stored it: it is delivered live or queued for the peer.
    Stored,
    /// The server refused it, or could not be reached.
    Failed(Refusal),
}

/// A line of news for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The text.
    pub text: String,
    /// Whether it reports a failure.
    pub error: bool,
}

impl Notice {
    fn info(text: impl Into<String>) -> Option<Self> {
        Some(Self {
            text: text.into(),
            error: false,
        })
    }

    fn error(text: impl Into<String>) -> Option<Self> {
        Some(Self {
            text: text.into(),
            error: true,
        })
    }
}

impl LoginForm {
    fn new(name: &str) -> Self {
        let mut form = Self {
            name: LineInput::new(),
            password: LineInput::masked(),
            focus: LoginField::Name,
            waiting: None,
            error: None,
            info: None,
        };
        if !name.is_empty() {
            form.name.set(name);
            form.focus = LoginField::Password;
        }
        form
    }
}

impl DeleteBox {
    fn new() -> Self {
        Self {
            password: LineInput::masked(),
            waiting: false,
            error: None,
        }
    }
}

impl PasswordForm {
    fn new() -> Self {
        Self {
            fields: [
                LineInput::masked(),
                LineInput::masked(),
                LineInput::masked(),
            ],
            focus: 0,
            waiting: false,
            error: None,
        }
    }
}

fn is_ctrl(key: &KeyEvent, c: char) -> bool {
    key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char(c)
}

/// A plain key: no Ctrl or Alt (Shift is part of the character).
fn plain(key: &KeyEvent) -> bool {
    !key.modifiers
        .intersects(KeyModifiers::CONTROL | KeyModifiers::ALT)
}

impl App {
    /// The login screen, connecting.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            link: Link::Connecting { again: false },
            screen: Screen::Login(LoginForm::new("")),
            user: None,
            conversations: Vec::new(),
            selected: None,
            focus: Focus::List,
            input: LineInput::new(),
            overlay: None,
            notice: None,
            scroll: 0,
            history: History::default(),
            owner: None,
            seen: BTreeSet::new(),
            to_ack: None,
            next_local: 1,
            clock: 0,
            quitting: false,
        }
    }

    /// Whether the user asked to quit (Ctrl-C, or `q`).
    pub fn quitting(&self) -> bool {
        self.quitting
    }

    /// The highest message id received since the last call, to acknowledge
    /// once it is on the screen.
    pub fn take_ack(&mut self) -> Option<MessageId> {
        self.to_ack.take()
    }

    /// The conversation shown.
    pub fn current(&self) -> Option<&Conversation> {
        let peer = self.selected.as_ref()?;
        self.conversations.iter().find(|c| &c.peer == peer)
    }

    /// A pasted text: into the focused field, as one line.
    pub fn on_paste(&mut self, text: &str) {
        if let Some(field) = self.focused_field() {
            field.insert(text);
        }
    }

    /// The text field keys go to, if any.
    fn focused_field(&mut self) -> Option<&mut LineInput> {
        match (&mut self.overlay, &mut self.screen) {
            (Some(Overlay::Help), _) => None,
            (Some(Overlay::Find(find)), _) => Some(&mut find.pattern),
            (Some(Overlay::Delete(delete)), _) => Some(&mut delete.password),
            (Some(Overlay::Password(form)), _) => form.fields.get_mut(form.focus),
            (None, Screen::Login(form)) => match form.focus {
                LoginField::Name => Some(&mut form.name),
                LoginField::Password => Some(&mut form.password),
                LoginField::LogIn | LoginField::Create => None,
            },
            (None, Screen::Chat) => (self.focus == Focus::Input).then_some(&mut self.input),
        }
    }

    /// A key pressed at `now_ms` (milliseconds since the Unix epoch: the
    /// time a sent message shows until the server stamps it).
    pub fn on_key(&mut self, key: KeyEvent, now_ms: u64) -> Option<Request> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        if is_ctrl(&key, 'c') {
            self.quitting = true;
            return None;
        }
        if self.overlay.is_some() {
            return self.overlay_key(key);
        }
        if key.code == KeyCode::F(1) {
            self.overlay = Some(Overlay::Help);
            return None;
        }
        match self.screen {
            Screen::Login(_) => self.login_key(key),
            Screen::Chat => self.chat_key(key, now_ms),
        }
    }

    fn login_key(&mut self, key: KeyEvent) -> Option<Request> {
        let Screen::Login(form) = &mut self.screen else {
            return None;
        };
        match key.code {
            KeyCode::Tab | KeyCode::Down => form.focus = form.focus.step(1),
            KeyCode::BackTab | KeyCode::Up => form.focus = form.focus.step(-1),
            KeyCode::Left | KeyCode::Right
                if matches!(form.focus, LoginField::LogIn | LoginField::Create) =>
            {
                form.focus = if form.focus == LoginField::LogIn {
                    LoginField::Create
                } else {
                    LoginField::LogIn
                };
            }
            KeyCode::Esc => {
                form.error = None;
                form.info = None;
            }
            KeyCode::Enter => match form.focus {
                LoginField::Name => form.focus = LoginField::Password,
                LoginField::Password | LoginField::LogIn => return self.enter(Action::Login),
                LoginField::Create => return self.enter(Action::Create),
            },
            _ => {
                let field = match form.focus {
                    LoginField::Name => &mut form.name,
                    LoginField::Password => &mut form.password,
                    LoginField::LogIn | LoginField::Create => return None,
                };
                field.edit(&key);
            }
        }
        None
    }

    /// Logs in or creates the account in the login form.
    fn enter(&mut self, action: Action) -> Option<Request> {
        let Screen::Login(form) = &mut self.screen else {
            return None;
        };
        if form.waiting.is_some() {
            return None;
        }
        let name = form.name.text().trim().to_owned();
        let password = form.password.text().to_owned();
        let command = match action {
            Action::Create => Command::Create(name.clone(), Some(password.clone())),
            _ => Command::Login(name.clone(), Some(password.clone())),
        };
        form.info = None;
        if let Err(refusal) = check(&command, &SessionState::LoggedOut) {
            form.focus = if refusal.code == "invalid_username" {
                LoginField::Name
            } else {
                LoginField::Password
            };
            form.error = Some(refusal.to_string());
            return None;
        }
        form.error = None;
        form.waiting = Some(action);
        // The password lives on in the connection task only (to log in
        // again after a reconnect); a refused one is typed again.
        form.password.clear();
        Some(match action {
            Action::Create => Request::Create { name, password },
            _ => Request::Login { name, password },
        })
    }

    fn chat_key(&mut self, key: KeyEvent, now_ms: u64) -> Option<Request> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        match key.code {
            KeyCode::Char('n') if ctrl => return self.open_find(),
            KeyCode::Char('f') if ctrl => return self.fetch(),
            KeyCode::Tab | KeyCode::BackTab => {
                self.focus = match self.focus {
                    Focus::List => Focus::Input,
                    Focus::Input => Focus::List,
                };
                return None;
            }
            KeyCode::PageUp => {
                let most = self
                    .current()
                    .map_or(0, |c| c.entries.len().saturating_sub(1));
                self.scroll = (self.scroll + PAGE_ENTRIES).min(most);
                return None;
            }
            KeyCode::PageDown => {
                self.scroll = self.scroll.saturating_sub(PAGE_ENTRIES);
                return None;
            }
            KeyCode::Up if ctrl || alt => {
                self.select_by(-1);
                return None;
            }
            KeyCode::Down if ctrl || alt => {
                self.select_by(1);
                return None;
            }
            _ => {}
        }
        match self.focus {
            Focus::Input => self.input_key(key, now_ms),
            Focus::List => self.list_key(key),
        }
    }

    fn input_key(&mut self, key: KeyEvent, now_ms: u64) -> Option<Request> {
        match key.code {
            KeyCode::Enter => return self.send(now_ms),
            KeyCode::Up => {
                let current = self.input.text().to_owned();
                if let Some(line) = self.history.older(&current) {
                    let line = line.to_owned();
                    self.input.set(&line);
                }
            }
            KeyCode::Down => {
                if let Some(line) = self.history.newer() {
                    let line = line.to_owned();
                    self.input.set(&line);
                }
            }
            KeyCode::Esc => {
                self.focus = Focus::List;
                self.notice = None;
            }
            KeyCode::Char('?') if self.input.is_empty() && plain(&key) => {
                self.overlay = Some(Overlay::Help);
            }
            _ => {
                self.input.edit(&key);
            }
        }
        None
    }

    fn list_key(&mut self, key: KeyEvent) -> Option<Request> {
        if !plain(&key) {
            return None;
        }
        match key.code {
            KeyCode::Up | KeyCode::Char('k') => self.select_by(-1),
            KeyCode::Down | KeyCode::Char('j') => self.select_by(1),
            KeyCode::Enter | KeyCode::Right | KeyCode::Char('i' | 'l') => {
                self.focus = Focus::Input;
            }
            KeyCode::Char('/' | 'n') => return self.open_find(),
            KeyCode::Char('f') => return self.fetch(),
            KeyCode::Char('p') => self.overlay = Some(Overlay::Password(PasswordForm::new())),
            KeyCode::Char('D') => self.overlay = Some(Overlay::Delete(DeleteBox::new())),
            KeyCode::Char('o') => {
                self.notice = Notice::info("logging out…");
                return Some(Request::Logout);
            }
            KeyCode::Char('?') => self.overlay = Some(Overlay::Help),
            KeyCode::Char('q') => self.quitting = true,
            _ => {}
        }
        None
    }

    fn open_find(&mut self) -> Option<Request> {
        self.overlay = Some(Overlay::Find(FindBox::default()));
        None
    }

    fn fetch(&mut self) -> Option<Request> {
        self.notice = Notice::info("fetching queued messages…");
        Some(Request::Fetch)
    }

    /// Sends the message line to the conversation shown.
    fn send(&mut self, now_ms: u64) -> Option<Request> {
        let text = self.input.text().trim_end().to_owned();
        if text.trim().is_empty() {
            return None;
        }
        let (Some(peer), Some(user)) = (self.selected.clone(), self.user.clone()) else {
            self.notice = Notice::error("choose a conversation first: Ctrl-N finds accounts");
            return None;
        };
        let command = Command::Send(peer.to_string(), text.clone());
        if let Err(refusal) = check(&command, &SessionState::LoggedIn(user)) {
            // The line stays, to be shortened.
            self.notice = Notice::error(refusal.to_string());
            return None;
        }
        self.history.push(&text);
        self.input.clear();
        self.notice = None;
        let local = self.next_local;
        self.next_local += 1;
        self.scroll = 0;
        self.push_entry(
            &peer,
            Entry {
                mine: true,
                text: text.clone(),
                at_ms: now_ms,
                delivery: Delivery::Sending,
                local: Some(local),
            },
        );
        Some(Request::Send {
            local,
            to: peer.to_string(),
            body: text,
        })
    }

    fn overlay_key(&mut self, key: KeyEvent) -> Option<Request> {
        let Some(overlay) = &mut self.overlay else {
            return None;
        };
        if key.code == KeyCode::Esc {
            self.overlay = None;
            return None;
        }
        match overlay {
            Overlay::Help => {
                if matches!(
                    key.code,
                    KeyCode::F(1) | KeyCode::Enter | KeyCode::Char('?' | 'q')
                ) {
                    self.overlay = None;
                }
                None
            }
            Overlay::Find(find) => match key.code {
                KeyCode::Up => {
                    if let Some(found) = &mut find.found {
                        found.selected = found.selected.saturating_sub(1);
                    }
                    None
                }
                KeyCode::Down => {
                    if let Some(found) = &mut find.found {
                        found.selected = (found.selected + 1).min(found.names.len().max(1) - 1);
                    }
                    None
                }
                KeyCode::Enter => {
                    let chosen = find
                        .found
                        .as_ref()
                        .filter(|found| found.pattern == find.pattern.text())
                        .and_then(|found| found.names.get(found.selected).cloned());
                    if let Some(peer) = chosen {
                        self.overlay = None;
                        self.open(peer);
                        return None;
                    }
                    if find.waiting {
                        return None;
                    }
                    find.waiting = true;
                    find.error = None;
                    Some(Request::Search {
                        pattern: find.pattern.text().to_owned(),
                    })
                }
                _ => {
                    find.pattern.edit(&key);
                    None
                }
            },
            Overlay::Delete(delete) => match key.code {
                KeyCode::Enter if !delete.waiting => {
                    if delete.password.is_empty() {
                        delete.error = Some("type your password to confirm".into());
                        return None;
                    }
                    delete.waiting = true;
                    delete.error = None;
                    Some(Request::Delete {
                        password: delete.password.take(),
                    })
                }
                _ => {
                    delete.password.edit(&key);
                    None
                }
            },
            Overlay::Password(form) => match key.code {
                KeyCode::Tab | KeyCode::Down => {
                    form.focus = (form.focus + 1) % form.fields.len();
                    None
                }
                KeyCode::BackTab | KeyCode::Up => {
                    form.focus = (form.focus + form.fields.len() - 1) % form.fields.len();
                    None
                }
                KeyCode::Enter if form.focus + 1 < form.fields.len() => {
                    form.focus += 1;
                    None
                }
                KeyCode::Enter if !form.waiting => {
                    let [old, new, again] = &mut form.fields;
                    if new.text() != again.text() {
                        form.error = Some("the new passwords differ: type them again".into());
                        new.clear();
                        again.clear();
                        form.focus = 1;
                        return None;
                    }
                    if let Err(err) = Password::parse(new.text()) {
                        form.error = Some(format!("error {} {err}", err.code()));
                        form.focus = 1;
                        return None;
                    }
                    form.waiting = true;
                    form.error = None;
                    let request = Request::ChangePassword {
                        old: old.take(),
                        new: new.take(),
                    };
                    again.clear();
                    form.focus = 0;
                    Some(request)
                }
                _ => {
                    if let Some(field) = form.fields.get_mut(form.focus) {
                        field.edit(&key);
                    }
                    None
                }
            },
        }
    }

    /// Shows the conversation with `peer` (starting it if new) and puts
    /// the cursor on the message line.
    fn open(&mut self, peer: Username) {
        if !self.conversations.iter().any(|c| c.peer == peer) {
            self.clock += 1;
            self.conversations.insert(
                0,
                Conversation {
                    peer: peer.clone(),
                    entries: VecDeque::new(),
                    unread: 0,
                    heard_ms: None,
                    active: self.clock,
                },
            );
        }
        self.select(peer);
        self.focus = Focus::Input;
        self.notice = None;
    }

    fn select(&mut self, peer: Username) {
        if let Some(conversation) = self.conversations.iter_mut().find(|c| c.peer == peer) {
            conversation.unread = 0;
        }
        if self.selected.as_ref() != Some(&peer) {
            self.scroll = 0;
        }
        self.selected = Some(peer);
    }

    /// Selects the conversation `by` places down the list (up if
    /// negative), stopping at the ends.
    fn select_by(&mut self, by: isize) {
        if self.conversations.is_empty() {
            return;
        }
        let at = self
            .selected
            .as_ref()
            .and_then(|peer| self.conversations.iter().position(|c| &c.peer == peer));
        let next = match at {
            None => 0,
            Some(at) => at
                .saturating_add_signed(by)
                .min(self.conversations.len() - 1),
        };
        let peer = self.conversations[next].peer.clone();
        self.select(peer);
    }

    /// Adds an entry to the conversation with `peer` (starting it if new)
    /// and moves that conversation to the top. A received message goes in
    /// order of the server's time: a replayed one can arrive after a newer
    /// fetched one (on gRPC the push stream and the fetch's answer are not
    /// ordered); a sent one goes last, where the user typed it.
    fn push_entry(&mut self, peer: &Username, entry: Entry) -> &mut Conversation {
        self.clock += 1;
        let at = match self.conversations.iter().position(|c| &c.peer == peer) {
            Some(at) => at,
            None => {
                self.conversations.push(Conversation {
                    peer: peer.clone(),
                    entries: VecDeque::new(),
                    unread: 0,
                    heard_ms: None,
                    active: 0,
                });
                self.conversations.len() - 1
            }
        };
        let mut conversation = self.conversations.remove(at);
        conversation.active = self.clock;
        if conversation.entries.len() == MAX_ENTRIES {
            conversation.entries.pop_front();
        }
        let at = if entry.mine {
            conversation.entries.len()
        } else {
            conversation
                .entries
                .iter()
                .rposition(|e| e.at_ms <= entry.at_ms)
                .map_or(0, |before| before + 1)
        };
        conversation.entries.insert(at, entry);
        self.conversations.insert(0, conversation);
        &mut self.conversations[0]
    }

    /// A message pushed (`live`) or fetched.
    fn receive(&mut self, message: Message, live: bool) {
        if self.user.is_none() {
            // Not shown, so not acknowledged: it comes again at the next
            // login.
            return;
        }
        // A repeat is acknowledged again (it came back because its
        // acknowledgement never went out), but shown once.
        self.to_ack = self.to_ack.max(Some(message.id));
        if !self.seen.insert(message.id) {
            return;
        }
        if self.seen.len() > MAX_SEEN {
            self.seen.pop_first();
        }
        let peer = message.sender.clone();
        if self.selected.is_none() {
            self.selected = Some(peer.clone());
        }
        let shown = self.selected.as_ref() == Some(&peer);
        if shown && self.scroll > 0 {
            // Keep the same entries in view.
            self.scroll += 1;
        }
        let conversation = self.push_entry(
            &peer,
            Entry {
                mine: false,
                text: message.body.as_str().to_owned(),
                at_ms: message.timestamp_ms,
                delivery: Delivery::Received,
                local: None,
            },
        );
        if live {
            conversation.heard_ms = conversation.heard_ms.max(Some(message.timestamp_ms));
        }
        if !shown {
            conversation.unread += 1;
        }
    }

    fn entry_mut(&mut self, local: LocalId) -> Option<&mut Entry> {
        self.conversations
            .iter_mut()
            .flat_map(|c| c.entries.iter_mut())
            .find(|e| e.local == Some(local))
    }

    /// Applies what the connection task reported.
    pub fn on_update(&mut self, update: Update) {
        match update {
            Update::Link(link) => self.link = link,
            Update::Lost(why) => {
                self.notice = Notice::error(format!("connection lost ({why}); reconnecting"));
            }
            Update::Entered {
                user,
                created,
                again,
            } => self.entered(user, created, again),
            Update::LoggedOut(ended) => self.logged_out(ended),
            Update::PasswordChanged => {
                if matches!(self.overlay, Some(Overlay::Password(_))) {
                    self.overlay = None;
                }
                self.notice = Notice::info("password changed");
            }
            Update::Sent { local, receipt } => {
                if let Some(entry) = self.entry_mut(local) {
                    entry.delivery = Delivery::Stored;
                    entry.at_ms = receipt.timestamp_ms;
                }
            }
            Update::NotSent { local, refusal } => {
                let mut peer = None;
                for conversation in &mut self.conversations {
                    if let Some(entry) = conversation
                        .entries
                        .iter_mut()
                        .find(|e| e.local == Some(local))
                    {
                        entry.delivery = Delivery::Failed(refusal.clone());
                        peer = Some(conversation.peer.clone());
                    }
                }
                let to = peer.map(|p| format!(" to {p}")).unwrap_or_default();
                self.notice = Notice::error(format!("not sent{to}: {refusal}"));
            }
            Update::Received(message) => self.receive(message, true),
            Update::Fetched { messages, asked } => {
                let count = messages.len();
                for message in messages {
                    self.receive(message, false);
                }
                if asked || count > 0 {
                    let s = if count == 1 { "" } else { "s" };
                    self.notice = Notice::info(format!("fetched {count} queued message{s}"));
                }
            }
            Update::Found { pattern, names } => {
                if let Some(Overlay::Find(find)) = &mut self.overlay {
                    find.waiting = false;
                    find.error = None;
                    find.found = Some(Found {
                        pattern,
                        names,
                        selected: 0,
                    });
                }
            }
            Update::Failed { action, refusal } => self.failed(action, refusal),
        }
    }

    fn entered(&mut self, user: Username, created: bool, again: bool) {
        if again && self.user.as_ref() == Some(&user) {
            self.notice = Notice::info(format!("reconnected; logged in again as {user}"));
            return;
        }
        if self.owner.as_ref() != Some(&user) {
            self.conversations.clear();
            self.selected = None;
            self.seen.clear();
            self.to_ack = None;
            self.scroll = 0;
            self.owner = Some(user.clone());
        }
        self.notice = if created {
            Notice::info(format!(
                "account {user} created; Ctrl-N finds someone to talk to"
            ))
        } else {
            Notice::info(format!("logged in as {user}"))
        };
        self.user = Some(user);
        self.screen = Screen::Chat;
        self.overlay = None;
        self.focus = if self.selected.is_some() {
            Focus::Input
        } else {
            Focus::List
        };
    }

    fn logged_out(&mut self, ended: Ended) {
        let name = self.user.take().map(|u| u.to_string()).unwrap_or_default();
        self.overlay = None;
        self.notice = None;
        self.to_ack = None;
        let mut form = LoginForm::new(&name);
        match ended {
            Ended::Requested => form.info = Some(format!("{name} logged out")),
            Ended::Deleted => {
                // Nothing of the account is left to come back to.
                self.conversations.clear();
                self.selected = None;
                self.seen.clear();
                self.owner = None;
                self.history = History::default();
                self.input.clear();
                form = LoginForm::new("");
                form.info = Some(format!("account {name} deleted"));
            }
            Ended::Refused(refusal) => {
                form.error = Some(format!("logged out, could not log in again: {refusal}"));
            }
        }
        self.screen = Screen::Login(form);
    }

    fn failed(&mut self, action: Action, refusal: Refusal) {
        let line = refusal.to_string();
        match (action, &mut self.screen, &mut self.overlay) {
            (Action::Create | Action::Login, Screen::Login(form), _) => {
                form.waiting = None;
                form.error = Some(line);
                form.focus = LoginField::Password;
            }
            (Action::Search, _, Some(Overlay::Find(find))) => {
                find.waiting = false;
                find.error = Some(line);
            }
            (Action::Delete, _, Some(Overlay::Delete(delete))) => {
                delete.waiting = false;
                delete.error = Some(line);
            }
            (Action::ChangePassword, _, Some(Overlay::Password(form))) => {
                form.waiting = false;
                form.error = Some(line);
            }
            (action, ..) => {
                let what = match action {
                    Action::Create => "create",
                    Action::Login => "log in",
                    Action::Logout => "log out",
                    Action::Delete => "delete",
                    Action::ChangePassword => "change password",
                    Action::Search => "find",
                    Action::Fetch => "fetch",
                };
                self.notice = Notice::error(format!("{what}: {line}"));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chat_core::{MessageBody, SendReceipt};

    pub(crate) fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    pub(crate) fn ctrl(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
    }

    pub(crate) fn name(raw: &str) -> Username {
        Username::parse(raw).unwrap()
    }

    pub(crate) fn endpoint() -> Endpoint {
        Endpoint {
            server: "127.0.0.1:7878".into(),
            transport: "socket",
            tls: false,
        }
    }

    pub(crate) fn message(id: MessageId, from: &str, body: &str, at_ms: u64) -> Message {
        Message {
            id,
            sender: name(from),
            body: MessageBody::parse(body).unwrap(),
            timestamp_ms: at_ms,
        }
    }

    /// Types `text` into whatever has the focus.
    pub(crate) fn type_text(app: &mut App, text: &str) -> Vec<Request> {
        text.chars()
            .filter_map(|c| app.on_key(key(KeyCode::Char(c)), 0))
            .collect()
    }

    /// An app logged in as `user`, on the chat screen.
    pub(crate) fn logged_in(user: &str) -> App {
        let mut app = App::new(endpoint());
        app.on_update(Update::Link(Link::Connected));
        app.on_update(Update::Entered {
            user: name(user),
            created: false,
            again: false,
        });
        app
    }

    #[test]
    fn the_login_screen_logs_in_or_creates() {
        let mut app = App::new(endpoint());
        assert!(type_text(&mut app, "alice").is_empty());
        assert_eq!(app.on_key(key(KeyCode::Tab), 0), None);
        type_text(&mut app, "password1");
        // Tab to "Log in", then to "Create account", then Enter.
        app.on_key(key(KeyCode::Tab), 0);
        app.on_key(key(KeyCode::Tab), 0);
        let request = app.on_key(key(KeyCode::Enter), 0);
        assert_eq!(
            request,
            Some(Request::Create {
                name: "alice".into(),
                password: "password1".into()
            })
        );
        let Screen::Login(form) = &app.screen else {
            panic!("still on the login screen until the answer");
        };
        assert!(form.password.is_empty(), "the form forgets the password");
        assert_eq!(form.waiting, Some(Action::Create));
        assert_eq!(
            app.on_key(key(KeyCode::Enter), 0),
            None,
            "no second request while one is under way"
        );

        // Refused: the error shows, with its code, and the password is
        // typed again; Enter in the password field logs in.
        app.on_update(Update::Failed {
            action: Action::Create,
            refusal: Refusal {
                code: "username_taken".into(),
                text: "username alice is taken".into(),
            },
        });
        let Screen::Login(form) = &app.screen else {
            panic!()
        };
        assert_eq!(
            form.error.as_deref(),
            Some("error username_taken username alice is taken")
        );
        assert_eq!(form.focus, LoginField::Password);
        type_text(&mut app, "password1");
        assert_eq!(
            app.on_key(key(KeyCode::Enter), 0),
            Some(Request::Login {
                name: "alice".into(),
                password: "password1".into()
            })
        );
        app.on_update(Update::Entered {
            user: name("alice"),
            created: false,
            again: false,
        });
        assert!(matches!(app.screen, Screen::Chat));
        assert_eq!(app.user, Some(name("alice")));
    }

    #[test]
    fn the_login_screen_checks_before_asking_the_server() {
        let mut app = App::new(endpoint());
        type_text(&mut app, "alice");
        app.on_key(key(KeyCode::Enter), 0);
        type_text(&mut app, "short");
        assert_eq!(app.on_key(key(KeyCode::Enter), 0), None);
        let Screen::Login(form) = &app.screen else {
            panic!()
        };
        assert!(
            form.error
                .as_deref()
                .is_some_and(|e| e.starts_with("error invalid_password ")),
            "{:?}",
            form.error
        );
        // Back to the name field, which cannot hold whitespace inside.
        app.on_key(key(KeyCode::BackTab), 0);
        type_text(&mut app, " smith");
        app.on_key(key(KeyCode::Tab), 0);
        type_text(&mut app, "long enough");
        assert_eq!(app.on_key(key(KeyCode::Enter), 0), None);
        let Screen::Login(form) = &app.screen else {
            panic!()
        };
        assert!(
            form.error
                .as_deref()
                .is_some_and(|e| e.starts_with("error invalid_username ")),
            "{:?}",
            form.error
        );
        assert_eq!(form.focus, LoginField::Name);
    }

    #[test]
    fn finding_an_account_opens_a_conversation_and_sends() {
        let mut app = logged_in("alice");
        assert_eq!(app.focus, Focus::List, "nothing to write to yet");
        assert_eq!(app.on_key(ctrl('n'), 0), None);
        type_text(&mut app, "^b");
        assert_eq!(
            app.on_key(key(KeyCode::Enter), 0),
            Some(Request::Search {
                pattern: "^b".into()
            })
        );
        app.on_update(Update::Found {
            pattern: "^b".into(),
            names: vec![name("bob"), name("bobby")],
        });
        app.on_key(key(KeyCode::Down), 0);
        assert_eq!(app.on_key(key(KeyCode::Enter), 0), None);
        assert!(app.overlay.is_none());
        assert_eq!(app.selected, Some(name("bobby")));
        assert_eq!(app.focus, Focus::Input);

        assert!(type_text(&mut app, "hi there  ").is_empty());
        let sent = app.on_key(key(KeyCode::Enter), 1_000);
        assert_eq!(
            sent,
            Some(Request::Send {
                local: 1,
                to: "bobby".into(),
                body: "hi there".into()
            })
        );
        assert!(app.input.is_empty());
        let entry = &app.current().unwrap().entries[0];
        assert_eq!(entry.delivery, Delivery::Sending);
        assert_eq!(entry.at_ms, 1_000);

        app.on_update(Update::Sent {
            local: 1,
            receipt: SendReceipt {
                id: 7,
                timestamp_ms: 2_000,
            },
        });
        let entry = &app.current().unwrap().entries[0];
        assert_eq!(entry.delivery, Delivery::Stored);
        assert_eq!(entry.at_ms, 2_000, "the server's time once stored");

        // Up brings the line back from the history.
        app.on_key(key(KeyCode::Up), 0);
        assert_eq!(app.input.text(), "hi there");
    }

    #[test]
    fn a_search_with_a_changed_pattern_searches_again() {
        let mut app = logged_in("alice");
        app.on_key(ctrl('n'), 0);
        type_text(&mut app, "b");
        app.on_key(key(KeyCode::Enter), 0);
        app.on_update(Update::Found {
            pattern: "b".into(),
            names: vec![name("bob")],
        });
        type_text(&mut app, "x");
        assert_eq!(
            app.on_key(key(KeyCode::Enter), 0),
            Some(Request::Search {
                pattern: "bx".into()
            })
        );
        app.on_update(Update::Failed {
            action: Action::Search,
            refusal: Refusal {
                code: "invalid_pattern".into(),
                text: "bad".into(),
            },
        });
        let Some(Overlay::Find(find)) = &app.overlay else {
            panic!()
        };
        assert_eq!(find.error.as_deref(), Some("error invalid_pattern bad"));
        assert!(!find.waiting);
        app.on_key(key(KeyCode::Esc), 0);
        assert!(app.overlay.is_none());
    }

    #[test]
    fn refused_sends_show_their_code_and_long_lines_stay_to_be_fixed() {
        let mut app = logged_in("alice");
        app.on_key(ctrl('n'), 0);
        app.on_key(key(KeyCode::Enter), 0);
        app.on_update(Update::Found {
            pattern: String::new(),
            names: vec![name("bob")],
        });
        app.on_key(key(KeyCode::Enter), 0);
        let long = "y".repeat(281);
        type_text(&mut app, &long);
        assert_eq!(app.on_key(key(KeyCode::Enter), 0), None);
        assert_eq!(app.input.text(), long, "kept, to be shortened");
        assert!(
            app.notice
                .as_ref()
                .is_some_and(|n| n.error && n.text.starts_with("error message_too_long ")),
            "{:?}",
            app.notice
        );
        app.on_key(ctrl('u'), 0);
        type_text(&mut app, "hello");
        let Some(Request::Send { local, .. }) = app.on_key(key(KeyCode::Enter), 0) else {
            panic!("a send")
        };
        app.on_update(Update::NotSent {
            local,
            refusal: Refusal {
                code: "no_such_user".into(),
                text: "no such user: bob".into(),
            },
        });
        let entry = &app.current().unwrap().entries[0];
        assert!(matches!(&entry.delivery, Delivery::Failed(r) if r.code == "no_such_user"));
        assert_eq!(
            app.notice.as_ref().map(|n| n.text.as_str()),
            Some("not sent to bob: error no_such_user no such user: bob")
        );
    }

    #[test]
    fn messages_are_shown_once_and_acknowledged_after() {
        let mut app = logged_in("alice");
        app.on_update(Update::Received(message(1, "bob", "one", 10)));
        assert_eq!(app.selected, Some(name("bob")), "the first one is shown");
        app.on_update(Update::Received(message(2, "carol", "two", 20)));
        assert_eq!(app.take_ack(), Some(2));
        assert_eq!(app.take_ack(), None);
        // Replayed after a reconnect: acknowledged again, shown once.
        app.on_update(Update::Received(message(1, "bob", "one", 10)));
        app.on_update(Update::Fetched {
            messages: vec![
                message(2, "carol", "two", 20),
                message(3, "bob", "three", 30),
            ],
            asked: false,
        });
        assert_eq!(app.take_ack(), Some(3));
        let bob = app.conversations.iter().find(|c| c.peer == name("bob"));
        let texts: Vec<_> = bob.unwrap().entries.iter().map(|e| &e.text).collect();
        assert_eq!(texts, ["one", "three"]);
        let carol = app.conversations.iter().find(|c| c.peer == name("carol"));
        assert_eq!(carol.unwrap().unread, 1, "not shown: unread");
        assert_eq!(carol.unwrap().entries.len(), 1);
        assert_eq!(app.conversations[0].peer, name("bob"), "newest first");

        // Switching shows carol and clears her count.
        app.on_key(key(KeyCode::Esc), 0);
        app.on_key(key(KeyCode::Down), 0);
        assert_eq!(app.selected, Some(name("carol")));
        assert_eq!(app.current().unwrap().unread, 0);
    }

    /// What happened on gRPC: the acknowledgement of a fetched message
    /// went out (or was held back) while the login's replay of an earlier,
    /// never acknowledged one was still on its way; the replay is a repeat
    /// all the same, and takes its place by time.
    #[test]
    fn a_replay_arriving_after_newer_messages_is_still_a_repeat() {
        let mut app = logged_in("alice");
        app.on_update(Update::Received(message(1, "bob", "before", 10)));
        assert_eq!(app.take_ack(), Some(1));
        app.on_update(Update::Entered {
            user: name("alice"),
            created: false,
            again: true,
        });
        app.on_update(Update::Fetched {
            messages: vec![message(2, "bob", "meanwhile", 20)],
            asked: false,
        });
        assert_eq!(app.take_ack(), Some(2));
        app.on_update(Update::Received(message(1, "bob", "before", 10)));
        assert_eq!(app.take_ack(), Some(1), "acknowledged again");
        let texts: Vec<_> = app
            .current()
            .unwrap()
            .entries
            .iter()
            .map(|e| &e.text)
            .collect();
        assert_eq!(texts, ["before", "meanwhile"]);

        // Never shown before, a replay older than what is on screen goes
        // before it.
        app.on_update(Update::Received(message(3, "carol", "later", 30)));
        app.on_update(Update::Received(message(0, "carol", "earlier", 5)));
        let carol = app.conversations.iter().find(|c| c.peer == name("carol"));
        let texts: Vec<_> = carol.unwrap().entries.iter().map(|e| &e.text).collect();
        assert_eq!(texts, ["earlier", "later"]);
    }

    #[test]
    fn a_live_message_marks_its_sender_active_for_a_while() {
        let mut app = logged_in("alice");
        app.on_update(Update::Fetched {
            messages: vec![message(1, "carol", "queued", 1_000)],
            asked: true,
        });
        app.on_update(Update::Received(message(2, "bob", "live", 1_000)));
        let find = |app: &App, peer: &str| {
            app.conversations
                .iter()
                .find(|c| c.peer == name(peer))
                .unwrap()
                .active(1_000 + ACTIVE_MS - 1)
        };
        assert!(find(&app, "bob"));
        assert!(!find(&app, "carol"), "a fetched message says nothing");
        assert!(!app.conversations[0].active(1_000 + ACTIVE_MS));
    }

    #[test]
    fn list_keys_log_out_delete_and_change_the_password() {
        let mut app = logged_in("alice");
        app.on_key(key(KeyCode::Esc), 0);
        assert_eq!(
            app.on_key(key(KeyCode::Char('o')), 0),
            Some(Request::Logout)
        );
        app.on_update(Update::LoggedOut(Ended::Requested));
        let Screen::Login(form) = &app.screen else {
            panic!()
        };
        assert_eq!(form.name.text(), "alice", "the name stays for next time");
        assert_eq!(form.focus, LoginField::Password);

        let mut app = logged_in("alice");
        app.on_key(key(KeyCode::Char('p')), 0);
        type_text(&mut app, "password1");
        app.on_key(key(KeyCode::Enter), 0);
        type_text(&mut app, "password2");
        app.on_key(key(KeyCode::Enter), 0);
        type_text(&mut app, "password3");
        assert_eq!(app.on_key(key(KeyCode::Enter), 0), None, "they differ");
        let Some(Overlay::Password(form)) = &app.overlay else {
            panic!()
        };
        assert!(form.error.as_deref().unwrap().contains("differ"));
        assert_eq!(form.focus, 1);
        type_text(&mut app, "password2");
        app.on_key(key(KeyCode::Tab), 0);
        type_text(&mut app, "password2");
        assert_eq!(
            app.on_key(key(KeyCode::Enter), 0),
            Some(Request::ChangePassword {
                old: "password1".into(),
                new: "password2".into()
            })
        );
        app.on_update(Update::PasswordChanged);
        assert!(app.overlay.is_none());

        app.on_key(key(KeyCode::Char('D')), 0);
        assert_eq!(app.on_key(key(KeyCode::Enter), 0), None, "no password");
        type_text(&mut app, "password2");
        assert_eq!(
            app.on_key(key(KeyCode::Enter), 0),
            Some(Request::Delete {
                password: "password2".into()
            })
        );
        app.on_update(Update::Failed {
            action: Action::Delete,
            refusal: Refusal {
                code: "wrong_password".into(),
                text: "wrong password".into(),
            },
        });
        let Some(Overlay::Delete(delete)) = &app.overlay else {
            panic!("the box stays open with the refusal")
        };
        assert_eq!(
            delete.error.as_deref(),
            Some("error wrong_password wrong password")
        );
        app.on_update(Update::LoggedOut(Ended::Deleted));
        let Screen::Login(form) = &app.screen else {
            panic!()
        };
        assert!(form.name.is_empty());
        assert_eq!(form.info.as_deref(), Some("account alice deleted"));
        assert!(app.conversations.is_empty());
    }

    #[test]
    fn ctrl_c_quits_from_anywhere_and_help_opens_and_closes() {
        let mut app = logged_in("alice");
        app.on_key(key(KeyCode::Char('?')), 0);
        assert!(matches!(app.overlay, Some(Overlay::Help)));
        app.on_key(key(KeyCode::Char('?')), 0);
        assert!(app.overlay.is_none());
        app.on_key(key(KeyCode::F(1)), 0);
        assert!(matches!(app.overlay, Some(Overlay::Help)));
        app.on_key(ctrl('c'), 0);
        assert!(app.quitting());

        let mut app = App::new(endpoint());
        type_text(&mut app, "?al");
        let Screen::Login(form) = &app.screen else {
            panic!()
        };
        assert_eq!(form.name.text(), "?al", "? is text in a field");
        app.on_key(ctrl('c'), 0);
        assert!(app.quitting());
    }

    #[test]
    fn a_reconnect_keeps_the_conversations_and_another_user_starts_afresh() {
        let mut app = logged_in("alice");
        app.on_update(Update::Received(message(1, "bob", "one", 10)));
        app.on_update(Update::Link(Link::Waiting {
            retry_at: std::time::Instant::now(),
            why: "refused".into(),
            again: true,
        }));
        app.on_update(Update::Entered {
            user: name("alice"),
            created: false,
            again: true,
        });
        assert!(matches!(app.screen, Screen::Chat));
        assert_eq!(app.conversations.len(), 1);
        assert!(app.notice.as_ref().unwrap().text.starts_with("reconnected"));

        app.on_update(Update::LoggedOut(Ended::Refused(Refusal {
            code: "wrong_password".into(),
            text: "wrong password".into(),
        })));
        let Screen::Login(form) = &app.screen else {
            panic!()
        };
        assert!(form.error.as_deref().unwrap().contains("wrong_password"));
        app.on_update(Update::Entered {
            user: name("bob"),
            created: false,
            again: false,
        });
        assert!(app.conversations.is_empty(), "alice's are not bob's");
    }

    #[test]
    fn pushes_while_logged_out_are_not_shown_or_acknowledged() {
        let mut app = App::new(endpoint());
        app.on_update(Update::Received(message(1, "bob", "late", 10)));
        assert!(app.conversations.is_empty());
        assert_eq!(app.take_ack(), None);
    }
}
