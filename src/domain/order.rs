//! A request for replicas, as the API and the CI webhook accept it.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::ids::Bytes32;

/// The most replicas one call may queue; a larger fleet is several calls.
pub const MAX_REPLICAS_PER_ORDER: u32 = 20;
const MAX_NOTE_CHARS: usize = 1_000;
const MAX_SOURCE_CHARS: usize = 128;

/// The body of `POST /api/v1/replicas` and `POST /webhooks/ci`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderBody {
    /// The CVM to replicate: its UUID, its app id or its name.
    source: String,
    /// A numeric node id or a node name (case-insensitive); without it Phala schedules.
    #[serde(default)]
    #[schema(value_type = Option<NodeField>)]
    node: Option<serde_json::Value>,
    /// Picks the configuration when the app has several live ones (32 bytes, hex).
    #[serde(default)]
    compose_hash: Option<String>,
    /// Replicas to create, 1 to 20 (default 1); each is its own request.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 20)]
    count: Option<u32>,
    /// Env overrides; names must be in the app's `allowed_envs`. Encrypted at once, never stored in plaintext.
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    /// Free text, shown with the request.
    #[serde(default)]
    note: Option<String>,
}

/// How the body may name a node (for the API description).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum NodeField {
    Id(u32),
    Name(String),
}

/// Which node to place the replica on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRef {
    Id(u32),
    /// Matched case-insensitively against the available nodes.
    Name(String),
}

/// A validated order: `count` replicas of `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOrder {
    /// A CVM UUID, an app id or a CVM name; Phala resolves it.
    pub source: String,
    /// `None` lets Phala schedule.
    pub node: Option<NodeRef>,
    pub compose_hash: Option<Bytes32>,
    pub count: u32,
    /// Env overrides. Values are secrets until encrypted for the app's KMS key.
    pub env: BTreeMap<String, String>,
    pub note: Option<String>,
}

/// Why an order was refused. `field` names the part of the body at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOrder {
    #[error("the body is not valid JSON: {0}")]
    Syntax(String),
    #[error("{0}")]
    Shape(String),
    #[error("`{field}`: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

impl InvalidOrder {
    fn field(field: &'static str, message: impl Into<String>) -> Self {
        InvalidOrder::Field {
            field,
            message: message.into(),
        }
    }
}

impl ReplicaOrder {
    /// Parse and validate a raw JSON body.
    pub fn from_json(body: &[u8]) -> Result<Self, InvalidOrder> {
        // The path names the field at fault: "count: invalid type: string …".
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let body: OrderBody =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
                let path = err.path().to_string();
                let inner = err.into_inner();
                match inner.classify() {
                    serde_json::error::Category::Data if path == "." => {
                        InvalidOrder::Shape(inner.to_string())
                    }
                    serde_json::error::Category::Data => {
                        InvalidOrder::Shape(format!("`{path}`: {inner}"))
                    }
                    _ => InvalidOrder::Syntax(inner.to_string()),
                }
            })?;
        deserializer
            .end()
            .map_err(|err| InvalidOrder::Syntax(err.to_string()))?;
        Self::validate(body)
    }

    fn validate(body: OrderBody) -> Result<Self, InvalidOrder> {
        let source = body.source.trim().to_owned();
        if source.is_empty() {
            return Err(InvalidOrder::field("source", "must not be empty"));
        }
        if source.chars().count() > MAX_SOURCE_CHARS
            || !source
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(InvalidOrder::field(
                "source",
                "must be a CVM UUID, an app id or a CVM name (letters, digits, `-`, `_`, `.`)",
            ));
        }

        let node = match body.node {
            None | Some(serde_json::Value::Null) => None,
            Some(value) => Some(parse_node(value)?),
        };

        let compose_hash = body
            .compose_hash
            .map(|h| h.parse::<Bytes32>())
            .transpose()
            .map_err(|err| InvalidOrder::field("compose_hash", err.to_string()))?;

        let count = body.count.unwrap_or(1);
        if !(1..=MAX_REPLICAS_PER_ORDER).contains(&count) {
            return Err(InvalidOrder::field(
                "count",
                format!("must be between 1 and {MAX_REPLICAS_PER_ORDER}"),
            ));
        }

        let env = body.env.unwrap_or_default();
        if let Some(name) = env.keys().find(|name| !is_env_name(name)) {
            return Err(InvalidOrder::field(
                "env",
                format!(
                    "`{name}` is not a valid variable name (letters, digits and `_`, not starting with a digit)"
                ),
            ));
        }

        let note = body
            .note
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        if note
            .as_ref()
            .is_some_and(|n| n.chars().count() > MAX_NOTE_CHARS)
        {
            return Err(InvalidOrder::field(
                "note",
                format!("must be at most {MAX_NOTE_CHARS} characters"),
            ));
        }
        // Postgres text cannot hold NUL; found by the property tests.
        if note.as_ref().is_some_and(|n| n.contains('\0')) {
            return Err(InvalidOrder::field(
                "note",
                "must not contain NUL characters",
            ));
        }

        Ok(ReplicaOrder {
            source,
            node,
            compose_hash,
            count,
            env,
            note,
        })
    }
}

