//! One editable line of text (the message line, the login fields, the
//! search box) and the history of sent lines.
//!
//! The cursor moves by grapheme cluster, so an accented letter written as
//! two code points or an emoji with a modifier is one step, and columns are
//! counted by display width, so a wide (CJK) character takes two. Text is
//! kept as typed; a masked field only *shows* one `•` per grapheme.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

/// Most characters one field holds: far above any message (280) or
/// password (256), and a bound on what a runaway paste can cost.
pub const MAX_INPUT_CHARS: usize = 4096;

/// What a field shows for a grapheme: itself, or a dot if masked.
fn shown(masked: bool, grapheme: &str) -> &str {
    if masked { "•" } else { grapheme }
}

/// Lines the history keeps.
const HISTORY_LINES: usize = 500;

/// An editable line with a cursor.
#[derive(Debug, Clone, Default)]
pub struct LineInput {
    text: String,
    /// Byte offset of the cursor, always on a grapheme boundary.
    cursor: usize,
    masked: bool,
}

/// What a field shows in a given width: the visible slice of its text
/// (masked if it is a password) and the cursor's column within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The text to draw.
    pub text: String,
    /// The cursor's column, from the field's left edge.
    pub cursor: u16,
}

impl LineInput {
    /// An empty field that shows what is typed.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty field that shows `•` for each character typed.
    pub fn masked() -> Self {
        Self {
            masked: true,
            ..Self::default()
        }
    }

    /// The text as typed.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether nothing is typed.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// How many characters (Unicode scalar values, as the server counts a
    /// message's length) are typed.
    pub fn chars(&self) -> usize {
        self.text.chars().count()
    }

    /// Replaces the text, with the cursor at its end.
    pub fn set(&mut self, text: &str) {
        self.text.clear();
        self.cursor = 0;
        self.insert(text);
    }

    /// Empties the field.
    pub fn clear(&mut self) {
        self.text.clear();
        self.cursor = 0;
    }

