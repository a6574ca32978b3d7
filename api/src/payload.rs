//! [`JsonBody`]: a JSON request body read with a size limit and parsed only as far as JSON.
//!
//! poem-openapi's own `Json<T>` answers a malformed body or a missing field with one plain-text
//! message; drover's enqueue routes instead report every bad field (and every bad job of a
//! batch) at once, so the body is handed to the handler as a `serde_json::Value` and validated
//! there (after a strict fast reading, see [`crate::enqueue`]). `T` only documents the body's
//! schema in the OpenAPI spec.

use std::marker::PhantomData;

use bytes::Bytes;
use poem::{Request, RequestBody, error::ReadBodyError, http::header};
use poem_openapi::{
    payload::{ParsePayload, Payload},
    registry::{MetaSchemaRef, Registry},
    types::Type,
};

use crate::{ApiConfig, error::ApiError};

/// A request schema that knows its body size limit.
pub(crate) trait BodySchema: Type {
    fn max_bytes(config: &ApiConfig) -> usize;
}

/// A JSON body whose OpenAPI schema is `T`, delivered as its bytes (non-empty, within the
/// size limit); [`JsonBody::value`] parses it.
pub(crate) struct JsonBody<T> {
    pub(crate) bytes: Bytes,
    schema: PhantomData<fn() -> T>,
}

impl<T> JsonBody<T> {
    /// The body as a JSON tree, or `400 invalid-json`.
    pub(crate) fn value(&self) -> Result<serde_json::Value, ApiError> {
        serde_json::from_slice(&self.bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))
    }
}

impl<T: BodySchema> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = "application/json";

    fn check_content_type(content_type: &str) -> bool {
        // `application/json` or any `application/…+json`, with or without parameters.
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        essence
            .strip_prefix("application/")
            .is_some_and(|subtype| subtype == "json" || subtype.ends_with("+json"))
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: BodySchema> ParsePayload for JsonBody<T> {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let fallback;
        let config = match request.data::<ApiConfig>() {
            Some(c) => c,
            None => {
                fallback = ApiConfig::default();
                &fallback
            }
        };
        let limit = T::max_bytes(config);
        // Refuse a declared oversize body before reading any of it.
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(ApiError::PayloadTooLarge { limit }.into());
        }
        // A chunked body has no declared length: count while reading.
        let bytes = body.take()?.into_bytes_limit(limit).await.map_err(|e| match e {
            ReadBodyError::PayloadTooLarge => ApiError::PayloadTooLarge { limit }.into(),
            other => poem::Error::from(other),
        })?;
        if bytes.is_empty() {
            return Err(ApiError::InvalidJson("the request body is empty".to_owned()).into());
        }
        // A batch's `jobs` array may hold as many jobs as the batch limit allows.
        let members = config.max_json_members.max(config.max_batch_jobs);
        check_shape(&bytes, config.max_json_depth, members)?;
        Ok(Self {
            bytes,
            schema: PhantomData,
        })
    }
}

poem_openapi::impl_apirequest_for_payload!(JsonBody<T>, T: BodySchema);

/// Refuses a body nested deeper than `max_depth` or with an object or array of more than
/// `max_members` entries, before any parser builds anything from it: one pass over the bytes,
/// skipping strings. Malformed JSON passes here and is reported by the parser.
///
/// serde_json would stop at 128 levels on its own; these limits are lower so that a payload
/// stored for a worker (which decodes it again, maybe with a recursive decoder) stays tame.
pub(crate) fn check_shape(bytes: &[u8], max_depth: usize, max_members: usize) -> Result<(), ApiError> {
    // Members seen so far in each open container (commas + 1 once a value appeared).
    let mut open: Vec<usize> = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                if open.len() >= max_depth {
                    return Err(ApiError::JsonTooComplex(format!(
                        "the body is nested more than {max_depth} levels deep"
                    )));
                }
                open.push(0);
            }
            b'}' | b']' => {
                open.pop();
            }
            b',' => {
                if let Some(n) = open.last_mut() {
                    *n += 1;
                    if *n >= max_members {
                        return Err(ApiError::JsonTooComplex(format!(
                            "an object or array of the body has more than {max_members} members"
                        )));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_shape;

    #[test]
    fn deep_or_wide_bodies_are_refused_and_strings_do_not_count() {
        let deep = format!("{}{}", "[".repeat(33), "]".repeat(33));
        assert!(check_shape(deep.as_bytes(), 32, 100).is_err());
        let ok = format!("{}{}", "[".repeat(32), "]".repeat(32));
        assert!(check_shape(ok.as_bytes(), 32, 100).is_ok());
        assert!(check_shape(br#"{"a": "[[[[[[,,,,,\"[[["}"#, 2, 2).is_ok());
        assert!(check_shape(br#"{"a": 1, "b": 2, "c": 3}"#, 2, 2).is_err());
        assert!(check_shape(br#"{"a": 1, "b": 2, "c": 3}"#, 2, 3).is_ok());
    }
}