fn parse_node(value: serde_json::Value) -> Result<NodeRef, InvalidOrder> {
    let invalid = || InvalidOrder::field("node", "must be a numeric node id or a node name");
    match value {
        serde_json::Value::Number(n) => n
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .map(NodeRef::Id)
            .ok_or_else(invalid),
        serde_json::Value::String(s) => {
            let s = s.trim();
            if s.is_empty() || s.chars().count() > MAX_SOURCE_CHARS {
                Err(invalid())
            } else if s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse().map(NodeRef::Id).map_err(|_| invalid())
            } else {
                Ok(NodeRef::Name(s.to_owned()))
            }
        }
        _ => Err(invalid()),
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ReplicaOrder, InvalidOrder> {
        ReplicaOrder::from_json(json.as_bytes())
    }

    #[test]
    fn only_source_is_required() {
        let order = parse(r#"{"source": "my-app"}"#).unwrap();
        assert_eq!(order.source, "my-app");
        assert_eq!(order.node, None);
        assert_eq!(order.count, 1);
        assert!(order.env.is_empty());
    }

    #[test]
    fn node_is_an_id_or_a_name() {
        assert_eq!(
            parse(r#"{"source": "a", "node": 7}"#).unwrap().node,
            Some(NodeRef::Id(7))
        );
        assert_eq!(
            parse(r#"{"source": "a", "node": "12"}"#).unwrap().node,
            Some(NodeRef::Id(12))
        );
        assert_eq!(
            parse(r#"{"source": "a", "node": "prod-5"}"#).unwrap().node,
            Some(NodeRef::Name("prod-5".into()))
        );
        for bad in [r#"-1"#, r#"1.5"#, r#"true"#, r#""""#, r#"[1]"#] {
            let err = parse(&format!(r#"{{"source": "a", "node": {bad}}}"#)).unwrap_err();
            assert!(
                matches!(err, InvalidOrder::Field { field: "node", .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"source": ""}"#, "source"),
            (r#"{"source": "a/b"}"#, "source"),
            (r#"{"source": "a", "compose_hash": "xyz"}"#, "compose_hash"),
            (r#"{"source": "a", "count": 0}"#, "count"),
            (r#"{"source": "a", "count": 21}"#, "count"),
            (r#"{"source": "a", "env": {"1BAD": "x"}}"#, "env"),
            (r#"{"source": "a", "note": "x\u0000y"}"#, "note"),
        ];
        for (body, field) in cases {
            match parse(body).unwrap_err() {
                InvalidOrder::Field { field: got, .. } => assert_eq!(got, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_shape_errors_naming_the_field() {
        let err = parse(r#"{"source": "a", "colour": "red"}"#).unwrap_err();
        assert!(
            matches!(&err, InvalidOrder::Shape(m) if m.contains("colour")),
            "{err}"
        );
        let err = parse(r#"{"source": "a", "count": "two"}"#).unwrap_err();
        assert!(
            matches!(&err, InvalidOrder::Shape(m) if m.starts_with("`count`")),
            "{err}"
        );
        let err = parse(r#"{"node": 1}"#).unwrap_err();
        assert!(
            matches!(&err, InvalidOrder::Shape(m) if m.contains("source")),
            "{err}"
        );
    }

    #[test]
    fn broken_json_is_a_syntax_error() {
        assert!(matches!(parse("{").unwrap_err(), InvalidOrder::Syntax(_)));
        assert!(matches!(parse("").unwrap_err(), InvalidOrder::Syntax(_)));
    }
}
