//! Decoding Segment-spec events (SPEC §1).
//!
//! [`decode`] turns one input line into an [`Event`] or a [`BadEvent`] that
//! names the reason; it never panics, whatever the bytes. Only the top-level
//! fields are type-checked; `properties`, `traits` and `context` are kept as
//! JSON objects and read by dotted path when a term asks for them.

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value as Json};
use std::fmt;

use crate::core::clock;
use crate::core::clock::MAX_TIME;
use crate::core::id::Id;
use crate::core::id::IdKind;
use crate::core::value::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    Track,
    Page,
    Screen,
    Identify,
    Alias,
    Group,
}

/// One accepted event. It travels between processes only when the served
/// model keeps history (`--history`, see `crate::serve::model`): objects as their
/// JSON text.
pub type Event = EventOf<'static>;

/// An event whose objects borrow the line it was decoded from
/// ([`decode_borrowed`]), or own their text ([`Event`]). The decoding
/// thread reads every stream's facts from the line itself and copies the
/// objects out only when whole events are wanted, instead of copying them
/// out of every line to free them a moment later (`docs/performance.md`,
/// session 24).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventOf<'a> {
    pub kind: EventType,
    /// `event` of a track, `name` of a page or screen.
    pub name: Option<CompactString>,
    /// Event time in epoch milliseconds.
    pub time: u64,
    /// The dedupe key: a 128-bit hash of `messageId`, or of the line's bytes.
    pub key: u128,
    pub user_id: Option<CompactString>,
    pub anonymous_id: Option<CompactString>,
    pub previous_id: Option<CompactString>,
    pub properties: Object<'a>,
    pub traits: Object<'a>,
    pub context: Object<'a>,
}

/// An id borrowed from an event: its kind and name.
pub type IdRef<'a> = (IdKind, &'a str);

/// A JSON object read lazily: its text is kept, and the first read indexes
/// its top-level fields (where each key and value lies in the text, nothing
/// parsed); a value is parsed the first time it is read. The objects no
/// stream looks at cost only the scan that checked them, and one an event
/// is read from costs a second scan and the values read: building the
/// whole object as a map (every key and string allocated) was a quarter of
/// the decoding thread's instructions.
#[derive(Clone, Debug, Default)]
pub struct Object<'a> {
    text: Option<std::borrow::Cow<'a, str>>,
    fields: std::sync::OnceLock<Vec<Field>>,
}

/// One top-level field of an [`Object`]: its key and the span of its value
/// in the object's text, parsed on first read.
#[derive(Clone, Debug)]
struct Field {
    key: FieldKey,
    value: (u32, u32),
    /// Boxed: a field is 40 bytes, not 112, and nearly every field read
    /// is a scalar that is never parsed as JSON (see [`Object::value`]).
    parsed: std::sync::OnceLock<Box<Json>>,
}

impl Field {
    /// The field's value as JSON, parsed from its text `raw` on first read.
    fn json(&self, raw: &str) -> &Json {
        self.parsed
            .get_or_init(|| Box::new(serde_json::from_str(raw).unwrap_or(Json::Null)))
    }
}

/// A key as a span of the text, or owned when it had escapes to undo.
#[derive(Clone, Debug)]
enum FieldKey {
    At(u32, u32),
    Owned(Box<str>),
}

impl PartialEq for Object<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.map() == other.map()
    }
}

impl Serialize for Object<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.text().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Object<'_> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Object {
            text: Option::<String>::deserialize(d)?.map(Into::into),
            fields: Default::default(),
        })
    }
}

