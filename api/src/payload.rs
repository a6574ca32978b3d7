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
        let limit = T::max_bytes(&request.data::<ApiConfig>().cloned().unwrap_or_default());
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
        Ok(Self {
            bytes,
            schema: PhantomData,
        })
    }
}

poem_openapi::impl_apirequest_for_payload!(JsonBody<T>, T: BodySchema);
