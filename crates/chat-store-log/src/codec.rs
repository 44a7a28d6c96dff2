//! The on-disk format: files of checksummed records, each one
//! [`Change`].
//!
//! ```text
//! file    = magic (8 bytes: "CHATLOG" or "CHATSNP", then format version 1)
//!           record*
//! record  = length (u32 LE, of payload) · crc32 (u32 LE, of payload) · payload
//! payload = tag (u8) · fields
//! ```
//!
//! Fields are unsigned LEB128 varints (ids, timestamps, lengths), texts as
//! a varint length then UTF-8, a send id as 16 bytes big-endian, a
//! fingerprint as u32 LE, a flag as one byte (0 or 1), an optional value as
//! a flag then the value. Tags and fields per change:
//!
//! | tag | change | fields |
//! |---|---|---|
//! | 1 | `Create` | name, optional password hash |
//! | 2 | `Password` | name, password hash |
//! | 3 | `Delete` | name |
//! | 4 | `Append` | recipient, id, sender, body, timestamp, delivered, optional send id |
//! | 5 | `Take` | name, through |
//! | 6 | `Ack` | name, through |
//! | 7 | `Floor` | id |
//! | 8 | `LastId` | name, last id |
//! | 9 | `SendId` | sender, send id, id, timestamp, recipient, fingerprint |
//!
//! A reader stops at the first record that is cut short or fails its
//! checksum: in the newest log that is a write the crash interrupted,
//! never acknowledged.

use chat_core::{Change, Message, MessageBody, Username};

/// The first bytes of a log file.
pub const LOG_MAGIC: &[u8; 8] = b"CHATLOG\x01";
/// The first bytes of a snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"CHATSNP\x01";

/// Bytes before a record's payload.
const FRAME: usize = 8;

/// Largest payload a reader accepts: far above any real record (a 280-char
/// message is at most ~1.3 KiB), so a damaged length is caught as damage.
const MAX_PAYLOAD: usize = 1 << 20;

/// Appends `change` to `out` as one record.
pub fn encode(change: &Change, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME]);
    match change {
        Change::Create {
            name,
            password_hash,
        } => {
            out.push(1);
            text(out, name.as_str());
            match password_hash {
                Some(hash) => {
                    out.push(1);
                    text(out, hash);
                }
                None => out.push(0),
            }
        }
        Change::Password {
            name,
            password_hash,
        } => {
            out.push(2);
            text(out, name.as_str());
            text(out, password_hash);
        }
        Change::Delete { name } => {
            out.push(3);
            text(out, name.as_str());
        }
        Change::Append {
            recipient,
            message,
            delivered,
            send_id,
        } => {
            out.push(4);
            text(out, recipient.as_str());
            varint(out, message.id);
            text(out, message.sender.as_str());
            text(out, message.body.as_str());
            varint(out, message.timestamp_ms);
            out.push(u8::from(*delivered));
            match send_id {
                Some(id) => {
                    out.push(1);
                    out.extend_from_slice(&id.to_be_bytes());
                }
                None => out.push(0),
            }
        }
        Change::Take { name, through } => {
            out.push(5);
            text(out, name.as_str());
            varint(out, *through);
        }
        Change::Ack { name, through } => {
            out.push(6);
            text(out, name.as_str());
            varint(out, *through);
        }
        Change::Floor { id } => {
            out.push(7);
            varint(out, *id);
        }
        Change::LastId { name, last_id } => {
            out.push(8);
            text(out, name.as_str());
            varint(out, *last_id);
        }
        Change::SendId {
            sender,
            send_id,
            id,
            timestamp_ms,
            recipient,
            fingerprint,
        } => {
            out.push(9);
            text(out, sender.as_str());
            out.extend_from_slice(&send_id.to_be_bytes());
            varint(out, *id);
            varint(out, *timestamp_ms);
            text(out, recipient.as_str());
            out.extend_from_slice(&fingerprint.to_le_bytes());
        }
    }
    let payload = &out[start + FRAME..];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + FRAME].copy_from_slice(&crc.to_le_bytes());
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// What [`decode`] read from a file's records.
#[derive(Debug)]
pub struct Decoded {
    /// The changes of every whole, intact record, in order.
    pub changes: Vec<Change>,
    /// Bytes those records take (from the start of the records).
    pub valid: usize,
    /// Why reading stopped before the end, if it did.
    pub stopped: Option<String>,
    /// Reading stopped at a record whose checksum holds but whose contents
    /// this version cannot read: damage or another version's file, never a
    /// torn write.
    pub unreadable: bool,
}