impl<'a> Object<'a> {
    /// The object's JSON text as read (`None` when absent).
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// The object with its text copied out of the line it borrows.
    fn into_owned(self) -> Object<'static> {
        Object {
            text: self.text.map(|t| t.into_owned().into()),
            fields: self.fields,
        }
    }

    fn from_raw(raw: Option<&'a RawValue>, field: &str) -> Result<Object<'a>, BadEvent> {
        let Some(raw) = raw else { return Ok(Object::default()) };
        match raw.get().as_bytes().first() {
            Some(b'{') => Ok(Object {
                text: Some(raw.get().into()),
                fields: Default::default(),
            }),
            Some(b'n') => Ok(Object::default()),
            _ => bad(format!("field `{field}` must be an object")),
        }
    }

    /// The whole object, parsed (empty when absent).
    pub fn map(&self) -> Map<String, Json> {
        self.text.as_deref().and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default()
    }

    /// The value of the top-level field `key`; of repeated keys the last
    /// counts, as in a parsed map.
    pub fn get(&self, key: &str) -> Option<&Json> {
        let (field, raw) = self.field(key)?;
        Some(field.json(raw))
    }

    /// `Value::from_json` of [`Object::get`], read straight from the
    /// field's text when it is a scalar that needs no unescaping (nearly
    /// every value a stream reads), without building its JSON.
    pub fn value(&self, key: &str) -> Option<Value> {
        let (field, raw) = self.field(key)?;
        Some(match raw.as_bytes()[0] {
            b'"' if memchr::memchr(b'\\', raw.as_bytes()).is_none() => Value::Str(raw[1..raw.len() - 1].into()),
            b'-' | b'0'..=b'9' => Value::from_number(raw),
            b't' => Value::Bool(true),
            b'f' => Value::Bool(false),
            b'n' | b'[' | b'{' => Value::Missing,
            _ => Value::from_json(field.json(raw)),
        })
    }

    /// The top-level field `key` (the last, when repeated) and its value's text.
    fn field(&self, key: &str) -> Option<(&Field, &str)> {
        let text = self.text.as_deref()?;
        let fields = self.fields.get_or_init(|| index(text));
        let field = fields.iter().rev().find(|f| match &f.key {
            FieldKey::At(a, b) => &text[*a as usize..*b as usize] == key,
            FieldKey::Owned(k) => &**k == key,
        })?;
        let (a, b) = field.value;
        Some((field, &text[a as usize..b as usize]))
    }
}

/// A top-level field of an object as the parser lends it: the key (borrowed
/// unless it had escapes to undo) and the value's text.
type Lent<'a> = (KeyText<'a>, &'a RawValue);

enum KeyText<'a> {
    Borrowed(&'a str),
    Owned(String),
}

/// An object's fields as the parser lends them, or `None` for a value
/// that is not an object (so that decoding names the field, as it does for
/// a field read as raw text).
struct Lending<'a>(Option<Vec<Lent<'a>>>);

