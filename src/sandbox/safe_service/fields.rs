//! Request bodies read the way DRF does, and the error answers they give.

use std::collections::BTreeMap;

use alloy::primitives::{Address, B256, Bytes, U256};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// An error answer: a status and a DRF-style JSON body.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Rejection {
    pub(super) status: StatusCode,
    pub(super) body: Value,
}

impl Rejection {
    pub(super) fn non_field(status: StatusCode, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            body: json!({ "nonFieldErrors": [message.into()] }),
        }
    }

    pub(super) fn fields(status: StatusCode, errors: FieldErrors) -> Rejection {
        Rejection {
            status,
            body: serde_json::to_value(errors).expect("field errors serialize"),
        }
    }

    pub(super) fn not_found(detail: &str) -> Rejection {
        Rejection {
            status: StatusCode::NOT_FOUND,
            body: json!({ "detail": detail }),
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

pub(super) type FieldErrors = BTreeMap<String, Vec<String>>;

pub(super) const UNPROCESSABLE: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;

/// An address field: EIP-55 only, as safe-eth-py's `EthereumAddressField`.
pub(super) fn checksummed_address(text: &str) -> Result<Address, String> {
    match text.parse::<Address>() {
        Ok(address) if address.to_checksum(None) == text => Ok(address),
        Ok(_) => Err(format!("Address {text} is not checksumed")),
        Err(_) => Err(format!("Address {text} is not valid")),
    }
}

/// The Safe address in a URL path; the real service answers a wrong one with
/// its own error shape.
pub(super) fn path_address(text: &str) -> Result<Address, Rejection> {
    checksummed_address(text).map_err(|_| Rejection {
        status: UNPROCESSABLE,
        body: json!({
            "code": 1,
            "message": "Checksum address validation failed",
            "arguments": [text],
        }),
    })
}

/// The JSON object of a request body. An empty body reads as `{}` (every
/// required field then reports itself missing); unparsable JSON is a 400,
/// as DRF's parser gives.
pub(super) fn json_object(
    body: &[u8],
    invalid_status: StatusCode,
) -> Result<Map<String, Value>, Rejection> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => {
            let kind = match other {
                Value::Array(_) => "list",
                Value::String(_) => "str",
                Value::Number(_) => "int",
                Value::Bool(_) => "bool",
                _ => "NoneType",
            };
            Err(Rejection::non_field(
                invalid_status,
                format!("Invalid data. Expected a dictionary, but got {kind}."),
            ))
        }
        Err(err) => Err(Rejection {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "detail": format!("JSON parse error - {err}") }),
        }),
    }
}

/// Reads the fields of one request body, collecting every field error as DRF
/// does before answering.
pub(super) struct Fields<'a> {
    pub(super) body: &'a Map<String, Value>,
    pub(super) errors: FieldErrors,
}

impl<'a> Fields<'a> {
    pub(super) fn new(body: &'a Map<String, Value>) -> Self {
        Fields {
            body,
            errors: FieldErrors::new(),
        }
    }

    pub(super) fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors
            .entry(field.to_owned())
            .or_default()
            .push(message.into());
    }

    /// `None` for a missing or null field, with an error when it is required.
    pub(super) fn present(&mut self, field: &str, required: bool) -> Option<&'a Value> {
        match self.body.get(field) {
            Some(Value::Null) => {
                if required {
                    self.fail(field, "This field may not be null.");
                }
                None
            }
            Some(value) => Some(value),
            None => {
                if required {
                    self.fail(field, "This field is required.");
                }
                None
            }
        }
    }

    pub(super) fn address(&mut self, field: &str, required: bool) -> Option<Address> {
        let value = self.present(field, required)?;
        let Some(text) = value.as_str() else {
            self.fail(field, format!("Address {value} is not valid"));
            return None;
        };
        match checksummed_address(text) {
            Ok(address) => Some(address),
            Err(message) => {
                self.fail(field, message);
                None
            }
        }
    }

    /// A non-negative integer, as a JSON number or a decimal string.
    pub(super) fn integer(&mut self, field: &str) -> Option<U256> {
        let value = self.present(field, true)?;
        let parsed = match value {
            Value::Number(n) if n.is_u64() => n.as_u64().map(U256::from),
            Value::Number(n) if n.is_i64() => {
                self.fail(field, "Ensure this value is greater than or equal to 0.");
                return None;
            }
            Value::String(s)
                if s.len() > 1
                    && s.starts_with('-')
                    && s[1..].bytes().all(|b| b.is_ascii_digit()) =>
            {
                self.fail(field, "Ensure this value is greater than or equal to 0.");
                return None;
            }
            Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                U256::from_str_radix(s, 10).ok()
            }
            _ => None,
        };
        if parsed.is_none() {
            self.fail(field, "A valid integer is required.");
        }
        parsed
    }

    /// `0x` hex; this fake also takes it without the prefix.
    pub(super) fn hex(&mut self, field: &str, required: bool) -> Option<Bytes> {
        let value = self.present(field, required)?;
        let text = value.as_str().unwrap_or_default();
        let digits = text.strip_prefix("0x").unwrap_or(text);
        match hex::decode(digits) {
            Ok(bytes) if value.is_string() => Some(bytes.into()),
            // This fake's wording.
            _ => {
                self.fail(field, format!("{value} is not a valid hexadecimal value"));
                None
            }
        }
    }

    pub(super) fn hash32(&mut self, field: &str) -> Option<B256> {
        let bytes = self.hex(field, true)?;
        if bytes.len() == 32 {
            Some(B256::from_slice(&bytes))
        } else {
            // This fake's wording.
            self.fail(field, format!("{bytes} is not a 32-byte hash"));
            None
        }
    }

    pub(super) fn text(&mut self, field: &str, max_chars: usize, required: bool) -> Option<String> {
        let value = self.present(field, required)?;
        let Some(text) = value.as_str() else {
            self.fail(field, "Not a valid string.");
            return None;
        };
        if text.chars().count() > max_chars {
            self.fail(
                field,
                format!("Ensure this field has no more than {max_chars} characters."),
            );
            return None;
        }
        Some(text.to_owned())
    }

    pub(super) fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, FieldErrors> {
        if self.errors.is_empty() {
            Ok(value())
        } else {
            Err(self.errors)
        }
    }
}