    /// Empties the field and returns what it held.
    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }

    /// Inserts `text` at the cursor. Control characters (a pasted newline
    /// or tab) become spaces: a field is one line. Whatever would pass
    /// [`MAX_INPUT_CHARS`] is dropped.
    pub fn insert(&mut self, text: &str) {
        let room = MAX_INPUT_CHARS.saturating_sub(self.chars());
        let clean: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(room)
            .collect();
        self.text.insert_str(self.cursor, &clean);
        self.cursor += clean.len();
        // A combining mark typed after a letter joins its grapheme: keep
        // the cursor on a boundary.
        self.cursor = self.boundary_at_or_after(self.cursor);
    }

    /// Applies an editing key; `false` if the key is not one (the caller
    /// gives it another meaning).
    ///
    /// Left/Right, Home/End (also Ctrl-A/Ctrl-E), Backspace/Delete,
    /// Ctrl-Left/Ctrl-Right (also Alt-B/Alt-F) by word, Ctrl-U (to the
    /// start), Ctrl-K (to the end), Ctrl-W (the word before the cursor),
    /// and printable characters.
    pub fn edit(&mut self, key: &KeyEvent) -> bool {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        match key.code {
            KeyCode::Left if ctrl || alt => self.cursor = self.word_start_before(self.cursor),
            KeyCode::Right if ctrl || alt => self.cursor = self.word_end_after(self.cursor),
            KeyCode::Left => self.cursor = self.prev_boundary(self.cursor),
            KeyCode::Right => self.cursor = self.next_boundary(self.cursor),
            KeyCode::Home => self.cursor = 0,
            KeyCode::End => self.cursor = self.text.len(),
            KeyCode::Backspace if ctrl || alt => self.delete_word_before(),
            KeyCode::Backspace => {
                let from = self.prev_boundary(self.cursor);
                self.text.replace_range(from..self.cursor, "");
                self.cursor = from;
            }
            KeyCode::Delete => {
                let to = self.next_boundary(self.cursor);
                self.text.replace_range(self.cursor..to, "");
            }
            // AltGr arrives as Ctrl+Alt on some systems: it types.
            KeyCode::Char(c) if ctrl && alt => {
                let mut buf = [0; 4];
                self.insert(c.encode_utf8(&mut buf));
            }
            KeyCode::Char(c) if ctrl => match c {
                'a' => self.cursor = 0,
                'e' => self.cursor = self.text.len(),
                'u' => {
                    self.text.replace_range(..self.cursor, "");
                    self.cursor = 0;
                }
                'k' => self.text.truncate(self.cursor),
                'w' | 'h' => {
                    if c == 'w' {
                        self.delete_word_before();
                    } else {
                        // Ctrl-H is Backspace on some terminals.
                        let from = self.prev_boundary(self.cursor);
                        self.text.replace_range(from..self.cursor, "");
                        self.cursor = from;
                    }
                }
                _ => return false,
            },
            KeyCode::Char(c) if alt => match c {
                'b' => self.cursor = self.word_start_before(self.cursor),
                'f' => self.cursor = self.word_end_after(self.cursor),
                _ => return false,
            },
            KeyCode::Char(c) => {
                let mut buf = [0; 4];
                self.insert(c.encode_utf8(&mut buf));
            }
            _ => return false,
        }
        true
    }

    /// What fits in `width` columns: the text from the start if the cursor
    /// fits, else scrolled so that the cursor is at the right edge. Never
    /// splits a wide character.
    pub fn view(&self, width: u16) -> View {
        let width = usize::from(width.max(1));
        let masked = self.masked;
        let shown = |g| shown(masked, g);
        let graphemes: Vec<(usize, &str)> = self.text.grapheme_indices(true).collect();
        let before: usize = graphemes
            .iter()
            .take_while(|(at, _)| *at < self.cursor)
            .map(|(_, g)| shown(g).width())
            .sum();
        // The first grapheme shown: enough are skipped that the cursor's
        // column (and the cell it sits on) fits.
        let mut skip_cols = before.saturating_sub(width - 1);
        let mut first = 0;
        while skip_cols > 0 && first < graphemes.len() {
            skip_cols = skip_cols.saturating_sub(shown(graphemes[first].1).width());
            first += 1;
        }
        let skipped: usize = graphemes[..first]
            .iter()
            .map(|(_, g)| shown(g).width())
            .sum();
        let mut text = String::new();
        let mut used = 0;
        for (_, g) in &graphemes[first..] {
            let w = shown(g).width();
            if used + w > width {
                break;
            }
            text.push_str(shown(g));
            used += w;
        }
        let cursor = (before - skipped).min(width - 1);
        View {
            text,
            cursor: u16::try_from(cursor).unwrap_or(u16::MAX),
        }
    }

    fn delete_word_before(&mut self) {
        let from = self.word_start_before(self.cursor);
        self.text.replace_range(from..self.cursor, "");
        self.cursor = from;
    }

    fn prev_boundary(&self, at: usize) -> usize {
        self.text[..at]
            .grapheme_indices(true)
            .next_back()
            .map_or(0, |(i, _)| i)
    }

    fn next_boundary(&self, at: usize) -> usize {
        self.text[at..]
            .graphemes(true)
            .next()
            .map_or(at, |g| at + g.len())
    }

    fn boundary_at_or_after(&self, at: usize) -> usize {
        self.text
            .grapheme_indices(true)
            .map(|(i, _)| i)
            .find(|&i| i >= at)
            .unwrap_or(self.text.len())
    }

    /// The start of the word before `at` (skipping spaces first).
    fn word_start_before(&self, at: usize) -> usize {
        let head = &self.text[..at];
        let trimmed = head.trim_end_matches(char::is_whitespace);
        trimmed
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map_or(0, |(i, c)| i + c.len_utf8())
    }

    /// The end of the word after `at` (skipping spaces first).
    fn word_end_after(&self, at: usize) -> usize {
        let tail = &self.text[at..];
        let start = tail.len() - tail.trim_start_matches(char::is_whitespace).len();
        tail[start..]
            .char_indices()
            .find(|(_, c)| c.is_whitespace())
            .map_or(self.text.len(), |(i, _)| at + start + i)
    }
}

/// Lines sent before, for Up and Down in the message line. Browsing keeps
/// the line being typed, and Down past the newest entry brings it back.
#[derive(Debug, Clone, Default)]
pub struct History {
    lines: Vec<String>,
    /// The entry shown while browsing (an index into `lines`).
    at: Option<usize>,
    /// What was typed before browsing began.
    draft: String,
}

impl History {
    /// Remembers a sent line (not twice in a row), and stops browsing.
    pub fn push(&mut self, line: &str) {
        self.at = None;
        if self.lines.last().is_some_and(|last| last == line) {
            return;
        }
        if self.lines.len() == HISTORY_LINES {
            self.lines.remove(0);
        }
        self.lines.push(line.to_owned());
    }

    /// The entry before the one shown (the newest when not browsing);
    /// `current` is kept to come back to. `None` at the oldest.
    pub fn older(&mut self, current: &str) -> Option<&str> {
        let at = match self.at {
            None if self.lines.is_empty() => return None,
            None => {
                self.draft = current.to_owned();
                self.lines.len() - 1
            }
            Some(0) => return None,
            Some(at) => at - 1,
        };
        self.at = Some(at);
        Some(&self.lines[at])
    }