impl<'de: 'a, 'a> Deserialize<'de> for Lending<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lending<'a>, D::Error> {
        use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct Key;
        impl<'de> DeserializeSeed<'de> for Key {
            type Value = KeyText<'de>;
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<KeyText<'de>, D::Error> {
                d.deserialize_str(self)
            }
        }
        impl<'de> Visitor<'de> for Key {
            type Value = KeyText<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<KeyText<'de>, E> {
                Ok(KeyText::Borrowed(s))
            }
            fn visit_str<E>(self, s: &str) -> Result<KeyText<'de>, E> {
                Ok(KeyText::Owned(s.to_string()))
            }
        }
        struct Fields<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Fields<'a> {
            type Value = Lending<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Lending<'a>, A::Error> {
                let mut fields = Vec::with_capacity(8);
                while let Some(key) = m.next_key_seed(Key)? {
                    fields.push((key, m.next_value()?));
                }
                Ok(Lending(Some(fields)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Lending<'a>, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lending(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Lending<'a>, E> {
                Ok(Lending(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Lending<'a>, E> {
                Ok(Lending(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Lending<'a>, E> {
                Ok(Lending(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Lending<'a>, E> {
                Ok(Lending(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Lending<'a>, E> {
                Ok(Lending(None))
            }
            fn visit_unit<E>(self) -> Result<Lending<'a>, E> {
                Ok(Lending(None))
            }
        }
        d.deserialize_any(Fields(std::marker::PhantomData))
    }
}

/// The fields lent by the parser of `text` (which holds every key and
/// value they borrow), as spans of `text`.
fn spans(text: &str, lent: Vec<Lent<'_>>) -> Vec<Field> {
    let offset = |s: &str| (s.as_ptr() as usize - text.as_ptr() as usize) as u32;
    lent.into_iter()
        .map(|(key, raw)| {
            let start = offset(raw.get());
            Field {
                key: match key {
                    KeyText::Borrowed(k) => FieldKey::At(offset(k), offset(k) + k.len() as u32),
                    KeyText::Owned(k) => FieldKey::Owned(k.into()),
                },
                value: (start, start + raw.get().len() as u32),
                parsed: Default::default(),
            }
        })
        .collect()
}

/// Where every top-level field of the object `text` lies (empty if `text`
/// is not an object, which decoding has already ruled out).
fn index(text: &str) -> Vec<Field> {
    match serde_json::from_str::<Lending>(text) {
        Ok(Lending(Some(lent))) => spans(text, lent),
        _ => Vec::new(),
    }
}

/// The object whose fields were lent by the one pass over `line`, found in
/// it: from the `{` before the first key to the `}` after the last value,
/// with nothing but JSON whitespace between. `None` when that cannot be
/// read off the fields (no field, or a first key with escapes); the caller
/// then reads the object's text apart.
fn lent_object<'a>(line: &'a str, lent: Vec<Lent<'_>>) -> Option<Object<'a>> {
    let at = |s: &str| s.as_ptr() as usize - line.as_ptr() as usize;
    let (Some((KeyText::Borrowed(first), _)), Some((_, last))) = (lent.first(), lent.last()) else {
        return None;
    };
    let space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let bytes = line.as_bytes();
    // The key's opening quote, then whitespace back to the brace.
    let before = &bytes[..at(first) - 1];
    let open = before.len() - 1 - before.iter().rev().position(|b| !space(b))?;
    let after = at(last.get()) + last.get().len();
    let close = after + bytes[after..].iter().position(|b| !space(b))?;
    if bytes[open] != b'{' || bytes[close] != b'}' {
        return None;
    }
    let text = &line[open..=close];
    let fields = spans(text, lent);
    Some(Object {
        text: Some(text.into()),
        fields: fields.into(),
    })
}

impl EventOf<'_> {
    /// The identifier the event's facts are keyed by: the user id when there
    /// is one, else the anonymous id. All of an event's ids are linked, so
    /// any of them resolves to the same profile.
    pub fn anchor(&self) -> Id {
        match (&self.user_id, &self.anonymous_id) {
            (Some(u), _) => Id::user(u.clone()),
            (None, Some(a)) => Id::anon(a.clone()),
            (None, None) => unreachable!("decode requires an identifier"),
        }
    }

    /// The event with its objects' text copied out of the line.
    pub fn into_owned(self) -> Event {
        EventOf {
            properties: self.properties.into_owned(),
            traits: self.traits.into_owned(),
            context: self.context.into_owned(),
            ..self
        }
    }

    /// The event without `properties`, `traits` and `context`, for a
    /// reader that needs only its ids and time.
    pub fn into_without_objects(self) -> Event {
        EventOf {
            properties: Object::default(),
            traits: Object::default(),
            context: Object::default(),
            ..self
        }
    }

    /// A copy without `properties`, `traits` and `context`, for a reader
    /// that needs only the event's ids and time (see
    /// `crate::ingest::decode::Decoding`).
    pub fn without_objects(&self) -> Event {
        Event {
            name: self.name.clone(),
            user_id: self.user_id.clone(),
            anonymous_id: self.anonymous_id.clone(),
            previous_id: self.previous_id.clone(),
            properties: Object::default(),
            traits: Object::default(),
            context: Object::default(),
            ..*self
        }
    }

    /// The identifiers that name this event's profile (eligible ids, SPEC §2).
    pub fn named_ids(&self) -> Vec<Id> {
        let mut ids = Vec::with_capacity(2);
        if let Some(u) = &self.user_id {
            ids.push(Id::user(u.clone()));
        }
        if let Some(a) = &self.anonymous_id {
            ids.push(Id::anon(a.clone()));
        }
        ids
    }

    /// Every link the event makes, as pairs of ids.
    pub fn links(&self) -> Vec<(Id, Id)> {
        let owned = |(kind, name): IdRef| Id { kind, name: name.into() };
        self.link_refs().map(|(a, b)| (owned(a), owned(b))).collect()
    }

    /// [`Event::links`], borrowed from the event: the reader's identity
    /// bookkeeping runs this for every event and allocates nothing.
    pub fn link_refs(&self) -> impl Iterator<Item = (IdRef<'_>, IdRef<'_>)> {
        let user = self.user_id.as_deref().map(|u| (IdKind::User, u));
        let both = user.zip(self.anonymous_id.as_deref().map(|a| (IdKind::Anon, a)));
        let alias = user
            .filter(|_| self.kind == EventType::Alias)
            .zip(self.previous_id.as_deref())
            .map(|(u, p)| [(u, (IdKind::User, p)), (u, (IdKind::Anon, p))]);
        both.into_iter().chain(alias.into_iter().flatten())
    }

    /// `Value::from_json` of [`Event::get`]: a field of `properties`,
    /// `traits` or `context` is read from its text (see [`Object::value`]).
    pub fn value(&self, path: &[String]) -> Option<Value> {
        match path {
            [root, key] => match root.as_str() {
                "properties" => self.properties.value(key),
                "traits" => self.traits.value(key),
                "context" => self.context.value(key),
                _ => None,
            },
            _ => self.get(path).map(Value::from_json),
        }
    }

    /// Reads a dotted path (`properties.x`, `context.device.type`, …).
    /// Arrays, objects and `null` are returned as they are; callers decide.
    pub fn get(&self, path: &[String]) -> Option<&Json> {
        let (first, rest) = path.split_first()?;
        let root = match first.as_str() {
            "properties" => &self.properties,
            "traits" => &self.traits,
            "context" => &self.context,
            _ => return None,
        };
        let (second, rest) = rest.split_first()?;
        let mut v = root.get(second)?;
        for k in rest {
            v = v.as_object()?.get(k)?;
        }
        Some(v)
    }
}

/// Why a line was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadEvent(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, BadEvent> {
    Err(BadEvent(msg.into()))
}

/// Hash of a `messageId` (seeded apart from line hashes).
pub fn message_key(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(id.as_bytes(), 1)
}

/// Hash of a line's bytes, for events without a `messageId`.
pub fn line_key(line: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(line, 2)
}

/// The top-level fields, each borrowed as its JSON text (a `null` is
/// absent): scalars are read from it below, without building JSON values
/// (a string is borrowed unless it has escapes to undo), and objects are
/// kept as text (see [`Object`]); everything else is ignored.
#[derive(Deserialize, Default)]
struct Top<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(rename = "messageId", borrow)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(rename = "userId", borrow)]
    user_id: Option<&'a RawValue>,
    #[serde(rename = "anonymousId", borrow)]
    anonymous_id: Option<&'a RawValue>,
    #[serde(rename = "previousId", borrow)]
    previous_id: Option<&'a RawValue>,
    /// Indexed in this one pass: nearly every event's `properties` is read.
    #[serde(borrow)]
    properties: Option<Lending<'a>>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
}

/// The text of a JSON string (`None` if `raw` is not one), unescaped only
/// when it has escapes.
fn string_of(raw: &RawValue) -> Option<std::borrow::Cow<'_, str>> {
    let s = raw.get();
    if !s.starts_with('"') {
        None
    } else if memchr::memchr(b'\\', s.as_bytes()).is_none() {
        Some(s[1..s.len() - 1].into())
    } else {
        serde_json::from_str::<String>(s).ok().map(Into::into)
    }
}

/// The text of a JSON number (`None` if `raw` is not one), as written.
fn number_of(raw: &RawValue) -> Option<&str> {
    let s = raw.get();
    s.starts_with(|c: char| c == '-' || c.is_ascii_digit()).then_some(s)
}

fn opt_str<'a>(raw: Option<&'a RawValue>, field: &str) -> Result<Option<std::borrow::Cow<'a, str>>, BadEvent> {
    match raw.map(|r| string_of(r).ok_or(())) {
        None => Ok(None),
        Some(Ok(s)) => Ok(Some(s)),
        Some(Err(())) => bad(format!("field `{field}` must be a string")),
    }
}

