//! Columns that hold one of a closed set of words (statuses, kinds, outcomes) as Rust enums:
//! a value that is not one of them is a decode error naming it, never a silent string.
//!
//! The columns are `text` with a `CHECK`, not PostgreSQL enum types. `derive(sqlx::Type)`
//! maps an enum onto a PostgreSQL type by name: without `type_name` one that does not exist
//! (launchbadge/sqlx#3630), with `type_name = "text"` it looks `text` up in the catalog on
//! each new connection. `text_column!` implements sqlx's `Type`, `Encode` and `Decode` by
//! delegating to `str` instead, the way sqlx maps its own string types, and can do so for
//! a type defined elsewhere (the protocol's `CommandStatus` stays free of sqlx).

/// An enum stored as one of its words.
pub trait TextValue: Copy + Sized + 'static {
    /// Every value, for parsing and for the lists the queries bind.
    const ALL: &'static [Self];

    /// The stored word.
    fn as_str(self) -> &'static str;

    /// The value stored as `text`, if it is one.
    fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|value| value.as_str() == text)
    }
}

/// Maps a [`TextValue`] onto PostgreSQL `text` (and `text[]`).
macro_rules! text_column {
    ($ty:ty) => {
        impl sqlx::Type<sqlx::Postgres> for $ty {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $ty {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::postgres::PgHasArrayType>::array_compatible(ty)
            }
        }

        impl<'q> sqlx::Encode<'q, sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                let text = $crate::store::text::TextValue::as_str(*self);
                <&str as sqlx::Encode<'q, sqlx::Postgres>>::encode_by_ref(&text, buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $ty {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<'r, sqlx::Postgres>>::decode(value)?;
                <$ty as $crate::store::text::TextValue>::parse(text)
                    .ok_or_else(|| format!("{text:?} is not a known {}", stringify!($ty)).into())
            }
        }
    };
}

pub(crate) use text_column;

/// Serializes a [`TextValue`] as its stored word, so JSON shows what the column holds
/// (`#[serde(serialize_with = "text::as_word")]`).
pub fn as_word<T: TextValue, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(value.as_str())
}
