//! Request bodies, validated the way pydantic v2 does in lax mode.

use serde_json::{Map, Value, json};

use super::errors::SimError;

#[derive(Clone, Copy)]
pub(super) enum Kind {
    Int,
    Str,
    StrList,
}

/// Reads the fields of a JSON object body. An empty body is `{}`; every
/// field is optional unless `required`, and `null` counts as absent.
pub(super) fn parse_model(
    body: &[u8],
    fields: &[(&str, Kind, bool)],
) -> Result<Map<String, Value>, SimError> {
    let object = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            Ok(other) => {
                return Err(SimError::Validation(vec![SimError::issue(
                    "model_attributes_type",
                    json!(["body"]),
                    "Input should be a valid dictionary or object to extract fields from",
                    &other,
                )]));
            }
            Err(err) => {
                return Err(SimError::Validation(vec![json!({
                    "type": "json_invalid",
                    "loc": ["body", err.column().saturating_sub(1)],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": err.to_string()},
                })]));
            }
        }
    };
    let mut issues = Vec::new();
    let mut out = Map::new();
    for (name, kind, required) in fields {
        let loc = json!(["body", name]);
        match object.get(*name) {
            None | Some(Value::Null) if *required => issues.push(SimError::issue(
                "missing",
                loc,
                "Field required",
                &Value::Object(object.clone()),
            )),
            None | Some(Value::Null) => {}
            Some(value) => match coerce(*kind, value) {
                Ok(v) => {
                    out.insert((*name).to_owned(), v);
                }
                Err((kind, msg)) => issues.push(SimError::issue(kind, loc, msg, value)),
            },
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(SimError::Validation(issues))
    }
}

pub(super) fn coerce(kind: Kind, value: &Value) -> Result<Value, (&'static str, &'static str)> {
    const NOT_STR: (&str, &str) = ("string_type", "Input should be a valid string");
    match kind {
        Kind::Str => value.as_str().map(Value::from).ok_or(NOT_STR),
        Kind::StrList => {
            let items = value
                .as_array()
                .ok_or(("list_type", "Input should be a valid list"))?;
            items
                .iter()
                .map(|item| item.as_str().map(Value::from).ok_or(NOT_STR))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        Kind::Int => match value {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(value.clone()),
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok((f as i64).into()),
                _ => Err((
                    "int_from_float",
                    "Input should be a valid integer, got a number with a fractional part",
                )),
            },
            Value::Bool(b) => Ok(i64::from(*b).into()),
            Value::String(s) => s.trim().parse::<i64>().map(Value::from).map_err(|_| {
                (
                    "int_parsing",
                    "Input should be a valid integer, unable to parse string as an integer",
                )
            }),
            _ => Err(("int_type", "Input should be a valid integer")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue_of(err: SimError) -> Vec<Value> {
        match err {
            SimError::Validation(issues) => issues,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn bodies_are_validated_like_pydantic() {
        let fields = [
            ("node_id", Kind::Int, false),
            ("compose_hash", Kind::Str, false),
        ];
        let ok = parse_model(
            br#"{"node_id": "3", "compose_hash": "ab", "extra": 1}"#,
            &fields,
        )
        .unwrap();
        assert_eq!(ok["node_id"], json!(3));
        assert!(!ok.contains_key("extra"));
        assert!(parse_model(b"", &fields).unwrap().is_empty());
        assert!(
            parse_model(br#"{"node_id": null}"#, &fields)
                .unwrap()
                .is_empty()
        );

        let issues = issue_of(
            parse_model(br#"{"node_id": "prod-2", "compose_hash": 5}"#, &fields).unwrap_err(),
        );
        assert_eq!(issues.len(), 2);
        assert_eq!(issues[0]["type"], "int_parsing");
        assert_eq!(issues[0]["loc"], json!(["body", "node_id"]));
        assert_eq!(issues[0]["input"], "prod-2");
        assert_eq!(issues[1]["type"], "string_type");

        let issues = issue_of(parse_model(br#"{"node_id": 2.5}"#, &fields).unwrap_err());
        assert_eq!(issues[0]["type"], "int_from_float");
        let issues = issue_of(parse_model(b"[1]", &fields).unwrap_err());
        assert_eq!(issues[0]["type"], "model_attributes_type");
        let issues = issue_of(parse_model(b"{nope", &fields).unwrap_err());
        assert_eq!(issues[0]["type"], "json_invalid");
        let issues = issue_of(parse_model(b"{}", &[("token", Kind::Str, true)]).unwrap_err());
        assert_eq!(issues[0]["type"], "missing");
        assert_eq!(issues[0]["msg"], "Field required");
    }
}