fn opt_string(raw: Option<&RawValue>, field: &str) -> Result<Option<CompactString>, BadEvent> {
    Ok(opt_str(raw, field)?.map(CompactString::from))
}

fn opt_id(raw: Option<&RawValue>, field: &str) -> Result<Option<CompactString>, BadEvent> {
    let Some(raw) = raw else { return Ok(None) };
    match (string_of(raw), number_of(raw)) {
        (Some(s), _) if s.is_empty() => Ok(None),
        (Some(s), _) => Ok(Some(CompactString::from(s))),
        (None, Some(n)) => Ok(Some(CompactString::from(n))),
        (None, None) => bad(format!("field `{field}` must be a string or a number")),
    }
}

fn timestamp(raw: Option<&RawValue>) -> Result<u64, BadEvent> {
    let Some(raw) = raw else { return bad("missing `timestamp`") };
    match (string_of(raw), number_of(raw)) {
        (Some(s), _) => clock::parse_time(&s).map_err(|e| BadEvent(format!("invalid `timestamp`: {e}"))),
        (None, Some(n)) => match n.parse::<u64>() {
            Ok(ms) if ms <= MAX_TIME => Ok(ms),
            Ok(ms) => bad(format!("invalid `timestamp`: {ms} is after 9999-12-31T23:59:59.999Z")),
            Err(_) => bad(format!(
                "invalid `timestamp`: {n} is not a non-negative integer of epoch milliseconds"
            )),
        },
        (None, None) => bad("invalid `timestamp`: must be an RFC 3339 string or epoch milliseconds"),
    }
}