    /// The entry after the one shown, or the line being typed before
    /// browsing began; `None` when not browsing.
    pub fn newer(&mut self) -> Option<&str> {
        let at = self.at?;
        if at + 1 < self.lines.len() {
            self.at = Some(at + 1);
            Some(&self.lines[at + 1])
        } else {
            self.at = None;
            Some(&self.draft)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ctrl(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
    }

    fn typed(text: &str) -> LineInput {
        let mut input = LineInput::new();
        for c in text.chars() {
            assert!(input.edit(&key(KeyCode::Char(c))));
        }
        input
    }

    #[test]
    fn edits_at_the_cursor() {
        let mut input = typed("helo world");
        for _ in 0..7 {
            input.edit(&key(KeyCode::Left));
        }
        input.edit(&key(KeyCode::Char('l')));
        assert_eq!(input.text(), "hello world");
        input.edit(&key(KeyCode::Home));
        input.edit(&key(KeyCode::Delete));
        input.edit(&key(KeyCode::Char('H')));
        assert_eq!(input.text(), "Hello world");
        input.edit(&key(KeyCode::End));
        input.edit(&key(KeyCode::Backspace));
        assert_eq!(input.text(), "Hello worl");
        input.edit(&ctrl('w'));
        assert_eq!(input.text(), "Hello ");
        input.edit(&key(KeyCode::Char('x')));
        input.edit(&ctrl('a'));
        input.edit(&key(KeyCode::Right));
        input.edit(&ctrl('k'));
        assert_eq!(input.text(), "H");
        input.set("one two three");
        input.edit(&KeyEvent::new(KeyCode::Left, KeyModifiers::CONTROL));
        input.edit(&ctrl('u'));
        assert_eq!(input.text(), "three");
        let alt_gr = KeyEvent::new(
            KeyCode::Char('@'),
            KeyModifiers::CONTROL | KeyModifiers::ALT,
        );
        assert!(input.edit(&alt_gr));
        assert_eq!(input.text(), "@three", "typed at the cursor");
        assert!(!input.edit(&key(KeyCode::Enter)), "not an editing key");
        assert!(!input.edit(&ctrl('n')), "not an editing key");
    }

    #[test]
    fn moves_by_grapheme_and_counts_display_columns() {
        // "e" + combining acute accent is one step; a CJK character is two
        // columns wide.
        let mut input = typed("ae\u{301}漢");
        assert_eq!(input.view(20).cursor, 4, "a(1) é(1) 漢(2)");
        input.edit(&key(KeyCode::Left));
        assert_eq!(input.view(20).cursor, 2);
        input.edit(&key(KeyCode::Left));
        input.edit(&key(KeyCode::Backspace));
        assert_eq!(input.text(), "e\u{301}漢", "the whole grapheme before");
        input.edit(&key(KeyCode::Delete));
        assert_eq!(input.text(), "漢");
        // Nothing left of the start, nothing right of the end.
        input.edit(&key(KeyCode::Home));
        input.edit(&key(KeyCode::Backspace));
        input.edit(&key(KeyCode::End));
        input.edit(&key(KeyCode::Delete));
        assert_eq!(input.text(), "漢");
    }

    #[test]
    fn a_long_line_scrolls_to_keep_the_cursor_in_view() {
        let mut input = typed(&"abcdefghij".repeat(5));
        let view = input.view(10);
        assert_eq!(view.cursor, 9);
        assert_eq!(view.text, "bcdefghij");
        input.edit(&key(KeyCode::Home));
        let view = input.view(10);
        assert_eq!((view.text.as_str(), view.cursor), ("abcdefghij", 0));
        // Wide characters are never cut in half at the edges.
        let wide = typed(&"漢".repeat(30));
        let view = wide.view(9);
        assert!(view.text.width() <= 9);
        assert_eq!(view.cursor, 8);
        assert!(wide.view(0).cursor == 0, "a zero width never panics");
    }

    #[test]
    fn a_masked_field_shows_dots_only() {
        let mut input = LineInput::masked();
        input.insert("s3cret pässword");
        let view = input.view(40);
        assert_eq!(view.text, "•".repeat(15));
        assert_eq!(view.cursor, 15);
        assert_eq!(input.text(), "s3cret pässword");
    }

    #[test]
    fn pastes_become_one_bounded_line() {
        let mut input = LineInput::new();
        input.insert("two\nlines\tand a tab");
        assert_eq!(input.text(), "two lines and a tab");
        input.insert(&"x".repeat(2 * MAX_INPUT_CHARS));
        assert_eq!(input.chars(), MAX_INPUT_CHARS);
        assert_eq!(input.take().len(), MAX_INPUT_CHARS);
        assert!(input.is_empty());
    }

    #[test]
    fn history_browses_and_keeps_the_draft() {
        let mut history = History::default();
        assert_eq!(history.older("draft"), None);
        history.push("first");
        history.push("second");
        history.push("second");
        assert_eq!(history.older("draft"), Some("second"));
        assert_eq!(history.older("ignored"), Some("first"));
        assert_eq!(history.older("ignored"), None, "at the oldest");
        assert_eq!(history.newer(), Some("second"));
        assert_eq!(history.newer(), Some("draft"));
        assert_eq!(history.newer(), None, "not browsing any more");
    }
}
