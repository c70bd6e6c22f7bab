//! Rows decoded into domain types at the store's boundary: a text column
//! that does not parse is a decoding error of the query, never a panic (nor
//! a string for the rest of the code to parse).

use std::str::FromStr;

use alloy::primitives::{Address, B256};
use sqlx::Postgres;
use sqlx::postgres::{PgTypeInfo, PgValueRef};

use crate::domain::ProposalStatus;

/// A text column parsed into `T`. The checked macros take it as a type
/// override (`safe AS "safe: Text<Address>"`) and convert it into the
/// field's own type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Text<T>(pub T);

impl<T> sqlx::Type<Postgres> for Text<T> {
    fn type_info() -> PgTypeInfo {
        <str as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <str as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r, T> sqlx::Decode<'r, Postgres> for Text<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as sqlx::Decode<Postgres>>::decode(value)?;
        Ok(Text(text.parse()?))
    }
}

/// The field types `Text` converts into.
macro_rules! text_into {
    ($($ty:ty),* $(,)?) => {$(
        impl From<Text<$ty>> for $ty {
            fn from(text: Text<$ty>) -> $ty {
                text.0
            }
        }
    )*};
}
text_into!(ProposalStatus, Address, B256);

/// Short names for the overrides: Postgres cuts a column name at 63 bytes.
pub type ProposalStatusText = Text<ProposalStatus>;