/// The text of `properties` in a line already decoded once.
fn properties_of(text: &str) -> Option<&RawValue> {
    #[derive(Deserialize)]
    struct Properties<'a> {
        #[serde(borrow)]
        properties: Option<&'a RawValue>,
    }
    serde_json::from_str::<Properties>(text).ok().and_then(|p| p.properties)
}

/// Decodes one line (without its line ending). Blank lines are the caller's
/// business: they are skipped before decoding.
pub fn decode(line: &[u8]) -> Result<Event, BadEvent> {
    decode_borrowed(line).map(EventOf::into_owned)
}

/// [`decode`], with the event's objects borrowed from `line`.
pub fn decode_borrowed(line: &[u8]) -> Result<EventOf<'_>, BadEvent> {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(e) => return bad(format!("not JSON: invalid UTF-8 ({e})")),
    };
    // A derived struct would also accept an array; only objects are events.
    match text.trim_start().as_bytes().first() {
        Some(b'{') => {}
        _ => {
            return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => bad("not a JSON object"),
                Err(e) => bad(format!("not JSON: {e}")),
            }
        }
    }
    let top: Top = match serde_json::from_str(text) {
        Ok(t) => t,
        Err(e) if e.is_syntax() || e.is_eof() => return bad(format!("not JSON: {e}")),
        Err(e) => return bad(format!("not a valid event: {e}")),
    };
    let kind = match opt_str(top.kind, "type")? {
        Some(t) => match &*t {
            "track" => EventType::Track,
            "page" => EventType::Page,
            "screen" => EventType::Screen,
            "identify" => EventType::Identify,
            "alias" => EventType::Alias,
            "group" => EventType::Group,
            other => return bad(format!("unknown `type` {other:?}")),
        },
        None => return bad("missing `type`"),
    };
    let time = timestamp(top.timestamp)?;
    let event_name = opt_string(top.event, "event")?;
    let page_name = opt_string(top.name, "name")?;
    let message_id = opt_str(top.message_id, "messageId")?;
    let user_id = opt_id(top.user_id, "userId")?;
    let anonymous_id = opt_id(top.anonymous_id, "anonymousId")?;
    let previous_id = opt_id(top.previous_id, "previousId")?;
    let properties = match top.properties {
        None => Object::default(),
        Some(Lending(None)) => return bad("field `properties` must be an object"),
        Some(Lending(Some(lent))) => match lent_object(text, lent) {
            Some(object) => object,
            None => Object::from_raw(properties_of(text), "properties")?,
        },
    };
    let traits = Object::from_raw(top.traits, "traits")?;
    let context = Object::from_raw(top.context, "context")?;
    let name = match kind {
        EventType::Track => match event_name {
            Some(e) => Some(e),
            None => return bad("`track` without `event`"),
        },
        EventType::Page | EventType::Screen => page_name,
        _ => None,
    };
    if kind == EventType::Alias {
        if user_id.is_none() || previous_id.is_none() {
            return bad("`alias` needs both `userId` and `previousId`");
        }
    } else if user_id.is_none() && anonymous_id.is_none() {
        return bad("no identifier: `userId` or `anonymousId` is required");
    }
    let key = match &message_id {
        Some(m) => message_key(m),
        None => line_key(line),
    };
    Ok(EventOf {
        kind,
        name,
        time,
        key,
        user_id,
        anonymous_id,
        previous_id,
        properties,
        traits,
        context,
    })
}