/// Reads the records in `bytes` (a file's contents after its magic).
pub fn decode(bytes: &[u8]) -> Decoded {
    let mut changes = Vec::new();
    let mut at = 0;
    let mut unreadable = false;
    let stopped = loop {
        let rest = &bytes[at..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < FRAME {
            break Some(format!("a record header cut short at byte {at}"));
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_PAYLOAD {
            break Some(format!("an impossible record length {len} at byte {at}"));
        }
        let Some(payload) = rest.get(FRAME..FRAME + len) else {
            break Some(format!("a record cut short at byte {at}"));
        };
        if crc32fast::hash(payload) != crc {
            break Some(format!("a record failing its checksum at byte {at}"));
        }
        match Reader(payload).change() {
            Ok(change) => changes.push(change),
            Err(why) => {
                unreadable = true;
                break Some(format!("an unreadable record at byte {at}: {why}"));
            }
        }
        at += FRAME + len;
    };
    Decoded {
        changes,
        valid: at,
        stopped,
        unreadable,
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn change(&mut self) -> Result<Change, String> {
        let change = match self.byte()? {
            1 => Change::Create {
                name: self.name()?,
                password_hash: if self.flag()? {
                    Some(self.text()?.to_owned())
                } else {
                    None
                },
            },
            2 => Change::Password {
                name: self.name()?,
                password_hash: self.text()?.to_owned(),
            },
            3 => Change::Delete { name: self.name()? },
            4 => {
                let recipient = self.name()?;
                let id = self.varint()?;
                let sender = self.name()?;
                let body = MessageBody::parse(self.text()?).map_err(|e| e.to_string())?;
                let timestamp_ms = self.varint()?;
                let delivered = self.flag()?;
                let send_id = if self.flag()? {
                    Some(self.send_id()?)
                } else {
                    None
                };
                Change::Append {
                    recipient,
                    message: Message {
                        id,
                        sender,
                        body,
                        timestamp_ms,
                    },
                    delivered,
                    send_id,
                }
            }
            5 => Change::Take {
                name: self.name()?,
                through: self.varint()?,
            },
            6 => Change::Ack {
                name: self.name()?,
                through: self.varint()?,
            },
            7 => Change::Floor { id: self.varint()? },
            8 => Change::LastId {
                name: self.name()?,
                last_id: self.varint()?,
            },
            9 => Change::SendId {
                sender: self.name()?,
                send_id: self.send_id()?,
                id: self.varint()?,
                timestamp_ms: self.varint()?,
                recipient: self.name()?,
                fingerprint: u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "short")?),
            },
            tag => return Err(format!("unknown change tag {tag}")),
        };
        if !self.0.is_empty() {
            return Err(format!("{} bytes after the change", self.0.len()));
        }
        Ok(change)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err("a field cut short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self) -> Result<bool, String> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("a flag of {other}")),
        }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("a varint longer than 64 bits".into())
    }

    fn text(&mut self) -> Result<&str, String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "a huge length")?;
        std::str::from_utf8(self.take(len)?).map_err(|_| "a text that is not UTF-8".into())
    }

    fn name(&mut self) -> Result<Username, String> {
        Username::parse(self.text()?).map_err(|e| e.to_string())
    }

    fn send_id(&mut self) -> Result<u128, String> {
        let bytes: [u8; 16] = self.take(16)?.try_into().map_err(|_| "short")?;
        Ok(u128::from_be_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn name() -> impl Strategy<Value = Username> {
        "[a-z][a-z0-9_]{0,20}".prop_map(|n| Username::parse(&n).expect("valid name"))
    }

    fn body() -> impl Strategy<Value = MessageBody> {
        "[ -~é😀]{1,280}".prop_filter_map("valid body", |b| MessageBody::parse(&b).ok())
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (name(), proptest::option::of("[ -~]{0,100}")).prop_map(|(name, password_hash)| {
                Change::Create {
                    name,
                    password_hash,
                }
            }),
            (name(), "[ -~]{0,100}").prop_map(|(name, password_hash)| Change::Password {
                name,
                password_hash
            }),
            name().prop_map(|name| Change::Delete { name }),
            (
                name(),
                any::<u64>(),
                name(),
                body(),
                any::<u64>(),
                any::<bool>(),
                proptest::option::of(any::<u128>())
            )
                .prop_map(
                    |(recipient, id, sender, body, timestamp_ms, delivered, send_id)| {
                        Change::Append {
                            recipient,
                            message: Message {
                                id,
                                sender,
                                body,
                                timestamp_ms,
                            },
                            delivered,
                            send_id,
                        }
                    }
                ),
            (name(), any::<u64>()).prop_map(|(name, through)| Change::Take { name, through }),
            (name(), any::<u64>()).prop_map(|(name, through)| Change::Ack { name, through }),
            any::<u64>().prop_map(|id| Change::Floor { id }),
            (name(), any::<u64>()).prop_map(|(name, last_id)| Change::LastId { name, last_id }),
            (
                name(),
                any::<u128>(),
                any::<u64>(),
                any::<u64>(),
                name(),
                any::<u32>()
            )
                .prop_map(
                    |(sender, send_id, id, timestamp_ms, recipient, fingerprint)| {
                        Change::SendId {
                            sender,
                            send_id,
                            id,
                            timestamp_ms,
                            recipient,
                            fingerprint,
                        }
                    }
                ),
        ]
    }

    proptest! {
        #[test]
        fn every_change_reads_back_as_written(changes in proptest::collection::vec(change(), 0..20)) {
            let mut bytes = Vec::new();
            for change in &changes {
                encode(change, &mut bytes);
            }
            let decoded = decode(&bytes);
            prop_assert_eq!(decoded.stopped, None);
            prop_assert_eq!(decoded.valid, bytes.len());
            prop_assert_eq!(decoded.changes, changes);
        }

        /// A file cut anywhere reads back as the whole records before the
        /// cut, and says where it stopped.
        #[test]
        fn a_cut_file_keeps_its_whole_records(changes in proptest::collection::vec(change(), 1..10), cut in any::<prop::sample::Index>()) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for change in &changes {
                encode(change, &mut bytes);
                ends.push(bytes.len());
            }
            let cut = cut.index(bytes.len());
            let whole = ends.iter().filter(|&&end| end <= cut).count();
            let decoded = decode(&bytes[..cut]);
            prop_assert_eq!(&decoded.changes[..], &changes[..whole]);
            prop_assert_eq!(decoded.valid, if whole == 0 { 0 } else { ends[whole - 1] });
            prop_assert_eq!(decoded.stopped.is_some(), cut != decoded.valid);
        }

        /// A flipped bit is caught by the checksum: the damaged record and
        /// everything after it are not read.
        #[test]
        fn a_damaged_record_stops_the_reading(changes in proptest::collection::vec(change(), 1..10), at in any::<prop::sample::Index>(), bit in 0..8u8) {
            let mut bytes = Vec::new();
            let mut ends = vec![0];
            for change in &changes {
                encode(change, &mut bytes);
                ends.push(bytes.len());
            }
            let at = at.index(bytes.len());
            bytes[at] ^= 1 << bit;
            let damaged = ends.iter().filter(|&&end| end <= at).count() - 1;
            let decoded = decode(&bytes);
            prop_assert!(decoded.stopped.is_some());
            prop_assert_eq!(&decoded.changes[..], &changes[..damaged]);
        }
    }
}
