//! A serde deserializer for GET query strings: `a=1&b=x&ids=1&ids=2`.
//!
//! Values are typed by the target field: numbers and booleans are parsed (`FromStr`), strings
//! (and hex bytes) taken as is, a key given several times fills a repeated field, and for a
//! scalar field the last occurrence wins.

use serde::de::value::{Error, MapDeserializer, SeqDeserializer};
use serde::de::{self, Deserializer, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;

/// Deserializes a whole query string as a map of keys to values.
pub(crate) struct QueryDeserializer {
    entries: Vec<(String, Vec<String>)>,
}

impl QueryDeserializer {
    pub(crate) fn new(query: &[u8]) -> Self {
        let mut entries: Vec<(String, Vec<String>)> = Vec::new();
        for (k, v) in form_urlencoded::parse(query) {
            match entries.iter_mut().find(|(key, _)| *key == k) {
                Some((_, values)) => values.push(v.into_owned()),
                None => entries.push((k.into_owned(), vec![v.into_owned()])),
            }
        }
        Self { entries }
    }
}

impl<'de> Deserializer<'de> for QueryDeserializer {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let map = MapDeserializer::new(self.entries.into_iter().map(|(k, values)| (k, Values(values))));
        visitor.visit_map(map)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

/// All values given for one key (never empty).
struct Values(Vec<String>);

impl Values {
    fn last(&self) -> &str {
        self.0.last().map_or("", String::as_str)
    }

    fn parse<T: std::str::FromStr>(&self, what: &str) -> Result<T, Error> {
        let s = self.last();
        s.parse()
            .map_err(|_| de::Error::custom(format_args!("invalid {what}: {s:?}")))
    }
}

impl<'de> IntoDeserializer<'de, Error> for Values {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

macro_rules! parse_scalar {
    ($($method:ident => $visit:ident: $ty:ty, $what:literal;)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                visitor.$visit(self.parse::<$ty>($what)?)
            }
        )*
    };
}

impl<'de> Deserializer<'de> for Values {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_string(self.last().to_owned())
    }

    parse_scalar! {
        deserialize_bool => visit_bool: bool, "boolean";
        deserialize_i8 => visit_i8: i8, "integer";
        deserialize_i16 => visit_i16: i16, "integer";
        deserialize_i32 => visit_i32: i32, "integer";
        deserialize_i64 => visit_i64: i64, "integer";
        deserialize_u8 => visit_u8: u8, "integer";
        deserialize_u16 => visit_u16: u16, "integer";
        deserialize_u32 => visit_u32: u32, "integer";
        deserialize_u64 => visit_u64: u64, "integer";
        deserialize_f32 => visit_f32: f32, "number";
        deserialize_f64 => visit_f64: f64, "number";
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let items = self.0.into_iter().map(|v| Values(vec![v]));
        visitor.visit_seq(SeqDeserializer::new(items))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    forward_to_deserialize_any! {
        i128 u128 char str string bytes byte_buf unit_struct tuple tuple_struct map struct enum
        identifier
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::QueryDeserializer;

    #[derive(Deserialize, Default, Debug, PartialEq)]
    #[serde(default)]
    struct Q {
        name: String,
        n: u32,
        neg: i64,
        flag: bool,
        opt: Option<u64>,
        ids: Vec<String>,
        nums: Vec<u32>,
    }

    fn q(s: &str) -> Result<Q, serde::de::value::Error> {
        Q::deserialize(QueryDeserializer::new(s.as_bytes()))
    }

    #[test]
    fn typed_values_and_repeats() {
        let v = q("name=a+b%21&n=7&neg=-3&flag=true&opt=9&ids=x&ids=y&nums=1&nums=2&other=z").unwrap();
        assert_eq!(
            v,
            Q {
                name: "a b!".into(),
                n: 7,
                neg: -3,
                flag: true,
                opt: Some(9),
                ids: vec!["x".into(), "y".into()],
                nums: vec![1, 2],
            }
        );
        assert_eq!(q("").unwrap(), Q::default());
        assert_eq!(q("ids=one").unwrap().ids, vec!["one".to_owned()]);
        // The last value of a repeated scalar wins.
        assert_eq!(q("n=1&n=2").unwrap().n, 2);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(q("n=x").unwrap_err().to_string().contains("invalid integer: \"x\""));
        assert!(q("n=-1").is_err());
        assert!(q("flag=yes").is_err());
        assert!(q("nums=1&nums=b").is_err());
        assert!(q("opt=").is_err());
    }
}