/// An accepted event as the model keeps it: ordered, compared and hashed by
/// all its fields (objects by their JSON text), so the dataflow can carry
/// and consolidate it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kept(pub Box<Event>);

impl Kept {
    #[allow(clippy::type_complexity)]
    fn fields(
        &self,
    ) -> (
        u64,
        u128,
        u8,
        &Option<CompactString>,
        &Option<CompactString>,
        &Option<CompactString>,
        &Option<CompactString>,
        [Option<&str>; 3],
    ) {
        let e = &self.0;
        (
            e.time,
            e.key,
            e.kind as u8,
            &e.name,
            &e.user_id,
            &e.anonymous_id,
            &e.previous_id,
            [e.properties.text(), e.traits.text(), e.context.text()],
        )
    }
}

impl PartialEq for Kept {
    fn eq(&self, other: &Self) -> bool {
        self.fields() == other.fields()
    }
}

impl Eq for Kept {}

impl PartialOrd for Kept {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Kept {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.fields().cmp(&other.fields())
    }
}

impl std::hash::Hash for Kept {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.fields().hash(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::clock::MAX_TIME;
    use crate::core::id::Id;

    #[test]
    fn reads_fields_as_a_parsed_object_would() {
        let e = decode(
            br#"{"type":"track","event":"x","userId":"u","timestamp":0,"properties":{"a":1,"s":"x\"y","a\u0062":[1,{"c":null}],"n":1.50,"a":2,"o":{"p":{"q":"deep"}}}}"#,
        )
        .unwrap();
        let parsed = e.properties.map();
        for key in ["a", "s", "ab", "n", "o", "missing", ""] {
            assert_eq!(e.properties.get(key), parsed.get(key), "key {key:?}");
        }
        assert_eq!(
            e.properties.get("a"),
            Some(&serde_json::json!(2)),
            "the last of repeated keys counts"
        );
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(e.get(&path(&["properties", "o", "p", "q"])), Some(&serde_json::json!("deep")));
        assert_eq!(e.get(&path(&["properties", "n"])).map(|n| n.to_string()), Some("1.50".to_string()));
        assert_eq!(e.traits.get("a"), None);
    }

    #[test]
    fn reads_values_as_from_parsed_json() {
        let e = decode(
            br#"{"type":"track","event":"x","userId":"u","timestamp":0,"properties":{"a":1,"s":"x\"y","t":"plain","a\u0062":[1,{"c":null}],"n":1.50,"e":-2.5e3,"big":123456789012345678901234567890123,"f":false,"z":null,"a":2,"o":{"p":{"q":"deep"}}}}"#,
        )
        .unwrap();
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for key in ["a", "s", "t", "ab", "n", "e", "big", "f", "z", "o", "missing"] {
            let p = path(&["properties", key]);
            assert_eq!(e.value(&p), e.get(&p).map(Value::from_json), "key {key:?}");
        }
        assert_eq!(e.value(&path(&["properties", "t"])), Some(Value::Str("plain".into())));
        assert_eq!(e.value(&path(&["properties", "o", "p", "q"])), Some(Value::Str("deep".into())));
        assert_eq!(e.value(&path(&["traits", "a"])), None);
    }

    #[test]
    fn decodes_a_track() {
        let e =
            decode(br#"{"type":"track","event":"x","userId":7,"timestamp":"2024-01-01T00:00:01.5Z","properties":{"a":{"b":1}}}"#).unwrap();
        assert_eq!(e.kind, EventType::Track);
        assert_eq!(e.time, 1_704_067_201_500);
        assert_eq!(e.anchor(), Id::user("7"));
        assert_eq!(e.get(&["properties".into(), "a".into(), "b".into()]), Some(&serde_json::json!(1)));
    }

    #[test]
    fn refuses_what_spec_calls_bad() {
        for (line, why) in [
            (&br#"{"type":"track","event":"x","timestamp":"#[..], "not JSON"),
            (br#"[1]"#, "not a JSON object"),
            (br#"{"type":"track","event":"x","userId":"u"}"#, "missing `timestamp`"),
            (br#"{"type":"track","event":"x","timestamp":0}"#, "no identifier"),
            (
                br#"{"type":"track","event":"x","userId":"u","timestamp":true}"#,
                "invalid `timestamp`",
            ),
            (br#"{"type":"x","userId":"u","timestamp":0}"#, "unknown `type`"),
            (br#"{"type":"track","userId":"u","timestamp":0}"#, "without `event`"),
            (
                br#"{"type":"page","userId":"u","timestamp":0,"context":3}"#,
                "`context` must be an object",
            ),
            (br#"{"type":"alias","userId":"u","timestamp":0}"#, "`alias` needs"),
            (br#"{"type":"page","userId":"","anonymousId":null,"timestamp":0}"#, "no identifier"),
            (
                br#"{"type":"page","userId":"u","timestamp":0,"messageId":5}"#,
                "`messageId` must be a string",
            ),
        ] {
            let err = decode(line).unwrap_err();
            assert!(err.0.contains(why), "{err} should mention {why}");
        }
    }

    proptest::proptest! {
        /// `properties`, indexed in the one pass over the line, keeps its
        /// text exactly and reads every field as the parsed object does,
        /// whatever the spacing, escaped keys, nesting or emptiness.
        #[test]
        fn properties_read_in_one_pass_keep_text_and_fields(
            fields in proptest::collection::vec((
                proptest::sample::select(vec!["a", "b", "dwell_ms", "a\\u0062", "q\\\"k", "", "é"]),
                proptest::sample::select(vec!["1", "-2.50", "\"x\"", "\"y\\\"z\"", "null", "true", "[1,{\"c\":[]}]", "{\"p\":{\"q\":\"deep\"}}", "{}"]),
            ), 0..6),
            gaps in proptest::collection::vec(proptest::sample::select(vec!["", " ", "\n\t ", "\r\n"]), 4),
            after in proptest::sample::select(vec!["", ",\"traits\":{\"t\":1}", ",\"x\":\"}\""]),
        ) {
            let body = fields
                .iter()
                .map(|(k, v)| format!("{}\"{k}\"{}:{}{v}{}", gaps[0], gaps[1], gaps[2], gaps[3]))
                .collect::<Vec<_>>()
                .join(",");
            let object = format!("{{{body}{}}}", gaps[0]);
            let line = format!(r#"{{"type":"track","event":"e","userId":"u","timestamp":0,"properties":{}{object}{}{after}}}"#, gaps[1], gaps[2]);
            let e = decode(line.as_bytes()).expect("a valid event");
            let parsed: Map<String, Json> = serde_json::from_str(&object).expect("valid JSON");
            proptest::prop_assert_eq!(e.properties.text(), Some(object.trim()));
            proptest::prop_assert_eq!(e.properties.map(), parsed.clone());
            for key in parsed.keys().map(String::as_str).chain(["missing"]) {
                proptest::prop_assert_eq!(e.properties.get(key), parsed.get(key), "key {:?}", key);
            }
        }

        /// Each top-level scalar, whatever JSON it holds, decodes as the
        /// parsed JSON reads: a string (escaped or not) or, for ids, a
        /// number's text; `null` is absent; anything else is refused.
        #[test]
        fn scalars_read_as_parsed_json_would(
            field in proptest::sample::select(vec!["type", "event", "name", "messageId", "userId", "anonymousId", "timestamp"]),
            value in proptest::sample::select(vec![
                r#""track""#, r#""tr\u0061ck""#, r#""""#, r#""a\"b""#, "7", "-1.50", "1e3", "0", "null", "true", "[1]", r#"{"a":1}"#,
                r#""2024-01-01T00:00:00Z""#, "1704067200000",
            ]),
        ) {
            let mut fields = vec![("type", r#""track""#), ("event", r#""e""#), ("userId", r#""u""#), ("timestamp", "0")];
            fields.retain(|(k, _)| *k != field);
            fields.push((field, value));
            let line = format!("{{{}}}", fields.iter().map(|(k, v)| format!("{k:?}:{v}")).collect::<Vec<_>>().join(","));
            let json: Json = serde_json::from_str(value).unwrap();
            let text = |j: &Json| match j {
                Json::String(s) => Some(s.clone()),
                _ => None,
            };
            let got = decode(line.as_bytes());
            match (field, &json) {
                (_, Json::Null) if field == "type" || field == "timestamp" => proptest::prop_assert!(got.is_err()),
                ("userId", _) => {
                    let id = match &json {
                        Json::String(s) if s.is_empty() => None,
                        Json::String(s) => Some(s.clone()),
                        // A number's text as written (`1e3`, not `1e+3`).
                        Json::Number(_) => Some(value.to_string()),
                        Json::Null => None,
                        _ => return Err(proptest::test_runner::TestCaseError::reject("not an id")),
                    };
                    match id {
                        Some(id) => proptest::prop_assert_eq!(got.unwrap().user_id.map(|s| s.to_string()), Some(id)),
                        None => proptest::prop_assert!(got.is_err(), "no identifier"),
                    }
                }
                ("anonymousId", _) => {
                    let id = match &json {
                        Json::String(s) if !s.is_empty() => Some(s.clone()),
                        Json::Number(_) => Some(value.to_string()),
                        Json::String(_) | Json::Null => None,
                        _ => return Err(proptest::test_runner::TestCaseError::reject("not an id")),
                    };
                    proptest::prop_assert_eq!(got.unwrap().anonymous_id.map(|s| s.to_string()), id);
                }
                ("event", _) => match (&json, text(&json)) {
                    (Json::Null, _) => proptest::prop_assert!(got.is_err(), "a track needs its event"),
                    (_, Some(e)) => proptest::prop_assert_eq!(got.unwrap().name.map(|s| s.to_string()), Some(e)),
                    (_, None) => proptest::prop_assert!(got.unwrap_err().0.contains("`event` must be a string")),
                },
                ("type", _) => match text(&json) {
                    Some(t) if t == "track" => proptest::prop_assert_eq!(got.unwrap().kind, EventType::Track),
                    Some(_) => proptest::prop_assert!(got.unwrap_err().0.contains("unknown `type`")),
                    None => proptest::prop_assert!(got.unwrap_err().0.contains("`type` must be a string")),
                },
                ("timestamp", _) => {
                    let want = match &json {
                        Json::String(s) => clock::parse_time(s).ok(),
                        Json::Number(n) => n.as_u64(),
                        _ => None,
                    };
                    proptest::prop_assert_eq!(got.ok().map(|e| e.time), want);
                }
                ("messageId", _) => match text(&json) {
                    Some(m) => proptest::prop_assert_eq!(got.unwrap().key, message_key(&m)),
                    None if json.is_null() => proptest::prop_assert_eq!(got.unwrap().key, line_key(line.as_bytes())),
                    None => proptest::prop_assert!(got.is_err()),
                },
                // A page's name, type-checked on every event.
                _ => match (&json, text(&json)) {
                    (Json::Null, _) | (_, Some(_)) => proptest::prop_assert!(got.is_ok()),
                    _ => proptest::prop_assert!(got.unwrap_err().0.contains("`name` must be a string")),
                },
            }
        }
    }

    #[test]
    fn refuses_epoch_milliseconds_after_year_9999() {
        // Found by fuzz/decode: u64::MAX overflowed rounding to a tick, and
        // a time past 9999 could not be written by the sink.
        let line = |t: &str| format!(r#"{{"type":"page","userId":"u","timestamp":{t}}}"#);
        assert_eq!(decode(line("253402300799999").as_bytes()).unwrap().time, MAX_TIME);
        assert_eq!(decode(line(r#""9999-12-31T23:59:59.999Z""#).as_bytes()).unwrap().time, MAX_TIME);
        for t in ["253402300800000", "18446744073709551615", "18446744073709551616"] {
            let err = decode(line(t).as_bytes()).unwrap_err();
            assert!(err.0.contains("invalid `timestamp`"), "{t}: {err}");
        }
    }

    #[test]
    fn alias_links_both_kinds_of_previous_id() {
        let e = decode(br#"{"type":"alias","userId":"b","previousId":"a","timestamp":0}"#).unwrap();
        assert_eq!(e.links(), vec![(Id::user("b"), Id::user("a")), (Id::user("b"), Id::anon("a"))]);
        assert_eq!(e.named_ids(), vec![Id::user("b")]);
    }
}
